"""forked.run_all: the same answers as running the tasks in order, whichever process computes each."""

from __future__ import annotations

import os
import select
import time

import pytest

from estimator import forked


@pytest.fixture
def forking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fork even where the test process has imported torch (these tasks are pure Python)."""
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    monkeypatch.setattr(forked, "can_fork", lambda: True)


def test_both_processes_take_tasks_and_the_answers_keep_their_order(forking: None) -> None:
    """Task 0 waits for task 1 to have run: whichever process takes task 0, the other must take task 1, so each
    process computes one, and the answers come back in the tasks' order."""
    ready_read, ready_write = os.pipe()

    def first() -> tuple[str, int]:
        assert select.select([ready_read], [], [], 30)[0], "task 1 never ran: nothing was shared"
        return "first", os.getpid()

    def second() -> tuple[str, int]:
        os.write(ready_write, b"x")
        return "second", os.getpid()

    try:
        (a, pid_a), (b, pid_b) = forked.run_all([first, second])
    finally:
        os.close(ready_read)
        os.close(ready_write)
    assert (a, b) == ("first", "second")
    assert pid_a != pid_b and os.getpid() in (pid_a, pid_b)


def test_many_tasks_give_what_a_loop_gives(forking: None) -> None:
    tasks = [lambda i=i: [i, i * i, None if i % 3 else {"i": i}] for i in range(40)]
    assert forked.run_all(tasks) == [task() for task in tasks]


def test_a_task_the_child_cannot_finish_is_computed_by_the_parent(forking: None) -> None:
    """A child that dies (here: exits in the middle of a task) sends nothing back; the parent computes what is
    missing, so the answers are still complete."""
    parent = os.getpid()

    def dies_in_the_child(i: int) -> int:
        if os.getpid() != parent:
            os._exit(3)
        return i

    tasks = [lambda i=i: dies_in_the_child(i) for i in range(6)]
    assert forked.run_all(tasks) == list(range(6))


def test_an_error_in_the_parent_propagates_without_waiting_for_the_child(forking: None) -> None:
    """Each task fails at once in the parent and takes a minute in the child: the parent's error comes back at
    once (the child, whose work is no longer wanted, is killed)."""
    parent = os.getpid()

    def fails() -> int:
        if os.getpid() != parent:
            time.sleep(60)
        raise ValueError("the task's own error")

    started = time.monotonic()
    with pytest.raises(ValueError, match="the task's own error"):
        forked.run_all([fails, fails, fails])
    assert time.monotonic() - started < 30


def test_serial_where_forking_is_not_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    """ESTIMATOR_SERIAL, or torch imported (its thread pools), runs the tasks in this process, in order."""
    monkeypatch.setenv("ESTIMATOR_SERIAL", "1")
    assert not forked.can_fork()
    assert forked.run_all([os.getpid, os.getpid]) == [os.getpid()] * 2
    monkeypatch.delenv("ESTIMATOR_SERIAL")
    monkeypatch.setitem(__import__("sys").modules, "torch", object())
    assert not forked.can_fork()


def test_fit_alternatives_are_the_same_forked_or_serial(monkeypatch: pytest.MonkeyPatch, forking: None) -> None:
    """Llama-2-7B on an A100-40GB tries every kind of alternative (checkpointing, 8-bit Adam, 16-bit, accumulation, TP,
    ZeRO stages, the smallest world size): forked and serial lists are equal, in the same order."""
    from estimator import load_config
    from estimator.fit import alternatives
    from estimator.hardware import get_gpu
    from estimator.simulate import clear_caches

    cfg = load_config(overrides=["model.preset=llama-2-7b", "training.seq_len=1024"])
    clear_caches()
    shared = alternatives(cfg, get_gpu("a100-40gb"), None, 1)
    monkeypatch.setattr(forked, "can_fork", lambda: False)
    clear_caches()
    serial = alternatives(cfg, get_gpu("a100-40gb"), None, 1)
    assert shared == serial
    assert [a.change for a in serial] == [
        "--set training.activation_checkpointing=full", "-o adam8bit", "-p bf16",
        "-p bf16 --set training.master_weights=true", "-b 1 --set training.grad_accum_steps=2", "--parallel tp -n 4",
        "--parallel zero2 -n 8", "--parallel zero3 -n 8"]  # the smallest world size is zero3's 8: listed once


def test_no_process_to_spare_runs_the_tasks_here(forking: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork that fails (EAGAIN: the process limit) leaves the tasks to this process, in order."""
    def refused() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused)
    assert forked.run_all([lambda: 1, lambda: 2, os.getpid]) == [1, 2, os.getpid()]


def test_a_process_that_ignores_its_children_still_gets_the_answers(forking: None) -> None:
    """With SIGCHLD ignored the kernel reaps the child itself; the answers come through the pipe all the same."""
    import signal

    before = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        assert forked.run_all([lambda i=i: i * 3 for i in range(8)]) == [i * 3 for i in range(8)]
    finally:
        signal.signal(signal.SIGCHLD, before)
