"""settle_worker_threads: reads each thread's state from /proc/<pid>/task/<tid>/stat (here a fake tree)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from estimator.measure import settle


def _tasks(root: Path, states: dict[int, str]) -> Path:
    for tid, state in states.items():
        (root / str(tid)).mkdir()
        # the command name may hold spaces and parentheses: the state follows the *last* ")"
        (root / str(tid) / "stat").write_text(f"{tid} (gloo (worker) 1) {state} 1 2 3\n")
    return root


@pytest.fixture
def main_tid() -> int:
    return threading.get_native_id()


def test_idle_threads_settle_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, main_tid: int) -> None:
    monkeypatch.setattr(settle, "_TASKS", str(_tasks(tmp_path, {main_tid: "R", main_tid + 1: "S", main_tid + 2: "D"})))
    assert settle.settle_worker_threads(timeout_s=5.0) is True  # the main thread's own "R" does not count


def test_a_running_thread_is_waited_for_until_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         main_tid: int) -> None:
    monkeypatch.setattr(settle, "_TASKS", str(_tasks(tmp_path, {main_tid: "S", main_tid + 1: "R"})))
    assert settle._running_threads(main_tid) is True
    assert settle.settle_worker_threads(timeout_s=0.01) is False


def test_a_thread_that_goes_idle_ends_the_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, main_tid: int) -> None:
    root = _tasks(tmp_path, {main_tid + 1: "R"})
    monkeypatch.setattr(settle, "_TASKS", str(root))
    calls = []
    real = settle._running_threads

    def running(main: int) -> bool:
        calls.append(main)
        if len(calls) == 3:  # the worker finishes on the third look
            (root / str(main_tid + 1) / "stat").write_text(f"{main_tid + 1} (w) S 1\n")
        return real(main)

    monkeypatch.setattr(settle, "_running_threads", running)
    assert settle.settle_worker_threads(timeout_s=5.0) is True
    assert len(calls) == 3


def test_without_proc_it_returns_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settle, "_TASKS", str(tmp_path / "absent"))
    assert settle.settle_worker_threads() is False
