"""The one exception type for mistakes a user can make."""

from __future__ import annotations


class AutopeftError(Exception):
    """A problem the user can fix: bad input, missing files, an impossible request.

    The CLI prints the message on one line and exits with code 2. The message says what was wrong and what to do.
    """
