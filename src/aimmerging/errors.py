"""Errors a user can cause and fix. The CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """Base class: bad input, bad option, unknown name. Never a bug in aimmerging itself."""


class DataError(UserError):
    """A task file is missing, malformed or inconsistent."""


class ConfigError(UserError):
    """A configuration value or combination of values is invalid."""
