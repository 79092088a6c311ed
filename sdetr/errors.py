"""The base class of errors caused by the user's input rather than by a bug.

Every error type that a flag, a config value or a file can cause derives from :class:`UserError`
(``ConfigError``, ``BadDataError``, ``CheckpointError``, ``RecordingError``, ``PreflightError``,
``NonFiniteLossError``). Its message names the flag, field or file and says how to fix it; the
command-line tools print it as one line and exit with status 2, keeping tracebacks for bugs.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a flag, a config value, a data, checkpoint or recording file); the message says what to fix."""


#: Exit status of a command-line tool stopped by a :class:`UserError` (as argparse's usage errors).
USER_ERROR_EXIT = 2
