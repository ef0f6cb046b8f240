"""The one exception type that reaches the user as a single readable line (exit code 2)."""

from __future__ import annotations


class EstimatorError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The CLI prints ``error: <message>`` (one line per problem) and exits with code 2;
    library callers can catch it like any other exception.
    """

    def __init__(self, *problems: str) -> None:
        self.problems = [p for p in problems if p] or ["unknown error"]
        super().__init__("; ".join(self.problems))
