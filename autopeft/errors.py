"""The exception types for mistakes a user can make.

Every one is an AutopeftError, which the CLI prints on one line before exiting with code 2. Code that decides
something by catching an error catches one of the subclasses, never AutopeftError itself: a plain AutopeftError is a
message for the user, not a signal.
"""

from __future__ import annotations


class AutopeftError(Exception):
    """A problem the user can fix: bad input, missing files, an impossible request.

    The CLI prints the message on one line and exits with code 2. The message says what was wrong and what to do.
    """


class UnsupportedBackbone(AutopeftError):
    """A method (or one of its option values) cannot go on this backbone: its family or its sizes."""


class UnknownKey(AutopeftError):
    """A settings file or mapping holds a key nothing reads (a typo, or a setting of another version)."""
