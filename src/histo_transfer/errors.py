"""Errors caused by the user's config or data: reported as one line, exit status 2."""


class UserError(Exception):
    """A mistake the user can fix; the message says what and how."""


class ConfigError(UserError):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class DataError(UserError):
    """Bad input data; the message names the file or CSV row."""
