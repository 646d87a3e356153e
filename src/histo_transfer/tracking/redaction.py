"""User names and passwords in URIs (`http://user:pw@host`, database URIs) never reach a record."""

from __future__ import annotations

import re

# `\://`: Hydra escapes the colons of override values it passes to a sweep's jobs (`https\://u\:pw@host`)
# The user information runs to the host's last `@` (a password may hold an unencoded one).
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*\\?://)[^/\s]+@")


def redact_uri(text: str) -> str:
    """Replace user names and passwords in any URI within `text` (`http://user:pw@host` -> `http://***@host`)."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", str(text))


def redact_log_records() -> None:
    """Every log record made in this process from now on carries its URIs redacted, whoever logs it and
    whatever handlers Hydra installs later (Hydra's launchers echo each job's overrides, MLflow prints its
    "View run at" address). Idempotent."""
    import logging

    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacted(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is handled, as it would have
            return record
        if "@" in message:
            record.msg, record.args = redact_uri(message), ()
        return record

    redacted.redacts = True
    logging.setLogRecordFactory(redacted)
