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


class Interrupted(Exception):
    """The run was stopped by a signal (SIGINT, SIGTERM) after cleaning up what it started.

    The CLI prints one line and exits with the shell's convention, 128 + the signal number
    (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, what: str = "") -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        self.message = f"interrupted by {name}" + (f"; {what}" if what else "")
        super().__init__(self.message)
