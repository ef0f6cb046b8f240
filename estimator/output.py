"""Writing to stdout safely: strict JSON, user code kept off stdout, write failures as one line.

* ``--json`` output is RFC 8259 JSON: ``json.dumps(allow_nan=False)``; non-finite numbers are refused
  earlier, when the config is validated, so a NaN reaching the writer is a bug, reported as one.
* While a ``--json`` command runs, everything else written to stdout (a module factory's ``print``,
  a C library writing to file descriptor 1) goes to stderr, so stdout holds exactly one document.
* A failed write to stdout (``/dev/full``: ENOSPC; a closed pipe: EPIPE) becomes :class:`OutputError`,
  which the CLI prints as one line on stderr (exit 2; EPIPE exits 141 = 128 + SIGPIPE, the status a
  shell reports for a writer killed by a closed pipe).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from estimator.errors import EstimatorError

EPIPE_EXIT = 141
"""Exit status when the reader of stdout went away: 128 + SIGPIPE (13), as shells report it."""

_json_stdout: list[TextIO] = []  # the real stdout while user code's stdout goes to stderr


class OutputError(EstimatorError):
    """Writing the result to stdout failed (disk full, pipe closed, stdout closed)."""

    def __init__(self, exc: OSError | None = None, message: str | None = None) -> None:
        self.broken_pipe = exc is not None and exc.errno == errno.EPIPE
        reason = message or (os.strerror(exc.errno) if exc is not None and exc.errno else str(exc))
        super().__init__(f"cannot write to stdout: {reason}")

    @property
    def exit_code(self) -> int:
        return EPIPE_EXIT if self.broken_pipe else 2


class SafeStdout(io.TextIOBase):
    """A file for rich's Console: writes go to the current ``sys.stdout``; OSError -> OutputError.

    The current stream is looked up on every call, so test runners that swap ``sys.stdout`` and the
    ``--json`` redirection below both keep working.
    """

    def _stream(self) -> TextIO:
        stream = sys.stdout
        if stream is None:  # the process started with file descriptor 1 closed
            raise OutputError(message="stdout is closed")
        return stream

    def write(self, text: str) -> int:  # type: ignore[override]
        try:
            return self._stream().write(text)
        except OSError as exc:
            raise OutputError(exc) from None

    def flush(self) -> None:
        try:
            self._stream().flush()
        except OSError as exc:
            raise OutputError(exc) from None

    def isatty(self) -> bool:
        stream = sys.stdout
        return bool(stream is not None and stream.isatty())

    def fileno(self) -> int:
        return self._stream().fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(sys.stdout, "encoding", None) or "utf-8"


def strict_json(payload: Any) -> str:
    """RFC 8259 JSON text: NaN and infinities are refused (they are not JSON)."""
    try:
        return json.dumps(payload, indent=2, allow_nan=False)
    except ValueError as exc:
        raise EstimatorError(f"internal error: a result is not a finite number ({exc}); please report it") from None


def write_json(payload: Any) -> None:
    """Print one JSON document to the real stdout (even while user code's stdout is redirected)."""
    text = strict_json(payload) + "\n"
    stream = _json_stdout[-1] if _json_stdout else sys.stdout
    if stream is None:
        raise OutputError(message="stdout is closed")
    try:
        stream.write(text)
        stream.flush()
    except OSError as exc:
        raise OutputError(exc) from None


@contextlib.contextmanager
def user_stdout_to_stderr() -> Iterator[None]:
    """Send whatever is printed to stdout (Python ``print`` and file descriptor 1) to stderr.

    :func:`write_json` inside the block still writes to the real stdout. At the descriptor level the
    redirection is done only when ``sys.stdout`` is the process's descriptor 1 (not under a test
    runner that replaced it); spawned processes (``verify --parallel`` ranks) inherit it.
    """
    real = sys.stdout
    saved_fd: int | None = None
    try:
        if real is not None and real.fileno() == 1:
            real.flush()
            saved_fd = os.dup(1)
            os.dup2(2, 1)
    except (OSError, ValueError, io.UnsupportedOperation):
        saved_fd = None
    target: TextIO = real
    if saved_fd is not None:
        target = os.fdopen(os.dup(saved_fd), "w", encoding=getattr(real, "encoding", None) or "utf-8",
                           closefd=True)
    _json_stdout.append(target)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _json_stdout.pop()
        if saved_fd is not None:
            with contextlib.suppress(OSError):
                target.close()
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.flush()
            os.dup2(saved_fd, 1)
            os.close(saved_fd)
