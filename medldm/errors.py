"""Typed errors: every failure a user can cause is one of these, with a message naming what and where."""


class MedldmError(Exception):
    """Base class for errors medldm raises on purpose."""


class InputError(MedldmError, ValueError):
    """An input file or folder cannot be used. The message names the path and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(MedldmError, ValueError):
    """A configuration file or value is invalid. The message names the file and the field."""


class ModelError(MedldmError):
    """A saved model cannot be found, loaded, or does not fit the request."""
