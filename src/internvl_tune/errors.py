"""The user's mistakes, as one family of exceptions: what the CLI prints as one `error: ...` line (exit 2).

Every error type of the project derives from `UserError`: `ConfigError` (config.py), `DataError`
(data/errors.py), `ConversionError` (checkpoints/convert.py), `ServerError` (generation/server.py). A check of a
command's arguments, a path or a file's content raises one of them, with a message that names the file, line or
field and the fix. Any other exception is a bug or the machine's (a `ValueError` deep in a library, a full disk)
and keeps its traceback; `--debug` or `INTERNVL_TUNE_DEBUG=1` shows the traceback of a user error too.

They stay `ValueError`s (and the missing path a `FileNotFoundError`), so code that catches those keeps working.
This module imports nothing: every layer may raise these.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake of the user's: a setting, an argument, a path or a file's content; the message says what to fix."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""
