"""The project's error types. A ``UserError`` is something the user can fix (a flag, a file, the
data, the launcher): the CLIs print its first line and exit 2 (``TrainingStopped``: 3). Anything
else is a bug, in this project or below it, and keeps its traceback.

Each type also derives from the built-in type callers used to catch (ValueError / RuntimeError),
so library code that catches those keeps working.
"""


class UserError(Exception):
    """A mistake the user can fix; the message's first line says what to do."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A bad configuration: unknown key, wrong type or value, unreadable file."""


class DataError(UserError, ValueError):
    """A dataset folder that cannot serve: missing, empty, classes that do not match."""


class DeviceError(UserError, RuntimeError):
    """The requested device or launcher cannot be used."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that does not exist, cannot be read or written, or does not fit the network."""


class ConversionError(UserError, ValueError):
    """A PyTorch checkpoint that does not fit the requested network."""


class TrainingStopped(UserError, RuntimeError):
    """The run stopped on purpose (non-finite loss, diverged loss scale); the message says where and why."""

    exit_code = 3


def first_line(exc):
    """The first non-empty line of an exception's message, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def name_list(names, limit=8, sort=True):
    """'a, b, c ... (+N more)': the first ``limit`` names and how many more."""
    names = sorted(names) if sort else list(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more
