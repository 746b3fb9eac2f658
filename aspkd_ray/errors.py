"""The one error family a user can fix: the CLI prints its message on one line, no traceback.

Raise a subclass (or `UserError` itself) where the cause is the user's input or data: a bad
value, a missing or corrupt file, a ledger held by another run. The message names the thing
(parameter, value, file) and says what to do. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment; the message says how to fix it.

    `exit_code`: 2 for bad input given on the command line or in a config, 1 otherwise.
    """

    exit_code = 1


class UsageError(UserError):
    """A bad command-line argument (not a config key): one line, exit code 2."""

    exit_code = 2
