"""Errors caused by the user's config or data (or the machine: a full disk): reported as one line,
exit status 2 (1 for a full disk)."""

import errno


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""

    exit_code = 2
    label = "error"


class ConfigError(UserError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(UserError):
    """Bad input data; the message names the file or CSV row."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, which SLURM, Kubernetes and `kill` send before they kill a job: handled as Ctrl-C is
    (the run ends KILLED, resumable), so everything that already handles an interruption handles it."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports it

    @staticmethod
    def raise_on_sigterm(signum, frame):
        """A SIGTERM handler: the signal as this exception, wherever the main thread is."""
        raise Terminated


class DiskFull(UserError):
    """No space left where a cache, checkpoint or artifact was being written; what was half written
    is removed, what was complete before is kept. The message names the path."""

    exit_code = 1

    @staticmethod
    def caused(exc: BaseException) -> bool:
        return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class TrainingInterrupted(UserError):
    """Ctrl-C or SIGTERM during training: the run ended KILLED and can be resumed."""

    exit_code = 130  # the shell's code for SIGINT
    label = "interrupted"

    def __init__(self, message: str, terminated: bool = False):
        super().__init__(message)
        if terminated:
            self.exit_code, self.label = Terminated.exit_code, "terminated"
