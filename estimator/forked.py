"""Independent pieces of work shared with one forked copy of this process, where that is safe.

A fit that does not fit re-estimates several alternatives (``fit.alternatives``); each is a pure function of
the config and of what the process has computed so far, and on two cores they need not wait for each other.
:func:`run_all` forks one child after everything they share is computed (the child inherits those caches,
nothing is pickled but the answers), and the parent and the child take tasks from one queue (a pipe of task
numbers, the most expensive first) until it is empty; the child sends back what it computed and exits.

The answers are the same whichever process computes a task, and the same as running them in order
(``tests/test_forked.py``): a task whose answer does not come back (the child crashed, was killed, or the
answer does not pickle) is computed by the parent. It runs serially instead where forking is not safe or
not worth it: no ``os.fork`` (Windows), one usable CPU, other threads in the process (a fork copies only this
one, and a lock another thread holds would stay held in the child), torch imported (its thread pools), fewer
than two tasks, or ``ESTIMATOR_SERIAL`` set in the environment.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

#: at most this many tasks per call (each is one byte in the queue)
MAX_TASKS = 255


def can_fork() -> bool:
    """Whether :func:`run_all` may fork here (see the module docstring)."""
    if os.environ.get("ESTIMATOR_SERIAL") or not hasattr(os, "fork") or "torch" in sys.modules:
        return False
    if threading.active_count() > 1:
        return False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cpus >= 2


def run_all(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """``[task() for task in tasks]``, the tasks shared between this process and one forked child.

    Put the most expensive tasks first: each process takes the next task as it finishes one. An exception a
    task raises in the parent propagates as it would serially (the child is killed, not waited for); one it
    raises in the child makes the parent compute that task itself (and so raise it there).
    """
    if len(tasks) < 2 or len(tasks) > MAX_TASKS or not can_fork():
        return [task() for task in tasks]
    queue_read, queue_write = os.pipe()
    answer_read, answer_write = os.pipe()
    os.write(queue_write, bytes(range(len(tasks))))
    os.close(queue_write)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        pid = os.fork()
    except OSError:  # no process to spare (EAGAIN, ENOMEM): the tasks run here, in order
        for fd in (queue_read, answer_read, answer_write):
            os.close(fd)
        return [task() for task in tasks]
    if pid == 0:  # the child: never returns, never runs the parent's exit handlers or flushes its buffers
        status = 1
        try:
            os.close(answer_read)
            done = {i: tasks[i]() for i in _taken(queue_read)}
            data = pickle.dumps(done, protocol=pickle.HIGHEST_PROTOCOL)
            with os.fdopen(answer_write, "wb") as out:
                out.write(data)
            status = 0
        finally:
            os._exit(status)
    os.close(answer_write)
    try:
        results: dict[int, Any] = {i: tasks[i]() for i in _taken(queue_read)}
        results.update(_answers(answer_read))
    except BaseException:  # a task's error, or Ctrl-C: the child's work is not wanted, nor waited for
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(queue_read)
        os.close(answer_read)
        _reap(pid)
    return [results[i] if i in results else tasks[i]() for i in range(len(tasks))]


def _reap(pid: int) -> None:
    """Wait for the child to exit (already reaped where the process ignores SIGCHLD: nothing to wait for)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _taken(queue: int) -> Iterator[int]:
    """The task numbers this process takes from the queue, one at a time (the next only once the last is done),
    until it is empty."""
    while byte := os.read(queue, 1):
        yield byte[0]


def _answers(answer: int) -> dict[int, Any]:
    """The child's answers ({} when it sent none, or what it sent does not unpickle)."""
    chunks = []
    while chunk := os.read(answer, 1 << 16):
        chunks.append(chunk)
    try:
        done = pickle.loads(b"".join(chunks)) if chunks else {}
    except Exception:  # noqa: BLE001 - a broken answer is computed again here
        return {}
    return done if isinstance(done, dict) else {}
