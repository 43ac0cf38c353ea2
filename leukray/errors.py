"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class LeukrayError(Exception):
    """A problem with the user's input, data or configuration (one-line message)."""


class ConfigError(LeukrayError):
    """A configuration value is missing, unknown or out of range."""


class DataError(LeukrayError):
    """The data cannot be used as given (wrong path, empty folder, a single class, ...)."""


class WeightsError(LeukrayError):
    """Model weights cannot be found, read or verified."""
