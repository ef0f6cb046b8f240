"""The torch side of the module family: import the factory, trace one step on fake tensors.

Why fake tensors rather than plain ``device="meta"`` tensors: both have meta storages (shapes and
byte counts, no data, no memory), but a fake tensor reports the CPU as its device, so the step
dispatches like the real CPU step it stands for -- ``torch.autocast("cpu")`` works (autocast has no
meta backend) and ``F.scaled_dot_product_attention`` picks the CPU flash kernel (on meta it falls
back to the math path and saves the S x S probabilities). Observed with the live-tensor tracker,
the fake step allocates and frees the same storages as the real CPU step, byte for byte, except
where a real kernel's output storage differs from its meta kernel's: those are corrected in
``kernel_corrections.REAL_KERNEL_BYTES`` (``mse_loss`` returns a view of its unreduced buffer;
batch/group norm keep fp32 statistics for 16-bit inputs under autocast; the CPU LSTM keeps oneDNN's
workspace). ``allow_fallback_kernels=False``: an op without a meta kernel is an error, never a silent
run on real zero-filled tensors.

Construction: the factory is first called under ``FakeTensorMode`` (no memory, the fast path). A
constructor that cannot run there -- one that reads tensor values (timm's drop-path rates via
``.item()``, torchvision's ``trunc_normal_``), converts to NumPy, ... -- is then built for real on the
CPU (bounded by the RAM available) and its parameters, buffers and tensor attributes are converted
to fake tensors (``module_build.py``). An error that remains names the user's file and line.

Values: small integer tensors the step computes from constants (position ids, masks) are shadowed on
real tensors (``known_values.py``), so value reads and transformers' "am I traced?" checks on them go
the way they go in the real step.

FLOPs are counted in the same pass with FlopCounterMode's own formulas (``flop_registry``), not
with a FlopCounterMode: its module tracker keeps module outputs alive for backward hooks, and it
decomposes ops it has no formula for, so inside the trace it would change the memory being traced.

Shared with ``module_parts.py`` (verify) so the real step is the traced one: the factory call,
the dtype conversion, the batch and the loss.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from estimator.errors import EstimatorError
from estimator.events import Event, alloc, free
from estimator.families.base import ParamTensor
from estimator.families.module import (
    AUTOCAST_DTYPES,
    DATA_DTYPES,
    FLOAT_DTYPES,
    INTEGER_DTYPES,
    ModuleConfig,
    ModuleTrace,
    TensorSpec,
    resolve_spec,
)
from estimator.measure.dynamo_free import dynamo_free
from estimator.measure.kernel_corrections import (
    DISTINCT_OUTPUTS,
    REAL_KERNEL_BYTES,
    fp32_grouped_mm_meta,
    separate_outputs,
)
from estimator.measure.known_values import KnownValues, transformers_sees_values
from estimator.measure.module_build import build_for_real, described, module_tensors, to_fake, user_location
from estimator.measure.step import gc_frozen, gc_paused
from estimator.measure.tracker import ALLOC, EXISTING, FREE, RESIZE, LiveTensorTracker, MemoryEvent

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "bool": torch.bool,
}
_aten = torch.ops.aten
#: table lookups: a parameter read only through these does no multiply-add per token (6·B·P rule)
_LOOKUPS = {_aten.embedding.default, _aten._embedding_bag.default, _aten._embedding_bag_forward_only.default,
            _aten.index.Tensor, _aten.index_select.default}


# --------------------------------------------------------------------------- the factory
def load_factory(model: ModuleConfig) -> Callable[..., Any]:
    """Import ``package.module`` and get ``factory``; every failure is one line naming model.module.

    After installed packages, ``model.search_dir`` (the config file's directory by default) and then
    the current directory are searched, so a factory next to the config works from anywhere.
    """
    module_name, _, attr_path = model.module.partition(":")
    added = [d for d in dict.fromkeys([getattr(model, "search_dir", None), os.getcwd()]) if d and d not in sys.path]
    sys.path.extend(added)
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise EstimatorError(f"model.module: no module named {missing!r} (from {model.module!r}); "
                                 "is it installed, next to the config or in the current directory?") from None
        raise EstimatorError(f"model.module: importing {module_name!r} failed: {described(exc)}") from None
    except (Exception, SystemExit) as exc:  # the user's module raised (or called sys.exit) at import time
        raise EstimatorError(f"model.module: importing {module_name!r} raised {described(exc)}") from None
    finally:
        for folder in added:
            sys.path.remove(folder)
    obj: Any = mod
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise EstimatorError(f"model.module: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EstimatorError(f"model.module: {model.module!r} is not callable (got {type(obj).__name__})")
    return obj


def build_module(factory: Callable[..., Any], model: ModuleConfig, device: str | torch.device) -> nn.Module:
    """Call the factory with ``kwargs`` (and ``device=`` if it takes one); check it made a Module.

    A failure is one line: the exception and the user's file and line (``module_build.user_location``).
    """
    return _checked(call_factory(factory, model, device), model)


def _checked(module: Any, model: ModuleConfig) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise EstimatorError(f"model.module: {model.module} returned a {type(module).__name__}, "
                             "not a torch.nn.Module")
    return module


def call_factory(factory: Callable[..., Any], model: ModuleConfig, device: str | torch.device) -> Any:
    """``factory(**kwargs)`` (plus ``device=`` if it takes one); an exception becomes one EstimatorError line."""
    try:
        return factory(**factory_kwargs(factory, model, device))
    except EstimatorError:
        raise
    except (Exception, SystemExit) as exc:  # sys.exit() in user code is a failure, not our exit code
        raise EstimatorError(f"model.module: {model.module}(**kwargs) raised {described(exc)}") from None


def factory_kwargs(factory: Callable[..., Any], model: ModuleConfig, device: str | torch.device) -> dict[str, Any]:
    """``model.kwargs``, plus ``device=`` if the factory takes one."""
    kwargs = dict(model.kwargs)
    if _takes_device(factory):
        kwargs["device"] = device
    return kwargs


def _construct(factory: Callable[..., Any], model: ModuleConfig, fake: Any, tracker: _StepTracker
               ) -> tuple[nn.Module, str]:
    """The module on fake tensors, and how it was built: ``"fake"`` or ``"real"`` (module_build.py).

    Called with ``fake`` and ``tracker`` active. The fast path builds it under them; a constructor that
    fails there (it reads tensor values, ...) is built for real on the CPU, its tensors converted to fake
    ones and adopted by the tracker. If the real construction fails too, that error is the one reported.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    kwargs = factory_kwargs(factory, model, "cpu")
    try:
        module = _checked(factory(**kwargs), model)
    except EstimatorError:
        raise
    except (Exception, SystemExit) as exc:  # its traceback holds the half-built fake module until this block ends
        failure = described(exc)
    else:
        params = list(module.parameters())
        if params and not any(isinstance(p, FakeTensor) for p in params):
            return module, "fake"  # built before the factory was called: the caller refuses it
        # fake tensors of another mode (copy.deepcopy under FakeTensorMode: nn.TransformerEncoder clones its
        # layer) become ours, and everything the module holds is adopted as module state (module_build.to_fake)
        to_fake(module, fake)
        tracker.track_existing(module_tensors(module))
        return module, "fake"
    gc.collect()
    real = build_for_real(lambda: build_module(factory, model, "cpu"), f"{model.module}(**kwargs)", failure)
    to_fake(real, fake)
    tracker.track_existing(module_tensors(real))
    return real, "real"


def _takes_device(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "device" in params


def convert_floating(module: nn.Module, dtype: torch.dtype, buffers: bool = True) -> None:
    """``module.to(dtype)`` for fake tensors: ``_apply`` swaps fake parameters, which fails, so set ``.data``.

    Same semantics: floating parameters and buffers only; a tied parameter stays one Parameter.
    ``buffers`` False: parameters only (FSDP2's MixedPrecisionPolicy casts parameters, never buffers).
    """
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for sub in module.modules() if buffers else ():
            for key, buf in sub._buffers.items():
                if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                    sub._buffers[key] = buf.to(dtype)


# --------------------------------------------------------------------------- batch and loss
def make_tensor(spec: TensorSpec, device: str | torch.device) -> Tensor:
    """A random tensor of ``spec`` (integers in [0, high)); on fake tensors only the shape matters."""
    dtype = TORCH_DTYPES[spec.dtype]
    if spec.dtype in INTEGER_DTYPES:
        return torch.randint(0, spec.high or 2, spec.shape, dtype=dtype, device=device)
    if spec.dtype == "bool":
        return torch.randint(0, 2, spec.shape, device=device).bool()
    return torch.randn(spec.shape, dtype=dtype, device=device)


def first_output(pred: Any) -> Tensor:
    """The tensor the loss is computed on: the output, a tuple/list's first element, a mapping's
    ``logits`` (Hugging Face's ModelOutput) or else its first value."""
    if isinstance(pred, Mapping) and pred:
        pred = pred["logits"] if "logits" in pred else next(iter(pred.values()))
    elif isinstance(pred, (tuple, list)) and pred:
        pred = pred[0]
    if not isinstance(pred, Tensor):
        raise EstimatorError(f"model.module: forward returned a {type(pred).__name__}; the module family needs "
                             "a tensor (or a tuple/list/dict holding one first, or under 'logits')")
    return pred


def module_loss(kind: str) -> Callable[[Any, Tensor], Tensor]:
    """The configured loss of (forward's result, target); cross_entropy runs over the last dimension."""

    def loss_fn(pred: Any, target: Tensor) -> Tensor:
        out = first_output(pred)
        if kind == "sum":  # a scalar (a model that returns its own loss, e.g. transformers') is taken as is
            return out if out.dim() == 0 else out.sum()
        if kind == "mse":
            return F.mse_loss(out, target)
        classes = out.shape[-1]
        flat_target = target.reshape(-1, classes) if target.is_floating_point() else target.reshape(-1)
        return F.cross_entropy(out.reshape(-1, classes), flat_target)

    return loss_fn


def default_target(model: ModuleConfig, out: Tensor, precision: str) -> TensorSpec | None:
    """mse: the output's shape (the data dtype under autocast) | cross_entropy: class ids | sum: none."""
    if model.loss == "sum":
        return None
    if model.target is not None:
        return resolve_spec(model.target, precision)
    shape = tuple(out.shape)
    if model.loss == "cross_entropy":
        if not shape:
            raise EstimatorError("model.loss: cross_entropy needs an output with a class dimension, got a scalar")
        return TensorSpec(shape[:-1], "int64", shape[-1])
    dtype = DATA_DTYPES[precision] if precision in AUTOCAST_DTYPES else str(out.dtype).removeprefix("torch.")
    if dtype not in TORCH_DTYPES:
        raise EstimatorError(f"model.target: cannot make an mse target like the output ({dtype}); give model.target")
    return TensorSpec(shape, dtype)


# --------------------------------------------------------------------------- the tracker
class _StepTracker(LiveTensorTracker):
    """The live-tensor tracker plus what the family needs: where each storage came from.

    While ``watching``: the module that allocated each storage (for event names), which parameters
    the forward reads (for P), which storages are casts of parameters or inputs (autocast copies),
    and the real kernels' storage sizes where they differ from the meta kernels'.
    """

    def __init__(self) -> None:
        super().__init__("cpu")  # fake tensors report the CPU; their storages are meta
        self.watching = False
        self.leaves: dict[int, str | None] = {}  # id(storage) of parameters (-> name) and inputs (-> None)
        self.read_parameters: set[str] = set()
        self.casts: set[int] = set()  # sids
        self.real_bytes: dict[int, int] = {}  # sid -> bytes the real kernel's storage has
        self.where: dict[int, str] = {}  # sid -> module path
        self.modules: list[str] = []
        self.flops = 0  # FlopCounterMode's formulas, counted here (see run_trace)
        self.in_node = 0  # >0 while an autograd node's apply runs (node pre/post hooks, _engine_sums)
        self.in_linear = 0  # >0 while F.linear runs (_LinearBias): its bias add is in place in the real step
        self.known = KnownValues()  # small integer tensors computed from constants, shadowed (known_values.py)
        self.sums: list[tuple[int, int]] = []  # (output sid, old sid) of fan-in sums real autograd does in place
        self._correcting = False  # inside an op of REAL_KERNEL_BYTES: its zero-byte outputs get events too
        self._zero_sized: set[int] = set()  # sids of such outputs (the real kernel's may be larger)

    def sid_of(self, t: Tensor) -> int | None:
        """The tracker's id of the storage behind ``t`` (None if untracked)."""
        storages = self._storages(t)
        entry = self._entries.get(id(storages[0])) if storages else None
        return entry.sid if entry is not None else None

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.watching:  # a value read of a tensor the real step computes from constants: its real value
            done, value = self.known.read(func, args, kwargs or {})
            if done:
                return value
        self._correcting = self.watching and func in REAL_KERNEL_BYTES
        call = _SeparateOutputs(func) if func in DISTINCT_OUTPUTS else func
        try:
            out = super().__torch_dispatch__(call, types, args, kwargs)
        finally:
            self._correcting = False
        if self.watching:
            self.known.observe(func, args, kwargs or {}, out)
            self._observe(func, args, kwargs or {}, out)
            formula = flop_registry.get(getattr(func, "_overloadpacket", None))
            if formula is not None:
                self.flops += int(formula(*args, **(kwargs or {}), out_val=out))
        return out

    def _record(self, kind: str, entry: Any, nbytes: int, delta: int) -> None:
        """As the tracker's, but a zero-byte output of a corrected op (the meta kernel's empty LSTM
        workspace) gets its allocation and release recorded, so the real kernel's size can replace it."""
        if delta == 0 and kind in (ALLOC, FREE) and (self._correcting or entry.sid in self._zero_sized):
            self._zero_sized.add(entry.sid)
            self.events.append(MemoryEvent(kind, 0, 0, self.live_bytes, self._phase, entry.op, entry.sid,
                                           entry.shape, entry.dtype))
            return
        super()._record(kind, entry, nbytes, delta)

    def _observe(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        phase = self.phase
        if phase == "backward" and not self.in_node and func is _aten.add.Tensor and outs:
            self._engine_sum(args, outs[0])
        elif self.in_linear and func is _aten.add.Tensor and outs and phase in ("forward", "loss"):
            self._engine_sum(args, outs[0])  # F.linear's `output.add_(bias)`, made out of place here
        if phase == "forward" and self.modules:
            for t in outs:
                sid = self.sid_of(t)
                if sid is not None:
                    self.where.setdefault(sid, self.modules[-1])
        if phase in ("forward", "loss"):
            read = [self.leaves[id(st)] for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)
                    for st in self._storages(t) if id(st) in self.leaves]
            if read:
                computes = outs and func not in _LOOKUPS and not getattr(func, "is_view", False)
                if phase == "forward" and computes:  # not prim.device, views or table lookups
                    self.read_parameters.update(name for name in read if name is not None)
                if func is _aten._to_copy.default and outs:
                    sid = self.sid_of(outs[0])
                    if sid is not None:
                        self.casts.add(sid)
        fix = REAL_KERNEL_BYTES.get(func)
        if fix is not None:
            for index, nbytes in fix(args, kwargs, outs).items():
                sid = self.sid_of(outs[index])
                if sid is not None:
                    self.real_bytes[sid] = nbytes


    def _engine_sum(self, args: tuple, out: Tensor) -> None:
        """An ``add`` between two nodes: the engine summing a node's fan-in gradients (InputBuffer).

        Under any dispatch mode (this tracker, FakeTensorMode) ``InputBuffer::accumulate``
        (``torch/csrc/autograd/input_buffer.cpp``) always computes ``old + var``, because
        ``at::isTensorSubclassLike`` is true whenever a mode is active
        (``ATen/TensorSubclassLikeUtils.h``). The real step, with grad mode off, does
        ``old.add_(var)`` when ``can_accumulate_inplace(old)``: a plain tensor, non-overlapping and
        dense, whose TensorImpl and storage nobody else references (``use_count() == 1`` for both).
        Seen from here: ``old`` is dense, not a view (a view's base holds its storage too), and its
        storage dies as this sum replaces it in the buffer (checked in :func:`_in_place_sums`).
        """
        old = args[0] if args and isinstance(args[0], Tensor) else None
        if old is None or old._is_view() or not _dense(old) or old.shape != out.shape or old.dtype != out.dtype:
            return
        out_sid, old_sid = self.sid_of(out), self.sid_of(old)
        if out_sid is not None and old_sid is not None:
            self.sums.append((out_sid, old_sid))


class _LinearBias(TorchFunctionMode):
    """Mark the inside of ``F.linear`` for the tracker (``tracker.in_linear``).

    ``at::linear`` (``aten/src/ATen/native/Linear.cpp``) computes an input that is neither 2-D nor
    contiguous as ``output = at::matmul(input, weight.t())`` and then adds the bias *in place*,
    ``output.add_(bias)`` -- unless ``isTensorSubclassLike(bias)``, which a fake bias is, so the trace
    sees ``at::add(output, bias)`` and a second output-sized storage for a moment. The add is handed to
    the tracker's in-place bookkeeping (:func:`_in_place_sums`): the matmul's result, released right
    after the add, is the storage the real step adds into.
    """

    def __init__(self, tracker: _StepTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is not F.linear:
            return func(*args, **(kwargs or {}))
        self.tracker.in_linear += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.tracker.in_linear -= 1


class _SeparateOutputs:
    """``func`` whose aliased outputs are made separate storages as the real kernel's are
    (``kernel_corrections.separate_outputs``), before the tracker records them; named as ``func``."""

    def __init__(self, func: Any) -> None:
        self.func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return separate_outputs(self.func, self.func(*args, **kwargs))

    def __str__(self) -> str:
        return str(self.func)


def _dense(t: Tensor) -> bool:
    """``is_non_overlapping_and_dense`` (the layout ``can_accumulate_inplace`` asks for)."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    return bool(is_non_overlapping_and_dense_or_false(t))


@contextlib.contextmanager
def _node_hooks(tracker: _StepTracker, loss: Tensor) -> Iterator[None]:
    """Tell ``tracker`` when an autograd node's apply runs, so the engine's own sums stand out.

    Pre- and post-hooks on every node of ``loss``'s graph except AccumulateGrad (whose hooks would
    change its stealing rule, ``num_expected_refs``); they hold no tensor and change no lifetime.
    """
    def pre(_grads: Any) -> None:
        tracker.in_node += 1

    def post(_grads_in: Any, _grads_out: Any) -> None:
        tracker.in_node -= 1

    handles, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            handles += [node.register_prehook(pre), node.register_hook(post)]
        stack.extend(fn for fn, _ in node.next_functions)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _in_place_sums(tracker: _StepTracker, mark: int) -> dict[int, int]:
    """{output sid: old sid} of the engine's sums that the real step does in place.

    ``old`` qualifies if its storage is released right after the sum (before the next allocation):
    the input buffer held the only reference to it.
    """
    candidates = dict(tracker.sums)
    alloc_at = {ev.storage_id: i for i, ev in enumerate(tracker.events) if i >= mark and ev.kind == ALLOC}
    in_place: dict[int, int] = {}
    for out_sid, old_sid in candidates.items():
        start = alloc_at.get(out_sid)
        if start is None:
            continue
        for ev in tracker.events[start + 1:]:
            if ev.kind == FREE and ev.storage_id == old_sid:
                in_place[out_sid] = old_sid
                break
            if ev.kind in (ALLOC, RESIZE):
                break
    return in_place


@contextlib.contextmanager
def _module_paths(tracker: _StepTracker, root: nn.Module) -> Iterator[None]:
    """Keep ``tracker.modules`` as the stack of running submodules' names (global forward hooks)."""
    names = {id(m): name or type(root).__name__ for name, m in root.named_modules()}

    def push(module: nn.Module, _args: Any) -> None:
        tracker.modules.append(names.get(id(module), type(module).__name__))

    def pop(module: nn.Module, _args: Any, _out: Any) -> None:
        if tracker.modules:
            tracker.modules.pop()

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    handles = [register_module_forward_pre_hook(push), register_module_forward_hook(pop)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _stage(field: str, what: str) -> Iterator[None]:
    """Turn an exception inside one stage of the trace into one EstimatorError line."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
        UnsupportedOperatorException,
    )

    try:
        yield
    except EstimatorError:
        raise
    except UnsupportedOperatorException as exc:
        raise EstimatorError(f"model.module: {exc} has no meta kernel, so the step cannot be traced without "
                             f"running it (docs/module.md, limits){_at(exc)}") from None
    except (DataDependentOutputException, DynamicOutputShapeException) as exc:
        raise EstimatorError(f"model.module: {what} depends on tensor values{_at(exc)} ({exc}: `if tensor:`, "
                             ".item(), nonzero, ...), which a meta-device trace cannot know (docs/module.md, "
                             "limits)") from None
    except (Exception, SystemExit) as exc:
        raise EstimatorError(f"{field}: {what} failed: {described(exc)}") from None


def _at(exc: BaseException) -> str:
    where = user_location(exc)
    return f" at {where}" if where else ""


# --------------------------------------------------------------------------- FSDP2 units and hook marks
def fsdp_unit_modules(module: nn.Module, classes: tuple[str, ...] | None
                      ) -> tuple[dict[str, nn.Module], tuple[str, ...]]:
    """The submodules ``fully_shard`` wraps before the root (path -> module, forward order unknown here), and
    the class names chosen; the same on the fake trace and on the real ranks (``measure/distributed.py``).

    ``classes`` None: the most repeated class among the parameter-holding children of ``nn.ModuleList`` /
    ``nn.Sequential`` containers (torchtitan's and accelerate's per-block wrapping), else the most repeated
    parameter-holding class anywhere; a tie goes to the class met first in ``named_modules()`` (the
    outermost); a class must occur twice, else only the root is wrapped. Instances without parameters, and
    instances inside another chosen instance, are not units.
    """
    holds = {id(m): any(True for _ in m.parameters()) for m in module.modules()}
    named = [(name, m) for name, m in module.named_modules() if name]
    if classes is None:
        children = [c for _, m in [("", module), *named] if isinstance(m, (nn.ModuleList, nn.Sequential))
                    for c in m.children() if holds[id(c)]]
        classes = _most_repeated(children) or _most_repeated([m for _, m in named if holds[id(m)]])
    else:
        known = {type(m).__name__ for _, m in named}
        unknown = [c for c in classes if c not in known]
        if unknown:
            raise EstimatorError(f"parallel.fsdp_unit_class: the model has no submodule of class {unknown[0]!r} "
                                 f"(its classes: {', '.join(sorted(known)) or 'none'})")
    units: dict[str, nn.Module] = {}
    for name, m in named:
        if type(m).__name__ in classes and holds[id(m)] and not any(name.startswith(u + ".") for u in units):
            units[name] = m
    return units, classes


def _most_repeated(modules: list[nn.Module]) -> tuple[str, ...]:
    """The class name occurring most often (at least twice; ties: the first met), as a 1-tuple, or ()."""
    counts: dict[str, int] = {}
    for m in modules:
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    best = max(counts.values(), default=0)
    return tuple(name for name, c in counts.items() if c == best)[:1] if best >= 2 else ()


def unit_of_parameters(module: nn.Module, units: dict[str, nn.Module]) -> dict[str, str]:
    """{parameter name: its unit's path, or "root"}: the innermost chosen module that holds it.

    A parameter shared by two units is refused, as ``fully_shard`` refuses it (``_validate_no_duplicate_params``).
    """
    out: dict[str, str] = {}
    seen: dict[int, tuple[str, str]] = {}  # id(parameter) -> (first name, its unit)
    for name, p in module.named_parameters(remove_duplicate=False):
        owner = [u for u in units if name.startswith(u + ".")]
        unit = max(owner, key=len) if owner else "root"
        first = seen.setdefault(id(p), (name, unit))
        if first[1] != unit and "root" not in (first[1], unit):
            raise EstimatorError(f"parallel.fsdp_unit_class: parameter {first[0]!r} is shared by units {first[1]!r} "
                                 f"and {unit!r}; fully_shard needs a shared parameter in one unit (choose another "
                                 "class)")
        out.setdefault(first[0], first[1])
    return out


class _PostBackward(torch.autograd.Function):
    """FSDP2's ``RegisterPostBackwardFunction``: identity on a unit's inputs that need a gradient; its
    backward is the unit's post-backward."""

    @staticmethod
    def forward(ctx: Any, marks: _FSDPMarks, unit: str, *inputs: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN401
        ctx.marks, ctx.unit = marks, unit
        return inputs

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:  # noqa: ANN401
        ctx.marks.post_backward(ctx.unit)
        return (None, None, *grads)


class _FSDPMarks:
    """Where FSDP2's hooks run in the traced step, as (tracker event index, hook, unit), with the hooks
    ``fully_shard`` installs (torch 2.13 ``_fsdp_state.py``, ``_fsdp_param_group.py``): a forward pre-hook
    (pre-forward; ``RegisterPostBackwardFunction`` on the inputs that need a gradient), a forward hook
    (post-forward; ``register_hook`` on the outputs that need one: pre-backward), and the root's final
    callback queued by the first pre-backward, which runs the post-backward of every unit whose inputs
    needed no gradient, in ``named_modules()`` order (the root first). The hooks allocate nothing; the
    identity Function adds a node, as in the real step. ``cast``: the MixedPrecisionPolicy's param dtype,
    to which every pre-forward first casts the floating inputs (``_cast_forward_inputs``), as FSDP2 does."""

    def __init__(self, tracker: _StepTracker, root: nn.Module, units: dict[str, nn.Module],
                 cast: torch.dtype | None = None) -> None:
        self.tracker = tracker
        self.cast = cast
        self.modules = {"root": root, **units}
        self.marks: list[tuple[int, str, str]] = []
        self.forwards: dict[str, int] = {}
        self.backward_started: set[str] = set()
        self.backward_done: set[str] = set()
        self.queued = False

    def mark(self, kind: str, unit: str) -> None:
        self.marks.append((len(self.tracker.events), kind, unit))

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        handles = []
        for unit, m in self.modules.items():
            handles.append(m.register_forward_pre_hook(functools.partial(self._pre_forward, unit), prepend=True))
            handles.append(m.register_forward_hook(functools.partial(self._post_forward, unit)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _pre_forward(self, unit: str, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        self.forwards[unit] = self.forwards.get(unit, 0) + 1
        if self.forwards[unit] > 1:
            raise EstimatorError(f"parallel.fsdp_unit_class: unit {unit!r} runs its forward more than once in a "
                                 "step; the FSDP2 timeline is modelled for units that run once (choose another class)")
        flat, spec = tree_flatten(args)
        if self.cast is not None:  # _cast_fp_tensor: floating tensors of another dtype, before the unshard
            flat = [t.to(self.cast) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != self.cast
                    else t for t in flat]
        self.mark("pre_forward", unit)
        needs = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
        from torch.utils._pytree import tree_unflatten

        if not needs or not torch.is_grad_enabled():
            return tuple(tree_unflatten(flat, spec)) if self.cast is not None else args
        outs = _PostBackward.apply(self, unit, *(flat[i] for i in needs))
        for i, t in zip(needs, outs, strict=True):
            flat[i] = t
        return tuple(tree_unflatten(flat, spec))

    def _post_forward(self, unit: str, _module: nn.Module, _args: Any, output: Any) -> Any:  # noqa: ANN401
        self.mark("post_forward", unit)
        for t in tree_flatten(output)[0]:
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(functools.partial(self._pre_backward, unit))
        return output

    def _pre_backward(self, unit: str, grad: Tensor) -> Tensor:
        if not self.queued:
            self.queued = True
            from torch.autograd import Variable

            Variable._execution_engine.queue_callback(self._final_callback)
        if unit not in self.backward_started:
            self.backward_started.add(unit)
            self.mark("pre_backward", unit)
        return grad

    def post_backward(self, unit: str) -> None:
        if unit not in self.backward_done:
            self.backward_done.add(unit)
            self.mark("post_backward", unit)

    def _final_callback(self) -> None:
        for unit in self.modules:
            self.post_backward(unit)


def marks_at(marks: list[tuple[int, str, str]], positions: dict[int, int], end: int) -> list[tuple[int, str, str]]:
    """The marks with each tracker event index turned into the index of the family event it precedes."""
    return [(positions.get(index, end), kind, unit) for index, kind, unit in marks]


# --------------------------------------------------------------------------- the trace
@contextlib.contextmanager
def _quiet_fake_tensor_log() -> Iterator[None]:
    """FakeTensorMode logs a traceback when a meta kernel rejects the user's shapes; the user gets
    our one-line error instead (``_stage``), so that log is silenced while tracing."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_trace(model: ModuleConfig, precision: str, fsdp: bool = False,
              unit_classes: tuple[str, ...] | None = None, policy: bool = False) -> ModuleTrace:
    """Build the module on fake tensors and trace forward, loss and backward of one step.

    Everything alive before the trace (torch's and the user's imports: hundreds of thousands of objects)
    is frozen out of the cyclic collector while it runs, so the collections the trace needs (construction
    garbage must be gone before forward) scan only what the trace made: for a small module those full
    collections were most of the time that was ours. The objects are unfrozen afterwards. The modules
    ``FakeTensorMode`` imports on its first operator (``torch.fx.experimental.symbolic_shapes``, with sympy:
    about 100,000 objects) are imported before the freeze, so those collections do not scan them either
    (0.12 s to 0.01 s for a small module).

    ``torch._dynamo`` is not imported (``dynamo_free.py``): nothing in a trace compiles, and importing it
    costs up to 0.6x ``import torch`` again.

    ``fsdp``: trace with FSDP2's hooks on the units ``fully_shard`` would wrap (``unit_classes``, or the
    default of :func:`fsdp_unit_modules`) and the root, and return where they ran (``ModuleTrace.fsdp_marks``).
    ``policy``: as under FSDP2's MixedPrecisionPolicy, the parameters in ``precision``'s dtype and the
    buffers left in fp32.
    """
    with dynamo_free():
        importlib.import_module("torch.fx.experimental.symbolic_shapes")
        with gc_frozen():
            return _run_trace(model, precision, fsdp, unit_classes, policy)


def _run_trace(model: ModuleConfig, precision: str, fsdp: bool = False,
               unit_classes: tuple[str, ...] | None = None, policy: bool = False) -> ModuleTrace:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from estimator.measure.flop_formulas import register_sdpa_flops

    started = time.perf_counter()
    register_sdpa_flops()  # FlopCounterMode counts 0 for the CPU's SDPA kernel without it
    factory = load_factory(model)
    data_dtype = TORCH_DTYPES[DATA_DTYPES[precision]]
    amp = AUTOCAST_DTYPES.get(precision)
    tracker = _StepTracker()
    fake = FakeTensorMode(allow_fallback_kernels=False, allow_non_fake_inputs=True)
    with _quiet_fake_tensor_log(), fp32_grouped_mm_meta(), fake, tracker:
        module, built = _construct(factory, model, fake, tracker)
        with _stage("model.module", f"building {model.module}"):
            convert_floating(module, data_dtype, buffers=not policy)
        named = dict(module.named_parameters())
        real = [name for name, p in named.items() if not isinstance(p, FakeTensor)]
        if real:
            raise EstimatorError(f"model.module: {model.module} returned a module whose parameters exist already "
                                 f"({real[0]}, ...); the factory must create the module when called")
        # under FSDP2's MixedPrecisionPolicy the batch is made in fp32, like the fp32 model; the root casts it
        inputs_spec = tuple(resolve_spec(s, "fp32" if policy else precision) for s in model.inputs)
        inputs = [make_tensor(s, "cpu") for s in inputs_spec]
        target_spec = resolve_spec(model.target, "fp32" if policy else precision) if model.target is not None \
            else None
        target = make_tensor(target_spec, "cpu") if target_spec is not None else None
        gc.collect()

        param_sids = {tracker.sid_of(p): name for name, p in named.items()}
        tracker.leaves = {id(tracker._storages(p)[0]): name for name, p in named.items()}
        tracker.leaves.update({id(tracker._storages(t)[0]): None for t in inputs})
        skip = set(param_sids) | {tracker.sid_of(t) for t in inputs}
        if target is not None:
            skip.add(tracker.sid_of(target))
        state_events = _state_events(tracker, module, skip)
        skip |= {sid for sid, _ in tracker_live(tracker)}
        units, classes = fsdp_unit_modules(module, unit_classes) if fsdp else ({}, ())
        hooks = _FSDPMarks(tracker, module, units, data_dtype if policy else None) if fsdp else None
        unit_map = unit_of_parameters(module, units) if fsdp else {}

        saved: dict[int, str] = {}  # sid -> phase in which autograd saved it

        def pack(t: Tensor) -> Tensor:
            sid = tracker.sid_of(t)
            if sid is not None:
                saved.setdefault(sid, tracker.phase)
            return t

        loss_fn = module_loss(model.loss)
        autocast = (torch.autocast("cpu", dtype=TORCH_DTYPES[amp]) if amp else contextlib.nullcontext())
        mark = len(tracker.events)
        with gc_paused():
            tracker.watching = True
            tracker.set_phase("forward")
            with _module_paths(tracker, module), autocast, torch.autograd.graph.saved_tensors_hooks(pack, _unpack), \
                    _LinearBias(tracker), transformers_sees_values(tracker.known), \
                    hooks.installed() if hooks else contextlib.nullcontext():
                with _stage("model.inputs", f"{model.module} forward on inputs {_shapes(inputs_spec)}"):
                    pred = module(*inputs)
                out = first_output(pred)
                if target is None:
                    target_spec = default_target(model, out, precision)
                    if policy and target_spec is not None and target_spec.dtype in FLOAT_DTYPES:
                        target_spec = TensorSpec(target_spec.shape, "float32")  # the fp32 model's target
                    if target_spec is not None:
                        target = make_tensor(target_spec, "cpu")
                        skip.add(tracker.sid_of(target))
                tracker.set_phase("loss")
                with _stage("model.loss", f"{model.loss} of output {tuple(out.shape)} {_dtype(out)}"
                                          + (f" and target {tuple(target.shape)} {_dtype(target)}" if target is not None
                                             else "")):
                    loss = loss_fn(pred, target if target is not None else torch.empty(0))
            matmul_forward = tracker.flops
            tracker.set_phase("backward")
            with _stage("model.module", "backward"), _node_hooks(tracker, loss), \
                    transformers_sees_values(tracker.known):
                loss.backward()
            missing = [u for u in units if hooks is not None and u not in hooks.forwards]
            if missing:
                raise EstimatorError(f"parallel.fsdp_unit_class: unit {missing[0]!r} "
                                     f"({type(units[missing[0]]).__name__}) does not run in the forward; "
                                     "choose a class whose instances all run")
            matmul = tracker.flops
            tracker.watching = False
            grads = {}
            trainable: set[str] = set()
            for name, p in named.items():
                if p.grad is not None:
                    trainable.add(name)
                    grads[tracker.sid_of(p.grad)] = (name, p.numel() * p.element_size())
            tracker.set_phase("zero_grad")
            for p in named.values():
                p.grad = None
            out_numel, out_last = out.numel(), (out.shape[-1] if out.dim() else 1)
            del pred, out, loss
        positions: dict[int, int] = {}
        step, end = _step_events(tracker, mark, skip, grads, saved, _in_place_sums(tracker, mark), positions)
        parameters = tuple(ParamTensor(name, tuple(p.shape), name in trainable) for name, p in named.items())
        read = sum(p.numel() for name, p in named.items() if name in tracker.read_parameters)
        forward_saved = sum(tracker.real_bytes.get(sid, nbytes) for sid, nbytes in _saved_sizes(tracker, saved)
                            if saved[sid] == "forward" and sid not in skip and sid not in tracker.casts
                            and sid not in grads)
        del module, named, inputs, target
    if model.loss == "cross_entropy" and target_spec is not None and target_spec.dtype in INTEGER_DTYPES:
        tokens = target_spec.numel
    elif model.loss == "cross_entropy":
        tokens = out_numel // max(out_last, 1)
    else:
        tokens = inputs_spec[0].shape[0] if inputs_spec[0].shape else 1
    return ModuleTrace(
        precision=precision,
        parameters=parameters,
        inputs=inputs_spec,
        target=target_spec,
        state_events=tuple(state_events),
        step_events=tuple(step),
        end_events=tuple(end),
        forward_saved_bytes=forward_saved,
        flop_tokens=tokens,
        flop_parameters=read,
        matmul_forward=matmul_forward,
        matmul=matmul,
        seconds=time.perf_counter() - started,
        construction=built,
        fsdp_marks=tuple(marks_at(hooks.marks, positions, len(step))) if hooks else (),
        fsdp_units=tuple(unit_map.items()),
        fsdp_classes=classes,
    )


def _unpack(t: Tensor) -> Tensor:
    return t


def _shapes(specs: tuple[TensorSpec, ...]) -> str:
    return "[" + ", ".join(f"{list(s.shape)} {s.dtype}" for s in specs) + "]"


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def tracker_live(tracker: LiveTensorTracker) -> list[tuple[int, int]]:
    """(sid, bytes) of every storage the tracker sees alive now."""
    with tracker._lock:
        return [(e.sid, e.nbytes) for e in tracker._entries.values()]


def _saved_sizes(tracker: _StepTracker, saved: dict[int, str]) -> list[tuple[int, int]]:
    """(sid, bytes) of the saved storages, from their allocation records."""
    sizes = {e.storage_id: e.nbytes for e in tracker.events if e.kind in (ALLOC, EXISTING)}
    return [(sid, sizes[sid]) for sid in saved if sid in sizes]


def _state_events(tracker: _StepTracker, module: nn.Module, skip: set[int]) -> list[Event]:
    """Storages the built module holds besides its parameters: buffers by name, others by number."""
    buffers = {}
    for name, buf in module.named_buffers():
        sid = tracker.sid_of(buf)
        if sid is not None:
            buffers.setdefault(sid, name)
    return [alloc(f"buffer:{buffers[sid]}" if sid in buffers else f"module_state#{sid}", "parameter", nbytes, "setup")
            for sid, nbytes in tracker_live(tracker) if sid not in skip]


def _step_events(
    tracker: _StepTracker,
    mark: int,
    skip: set[int],
    grads: dict[int | None, tuple[str, int]],
    saved: dict[int, str],
    in_place: dict[int, int] | None = None,
    positions: dict[int, int] | None = None,
) -> tuple[list[Event], list[Event]]:
    """The tracker's records of the step as family events: (forward/loss/backward, end of step).

    Gradient storages keep their allocation (renamed ``{param}.grad``); their release belongs to
    ``zero_grad`` (simulate.py). Whatever is still alive at the end (besides gradients) is released
    with the output and the loss, so every step starts from the same state. ``in_place`` maps the
    output of each fan-in sum the real step does in place (:func:`_in_place_sums`) to the buffer it
    adds into: the output's allocation and the buffer's release are dropped, and the output's later
    records are the buffer's (it may become a parameter's ``.grad``, which AccumulateGrad steals).
    ``positions`` (filled if given): each tracker event index -> the index in the step list it precedes.
    """
    in_place = in_place or {}

    def root(sid: int) -> int:
        while sid in in_place:
            sid = in_place[sid]
        return sid

    consumed = set(in_place.values())
    saved_roots = {root(sid) for sid in saved}  # a storage added into in place is saved if its result is
    grads = {root(sid) if sid is not None else sid: value for sid, value in grads.items()}
    step: list[Event] = []
    end: list[Event] = []
    live: dict[int, tuple[str, str, int]] = {}
    excess: list[Event] = []
    resized: dict[int, int] = {}
    for index, ev in enumerate(tracker.events[mark:], start=mark):
        if positions is not None:
            positions[index] = len(step)
        if ev.kind == EXISTING or ev.storage_id in skip:
            continue
        if (ev.kind == ALLOC and ev.storage_id in in_place) or (ev.kind == FREE and ev.storage_id in consumed):
            continue  # the real step adds into the buffer instead
        sid = root(ev.storage_id)
        out = end if ev.phase == "zero_grad" else step
        if sid in grads:
            if ev.kind == ALLOC:
                name, expected = grads[sid]
                step.append(alloc(f"{name}.grad", "gradient", expected, ev.phase))
                actual = tracker.real_bytes.get(sid, ev.nbytes)
                if actual > expected:  # a gradient that is a view of a bigger storage
                    extra = alloc(f"{name}.grad.storage", "temporary", actual - expected, ev.phase)
                    step.append(extra)
                    excess.append(free(extra.name, extra.role, extra.nbytes, "zero_grad"))
            continue
        role = "activation" if sid in saved_roots else "temporary"
        if ev.kind == ALLOC and not tracker.real_bytes.get(sid, ev.nbytes):
            continue  # a zero-byte output of a corrected op that the real kernel leaves empty too
        if ev.kind == ALLOC:
            prefix = tracker.where.get(sid, ev.phase)
            name = f"{prefix}:{ev.op.removeprefix('aten.').removesuffix('.default')}#{sid}"
            live[sid] = (name, role, tracker.real_bytes.get(sid, ev.nbytes))
            out.append(alloc(*live[sid], ev.phase))
        elif ev.kind == FREE and sid in live:
            out.append(free(*live.pop(sid), ev.phase))
        elif ev.kind == RESIZE and sid in live:
            name, role, nbytes = live.pop(sid)
            out.append(free(name, role, nbytes, ev.phase))
            resized[sid] = resized.get(sid, 0) + 1
            live[sid] = (f"{name.split('~')[0]}~{resized[sid]}", role, ev.nbytes)
            if ev.nbytes:
                out.append(alloc(*live[sid], ev.phase))
            else:
                live.pop(sid)
    end += [free(name, role, nbytes, "zero_grad") for name, role, nbytes in live.values()]
    return step, end + excess
