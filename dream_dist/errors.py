"""dream_dist's error family: the mistakes a user can make and fix.

Every error a user can cause (a config value, missing or corrupt data, data that disagrees
with the config, a refused checkpoint or model file) is a `DreamDistError`. The command line
prints it as one line, `dream-dist: error: <message>`, and exits with status 2; with
`HYDRA_FULL_ERROR=1` it shows the traceback instead. Anything else is a bug and keeps its
traceback. Messages name the key (`eval.epochs`) or the file, and what would be valid.

Each class also derives from the built-in exception that callers of the library API caught
before (ValueError, FileNotFoundError, RuntimeError), so `except ValueError` keeps working.
"""
from __future__ import annotations


class DreamDistError(Exception):
    """Base of every user-fixable error."""

    exit_status = 2


class ConfigError(DreamDistError, ValueError):
    """A configuration value is missing, unknown or out of range (message starts with its key)."""


class DataError(DreamDistError, ValueError):
    """Data that is corrupt, or disagrees with the config (IPC larger than a class, class order)."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset directory, data file, or model file that the config names does not exist."""


class CheckpointError(DreamDistError, ValueError):
    """A checkpoint or model file dream_dist refuses to load (unsafe, foreign, or another version)."""


def one_line(message: object) -> str:
    """`message` as one line: whitespace runs (newlines, tabs) become single spaces."""
    return " ".join(str(message).split())
