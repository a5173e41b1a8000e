"""The errors a user can cause, at the bottom of the import graph (imports nothing of ultramem).

Each message names the field or file, the value and what is allowed; the CLI prints it as one line.
"""


class UltramemError(Exception):
    """Base of every expected (user-caused) error; the CLI prints these without a traceback."""


class ConfigError(UltramemError, ValueError):
    """A config value is invalid. The message names the field, the value and what is allowed."""


class DataError(UltramemError, ValueError):
    """Bad data input: the message names the file and what is wrong with it."""


class CheckpointError(UltramemError, RuntimeError):
    """A checkpoint is missing, truncated or corrupt."""
