"""The one exception type for user mistakes.

The CLI turns a `UserError` into a single red line and exit code 2 (1 for `verify`
failures), never a traceback. Anything else that escapes is a bug in rankseg and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: say what is wrong, with which file, and what to do."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SampleError(Exception):
    """A data problem with one sample (corrupt image, bad label...): skippable with --on-error skip.

    The message must name the offending file.
    """
