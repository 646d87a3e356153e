"""Errors caused by the user's config or data: reported as one line, exit status 2."""


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


class TrainingInterrupted(UserError):
    """Ctrl-C during training: the run ended KILLED and can be resumed."""

    exit_code = 130  # the shell's code for SIGINT
    label = "interrupted"
