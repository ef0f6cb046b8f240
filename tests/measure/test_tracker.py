"""The live-tensor tracker, checked against byte counts worked out by hand and against the process RSS."""

from __future__ import annotations

import gc
import re
from pathlib import Path

import pytest
import torch

from estimator.measure.mlp import build_cruncher
from estimator.measure.tracker import LiveTensorTracker


def kinds(tracker: LiveTensorTracker) -> list[tuple[str, int, str]]:
    return [(e.kind, e.delta, e.op) for e in tracker.events]


def test_factory_ops_views_inplace_and_frees() -> None:
    tr = LiveTensorTracker()
    with tr:
        a = torch.randn(1000)  # 4000 bytes
        b = torch.zeros_like(a)  # 4000
        c = torch.empty(10, dtype=torch.float64)  # 80
        d = torch.tensor([1.0, 2.0])  # 8, surfaces as aten.lift_fresh
        assert tr.live_bytes == 8088
        views = [a[::2], a.view(10, 100), a.detach(), b.unsqueeze(0), b.expand(3, 1000)]
        a.add_(1.0)
        b.mul_(2.0)
        views[0].zero_()  # in place through a view: same storage
        assert tr.live_bytes == 8088
        del a  # the views still hold the storage
        assert tr.live_bytes == 8088
        del views[:3]
        assert tr.live_bytes == 4088  # a's storage released with its last view
        del c, d
        assert tr.live_bytes == 4000
        del b, views
    assert tr.live_bytes == 0
    assert tr.peak_bytes == 8088
    assert kinds(tr) == [
        ("alloc", 4000, "aten.randn.default"),
        ("alloc", 4000, "aten.zeros_like.default"),
        ("alloc", 80, "aten.empty.memory_format"),
        ("alloc", 8, "aten.lift_fresh.default"),
        ("free", -4000, "aten.randn.default"),
        ("free", -80, "aten.empty.memory_format"),
        ("free", -8, "aten.lift_fresh.default"),
        ("free", -4000, "aten.zeros_like.default"),
    ]
    assert [live for _, live in tr.timeline] == [4000, 8000, 8080, 8088, 4088, 4008, 4000, 0]


def test_resize_set_and_out_arguments() -> None:
    tr = LiveTensorTracker()
    with tr:
        x = torch.ones(100)  # 400
        out = torch.empty(0)  # 0 bytes: tracked, no event
        torch.add(x, 1.0, out=out)  # out= resizes the storage: 0 -> 400
        assert tr.live_bytes == 800
        out.resize_(200)  # grows: 400 -> 800
        assert tr.live_bytes == 1200
        out.resize_(50)  # a shrinking resize_ keeps the storage
        assert tr.live_bytes == 1200
        out.untyped_storage().resize_(0)  # not an ATen op; the tracker patches it
        assert tr.live_bytes == 400
        t = torch.ones(10)  # 40
        t.set_(x.untyped_storage(), 0, (100,))  # t now shares x's storage; its own 40 bytes die
        assert tr.live_bytes == 400
        e = torch.ones(5)  # 20
        e.set_()  # empty storage
        assert tr.live_bytes == 400
    assert [(e.kind, e.delta) for e in tr.events] == [
        ("alloc", 400),
        ("resize", 400),
        ("resize", 400),
        ("resize", -800),
        ("alloc", 40),
        ("free", -40),
        ("alloc", 20),
        ("free", -20),
    ]
    assert tr.peak_bytes == 1200


def test_backward_is_seen_and_accumulate_grad_steals() -> None:
    tr = LiveTensorTracker()
    with tr:
        w = torch.randn(256, requires_grad=True)  # 1024
        tr.phase = "forward"
        y = (w * 3.0).sum()  # mul 1024 (not saved: its backward needs only the scalar), sum 4
        assert tr.live_bytes == 1028
        tr.phase = "backward"
        y.backward()  # ones_like 4, grad = 3 * ones: mul 1024 becomes w.grad (stolen), ones freed
        assert tr.live_bytes == 2052
        grad_ptr = w.grad.data_ptr()
        (w * 3.0).sum().backward()  # existing grad: accumulated in place, the new one freed
        assert w.grad.data_ptr() == grad_ptr
        assert tr.live_bytes == 2052  # w, y, w.grad: the second loss and gradient are gone
    backward = [(e.kind, e.delta, e.op) for e in tr.events if e.phase == "backward"]
    assert backward[:3] == [
        ("alloc", 4, "aten.ones_like.default"),
        ("alloc", 1024, "aten.mul.Tensor"),  # the gradient, kept as w.grad without a copy
        ("free", -4, "aten.ones_like.default"),
    ]
    assert not any("clone" in e.op or "copy" in e.op or "empty_strided" in e.op for e in tr.events)
    assert tr.phase_peaks["forward"] == 2052  # the mul output and the sum
    assert ("aten.mul.Tensor", 1024, (256,), "float32") in tr.live_storages()


def test_accumulate_grad_copies_a_gradient_with_the_wrong_layout() -> None:
    tr = LiveTensorTracker()
    with tr:
        w = torch.randn(4, 8, requires_grad=True)  # 128
        c = torch.randn(8, 4)  # 128
        (w.t() * c).sum().backward()  # grad of w.t() is contiguous (8, 4); w.grad must be (4, 8) row-major
    # the incoming gradient (mul, contiguous (8, 4)) seen as w's gradient is a transposed view, so
    # AccumulateGrad copies it into w's layout (new_empty_strided + copy_) and drops the original
    assert [(e.kind, e.delta, e.op) for e in tr.events] == [
        ("alloc", 128, "aten.randn.default"),
        ("alloc", 128, "aten.randn.default"),
        ("alloc", 128, "aten.mul.Tensor"),  # w.t() * c, not saved (its backward needs only c)
        ("alloc", 4, "aten.sum.default"),
        ("free", -128, "aten.mul.Tensor"),
        ("alloc", 4, "aten.ones_like.default"),
        ("alloc", 128, "aten.mul.Tensor"),  # grad of w.t(): ones * c
        ("alloc", 128, "aten.new_empty_strided.default"),  # the copy that becomes w.grad
        ("free", -128, "aten.mul.Tensor"),
        ("free", -4, "aten.ones_like.default"),
        ("free", -4, "aten.sum.default"),
    ]
    assert w.grad.stride() == w.stride()
    assert tr.live_bytes == 128 + 128 + 128  # w, c, w.grad


def test_foreach_ops() -> None:
    tr = LiveTensorTracker()
    with tr:
        ts = [torch.ones(10), torch.ones(20)]  # 40 + 80
        out = torch._foreach_add(ts, 1.0)  # two new tensors: 120
        torch._foreach_mul_(ts, 2.0)  # in place: nothing
        assert tr.live_bytes == 240
        del out
        assert tr.live_bytes == 120


def test_phases_peaks_timeline_and_reset() -> None:
    tr = LiveTensorTracker()
    with tr:
        tr.phase = "a"
        x = torch.empty(100)  # 400
        tr.phase = "b"
        y = torch.empty(200)  # 800
        del y
        tr.set_phase("c")  # no allocation: its peak is what was live when it began
        assert tr.phase_peaks == {"setup": 0, "a": 400, "b": 1200, "c": 400}
        del x
    assert tr.timeline == [("a", 400), ("b", 1200), ("b", 400), ("c", 0)]
    assert [e.live_bytes for e in tr.events] == [400, 1200, 400, 0]
    assert [e.storage_id for e in tr.events] == [0, 1, 1, 0]
    assert tr.peak_bytes == 1200
    tr.reset_peak()
    assert (tr.peak_bytes, tr.phase_peaks) == (0, {"c": 0})


def test_track_existing_and_first_touch_of_untracked_tensors() -> None:
    p = torch.randn(100)  # made before tracking: 400
    q = p[10:]  # a view of it
    other = torch.ones(10)  # also before, but not adopted: 40
    tr = LiveTensorTracker()
    assert tr.track_existing([p, q, None]) == 400
    with tr:
        p.mul_(2.0)
        r = p + 1  # 400
        assert tr.live_bytes == 800
        other.add_(1.0)  # an untracked storage seen in place is adopted at first touch
        assert tr.live_bytes == 840
    assert [e.kind for e in tr.events] == ["existing", "alloc", "existing"]
    del p, q, r, other  # frees are seen through weak references, after the with block too
    assert tr.live_bytes == 0


def test_other_devices_are_ignored_and_meta_can_be_tracked() -> None:
    tr = LiveTensorTracker("cuda")  # constructing the device needs no GPU
    with tr:
        x = torch.randn(100)
        del x
    assert tr.peak_bytes == 0 and tr.events == []
    meta = LiveTensorTracker("meta")
    with meta:
        a = torch.empty(1000, device="meta")
        b = a * 2
        del a, b
    assert meta.peak_bytes == 8000 and meta.live_bytes == 0


def test_optimizer_foreach_adam_state_is_counted() -> None:
    tr = LiveTensorTracker()
    with tr:
        w = torch.nn.Parameter(torch.randn(1000))  # 4000
        opt = torch.optim.Adam([w], foreach=True)
        w.grad = torch.ones(1000)  # 4000
        opt.step()  # exp_avg, exp_avg_sq 4000 each + the 'step' scalar 4; temporaries freed
    assert tr.live_bytes == 4000 + 4000 + 8000 + 4
    assert tr.peak_bytes > tr.live_bytes  # the foreach update allocates temporaries


# --------------------------------------------------------------------------- against the kernel's view
def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    assert match, field
    return int(match.group(1)) * 1024


def _reset_high_water_mark() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset VmHWM: {exc}")


def _adam_step(dim: int, layers: int, batch: int) -> LiveTensorTracker:
    tr = LiveTensorTracker()
    with tr:
        model = build_cruncher(dim, layers)
        x, y = torch.randn(batch, dim), torch.randn(batch)
        opt = torch.optim.Adam(model.parameters())
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del model, x, y, opt
    return tr


def test_peak_matches_rss_high_water_mark() -> None:
    """Tensors of 64 MiB are mmap'd and munmap'd by glibc one by one, so RSS follows live bytes."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    _adam_step(64, 2, 8)  # load the code paths (and their pages) once
    gc.collect()
    _reset_high_water_mark()
    baseline = _status_bytes("VmHWM")
    tr = _adam_step(4096, 4, 8)  # 4 x 64 MiB weights; peak ~ params + grads + 2 states + 3 temporaries
    growth = _status_bytes("VmHWM") - baseline
    assert tr.peak_bytes > 1_200 * 2**20
    assert abs(growth - tr.peak_bytes) / tr.peak_bytes < 0.03, (growth, tr.peak_bytes)
