"""Errors a user can cause and fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Base class: bad input, bad option, unknown name. Never a bug in aimmerging itself."""


class DataError(UserError):
    """A task file is missing, malformed or inconsistent."""


class ConfigError(UserError):
    """A configuration value or combination of values is invalid."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` (an exception, a value read from a file) on one line of at most ``limit``
    characters, for quoting inside an error or warning message."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
