"""Errors raised by locaudit. Every message names the file, field or value at fault."""


class LocauditError(Exception):
    """Base class for every error locaudit raises on purpose."""


class DataError(LocauditError, ValueError):
    """A data file or record is malformed (the message names file, line and field)."""


class ConfigError(LocauditError, ValueError):
    """A configuration or spec value is invalid (the message names the field and value)."""


class UnsupportedModelError(LocauditError, ValueError):
    """The model family has no registered head site."""
