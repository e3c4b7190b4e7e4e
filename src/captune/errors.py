"""User-facing errors: one line, exit code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, bad data, missing files or tools).

    The CLI prints ``captune: error: <message>`` and exits with code 2.
    The message names the problem and the fix on one line.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
