"""Build the user's module for the trace: on fake tensors if its constructor allows, else for real and convert.

The fast path calls the factory under ``FakeTensorMode``: every parameter is a fake tensor from the
start, no memory is used, and a 7-billion-parameter model is built in seconds. Some constructors
cannot run there because they read tensor *values*, which fake tensors do not have:

* timm computes its stochastic-depth rates as ``[x.item() for x in torch.linspace(0, rate, depth)]``;
* torchvision's ``VisionTransformer`` initialises with ``nn.init.trunc_normal_``, whose CPU
  implementation reads a scalar (``aten._local_scalar_dense``);
* ``.tolist()``, ``.numpy()``, ``if tensor:`` and Python-side random numbers drawn from tensors.

The meta device does not help there either (``Tensor.item()`` cannot be called on meta tensors), so
the fallback is a real construction on the CPU, with the module's tensors then swapped for fake
copies (:func:`to_fake`): the same shapes, dtypes, strides, storage sharing (tied weights stay one
Parameter) and ``requires_grad``. The real construction is watched by a live-tensor tracker and
stopped once it holds more than :data:`RAM_SHARE` of the memory available (``MemAvailable``), so a
model too large to build for real gets one line saying so instead of exhausting the machine.

Errors name the user's code: :func:`user_location` walks the traceback to the innermost frame that
is neither torch's, estimator's nor the standard library's, so a failure deep inside an ATen op is
reported at the line of the constructor (or forward) that called it.
"""

from __future__ import annotations

import os
import sysconfig
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _disable_current_modes

from estimator.errors import EstimatorError
from estimator.measure.tracker import LiveTensorTracker

#: the real construction may use at most this share of the CPU memory available when it starts
RAM_SHARE = 0.5

_TORCH_DIR = os.path.dirname(torch.__file__)
_ESTIMATOR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STDLIB_DIR = sysconfig.get_paths()["stdlib"]


def _ours(filename: str) -> bool:
    """Frames of torch, estimator, the standard library (contextlib, functools) or generated code."""
    path = os.path.abspath(filename)
    if filename.startswith("<"):
        return True
    if path.startswith(_TORCH_DIR + os.sep) or path.startswith(_ESTIMATOR_DIR + os.sep):
        return True
    return path.startswith(_STDLIB_DIR + os.sep) and "site-packages" not in path


def user_location(exc: BaseException) -> str | None:
    """``file:line`` of the innermost traceback frame outside torch, estimator and the standard library."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not _ours(frame.filename):
            return f"{frame.filename}:{frame.lineno}"
    return None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (cut at 300 characters)."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:297] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def described(exc: BaseException) -> str:
    """:func:`one_line` and, where there is one, `` at file:line`` of the user's frame."""
    where = user_location(exc)
    return one_line(exc) + (f" at {where}" if where else "")


class _BoundedTracker(LiveTensorTracker):
    """A live-tensor tracker that stops the construction once it holds more than ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__("cpu")
        self.limit = limit

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.live_bytes > self.limit:
            raise _TooLarge(self.live_bytes)
        return out


class _TooLarge(Exception):
    def __init__(self, nbytes: int) -> None:
        super().__init__(f"{nbytes} bytes")
        self.nbytes = nbytes


def build_for_real(build: Callable[[], nn.Module], what: str, fake_failure: str, limit: int | None = None) -> nn.Module:
    """``build()`` on real CPU tensors, outside every dispatch mode, bounded to ``limit`` bytes.

    ``fake_failure`` (why the fake construction failed) is part of the error if this fails too.
    """
    from estimator.measure.step import free_bytes

    limit = int(RAM_SHARE * free_bytes("cpu")) if limit is None else limit
    with _disable_current_modes():
        tracker = _BoundedTracker(limit)
        try:
            with tracker:
                return build()
        except EstimatorError:
            raise
        except _TooLarge as exc:
            raise EstimatorError(
                f"model.module: {what} cannot be built on fake tensors ({fake_failure}), and building it for real "
                f"on the CPU passed {exc.nbytes:,} bytes, over the {limit:,} allowed ({RAM_SHARE:.0%} of the "
                "memory available); make the constructor run on fake tensors (docs/module.md)") from None
        except (Exception, SystemExit) as exc:
            raise EstimatorError(f"model.module: {what} raised {described(exc)}") from None


def module_tensors(module: nn.Module) -> list[Tensor]:
    """Every parameter, buffer and plain tensor attribute of ``module`` and its submodules."""
    found: list[Tensor] = []
    for sub in module.modules():
        found += [p for p in sub._parameters.values() if p is not None]
        found += [b for b in sub._buffers.values() if b is not None]
        found += [v for v in vars(sub).values() if isinstance(v, Tensor)]
    return found


def to_fake(module: nn.Module, fake: Any) -> list[Tensor]:
    """Make every parameter, buffer and tensor attribute of ``module`` a fake tensor of ``fake``; returns those
    it replaced with new ones.

    A real tensor gets ``fake.from_tensor``, which keeps shape, dtype, strides and storage sharing (two
    tensors on one storage get fakes on one fake storage). A fake tensor of *another* FakeTensorMode --
    ``copy.deepcopy`` under a FakeTensorMode makes those, and ``nn.TransformerEncoder`` deep-copies its
    layer -- would be taken for a constant and re-converted at every use (a new storage each time), so it
    gets a fresh ``empty_strided`` in ``fake``. A tensor reached twice (a tied weight) is converted once,
    so a tied Parameter stays one Parameter; entries of ``_parameters`` stay Parameters with their
    ``requires_grad``. The old tensors are released when the module no longer holds them.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    memo: dict[int, Tensor] = {}

    def convert(t: Tensor, parameter: bool) -> Tensor:
        if isinstance(t, FakeTensor) and t.fake_mode is fake:
            return t
        key = id(t)
        if key not in memo:
            if isinstance(t, FakeTensor):
                with fake:
                    copy = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
            else:
                copy = fake.from_tensor(t)
            memo[key] = nn.Parameter(copy, requires_grad=t.requires_grad) if parameter else copy
        return memo[key]

    with torch.no_grad():
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = convert(p, True)  # type: ignore[assignment]
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = convert(b, False)
            for name, value in list(vars(sub).items()):
                if isinstance(value, Tensor):  # a tensor kept as a plain attribute (a cache, a table)
                    vars(sub)[name] = convert(value, isinstance(value, nn.Parameter))
    return list(memo.values())
