"""User names and passwords in URIs (`http://user:pw@host`, database URIs) never reach a record."""

from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)[^/@\s]+@")


def redact_uri(text: str) -> str:
    """Replace user names and passwords in any URI within `text` (`http://user:pw@host` -> `http://***@host`)."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", str(text))
