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


def test_the_tracker_settles_after_both_kinds_of_wait_and_restores_them(tmp_path: Path) -> None:
    """Inside a process group the tracker wraps c10d's Work.wait and the functional wait_tensor (an
    AsyncCollectiveTensor's wait is not seen by the dispatch mode), and puts both back on exit."""
    torch = pytest.importorskip("torch")
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    import torch.distributed._functional_collectives as funcol

    from estimator.measure.tracker import LiveTensorTracker

    originals = (dist.Work.wait, funcol.wait_tensor)
    with LiveTensorTracker("cpu"):  # no process group: nothing wrapped
        assert (dist.Work.wait, funcol.wait_tensor) == originals
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        calls = []
        real = settle.settle_worker_threads
        import estimator.measure.tracker as tracker_module

        tracker_module.settle_worker_threads = lambda: calls.append(1) or real()
        try:
            with LiveTensorTracker("cpu") as tracker:
                assert dist.Work.wait is not originals[0] and funcol.wait_tensor is not originals[1]
                x = torch.ones(4)
                dist.all_reduce(x, async_op=True).wait()  # c10d Work.wait
                y = funcol.all_reduce(torch.ones(4), "sum", dist.group.WORLD)  # an AsyncCollectiveTensor
                z = y + 1  # its first use waits inside __torch_dispatch__
        finally:
            tracker_module.settle_worker_threads = real
        assert len(calls) >= 2 and z.tolist() == [2.0] * 4 and tracker.peak_bytes > 0
        assert (dist.Work.wait, funcol.wait_tensor) == originals
    finally:
        dist.destroy_process_group()
