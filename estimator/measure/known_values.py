"""Values the traced step can know: small integer tensors computed from constants, shadowed on real tensors.

A fake tensor has no values, so library code that asks one (``.all()``, ``.item()``, ``if t:``) either
stops the trace or -- when it first asks "am I being traced?" -- takes another path than the real step.
transformers 5.24 does the latter in training: ``masking_utils.find_packed_sequence_indices`` checks
whether ``position_ids`` (an ``arange``) describe packed sequences, but only ``if not is_tracing(...)``;
``is_tracing`` (``transformers/utils/import_utils.py``) is true for any ``FakeTensor``, so the trace
keeps a packed-sequence mask, builds an explicit attention mask from it and calls SDPA with that mask
and ``repeat_kv``'d keys and values, where the real step finds no packing, passes ``is_causal`` and
``enable_gqa`` and saves neither the mask nor the repeated k/v (Qwen2 and Llama with GQA: the
issue's 2--8% overestimate).

The real step computes those tensors from constants, so the trace can too: :class:`KnownValues`
runs every op whose tensor arguments all have known values, and whose outputs are small
non-floating tensors, a second time on real CPU tensors ("shadows"), starting from deterministic
factories (``arange``, ``zeros``, ``ones``, ``full``, ...) and real constants. A value-reading op
(``_local_scalar_dense``, ``is_nonzero``) on a known tensor then answers with the real value instead
of raising, and :func:`transformers_sees_values` tells transformers' ``is_tracing`` that a known
tensor is not a tracing tensor -- only while the trace runs, only for known tensors. Random inputs
and anything computed from them stay unknown, as before. Mutating a known tensor with an unknown
value forgets every shadow (conservative).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

_aten = torch.ops.aten
#: the largest output (elements) shadowed: masks and position ids of a batch, not activations
LIMIT = 1 << 16
#: factories whose values do not depend on anything but their arguments (no RNG, no uninitialised memory)
FACTORIES = {_aten.arange.default, _aten.arange.start, _aten.arange.start_step, _aten.zeros.default,
             _aten.ones.default, _aten.full.default, _aten.scalar_tensor.default, _aten.linspace.default,
             _aten.eye.default, _aten.lift_fresh.default, _aten.lift_fresh_copy.default,
             _aten.zeros_like.default, _aten.ones_like.default, _aten.full_like.default}
#: ops that read a value out of a tensor
READS = {_aten._local_scalar_dense.default, _aten.is_nonzero.default}


class KnownValues:
    """Real shadows of the fake tensors whose values the trace can know (fake tensor -> real tensor).

    Keyed by ``id`` with a weak reference to the fake tensor (a tensor's ``==`` is elementwise, so
    tensors cannot be dictionary keys of a ``WeakKeyDictionary`` safely); an entry dies with its tensor.
    """

    def __init__(self) -> None:
        self._values: dict[int, tuple[weakref.ref, Tensor]] = {}

    def get(self, t: Any) -> Tensor | None:
        """The real shadow of ``t``, or None."""
        entry = self._values.get(id(t)) if isinstance(t, Tensor) else None
        return entry[1] if entry is not None and entry[0]() is t else None

    def _set(self, t: Tensor, real: Tensor) -> None:
        key = id(t)
        self._values[key] = (weakref.ref(t, lambda _ref, key=key: self._values.pop(key, None)), real)

    def __contains__(self, t: object) -> bool:
        return self.get(t) is not None

    def _shadow(self, t: Any) -> Any:
        real = self.get(t)
        return t if real is None else real  # a real (non-fake) constant is its own value

    def _known(self, t: Tensor) -> bool:
        from torch._subclasses.fake_tensor import FakeTensor

        return not isinstance(t, FakeTensor) or t in self

    def read(self, func: Any, args: tuple, kwargs: dict) -> tuple[bool, Any]:
        """(True, the real answer) for a value-reading op on a known tensor, else (False, None)."""
        real = self.get(args[0]) if func in READS and args else None
        if real is None:
            return False, None
        with _disable_current_modes():
            return True, func(real, *args[1:], **kwargs)

    def observe(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """After the fake op ran: shadow its outputs if every tensor argument is known.

        Called for every op of the trace, so the common cases leave early: nothing known yet and not a
        factory, or a floating/large output of an op that mutates nothing.
        """
        if not self._values and func not in FACTORIES:
            return
        outs = [out] if isinstance(out, Tensor) else [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        small = bool(outs) and not any(t.is_floating_point() or t.is_complex() or t.numel() > LIMIT for t in outs)
        mutates = bool(getattr(func, "_schema", None)) and func._schema.is_mutable
        if not small and not mutates:
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if not small or not all(self._known(t) for t in inputs) or (not inputs and func not in FACTORIES):
            if mutates and any(t in self for t in inputs):
                self._values.clear()  # a known tensor changed to something unknown
            return
        with _disable_current_modes():
            real_args, real_kwargs = tree_map(self._shadow, (args, kwargs))
            try:
                real = func(*real_args, **real_kwargs)
            except Exception:  # the shadow cannot be computed: the value stays unknown
                return
        for fake_t, real_t in zip(outs, [t for t in tree_flatten(real)[0] if isinstance(t, Tensor)], strict=False):
            if fake_t.shape == real_t.shape:
                self._set(fake_t, real_t)


@contextlib.contextmanager
def transformers_sees_values(known: KnownValues) -> Iterator[None]:
    """While the trace runs: transformers' ``is_fake_tensor`` (behind ``is_tracing``) is false for known tensors.

    Only if transformers is imported already (the user's module is one of its models); restored after.
    """
    module = sys.modules.get("transformers.utils.import_utils")
    original = getattr(module, "is_fake_tensor", None)
    if module is None or original is None:
        yield
        return

    def is_fake_tensor(x: Any) -> bool:
        return bool(original(x)) and x not in known

    module.is_fake_tensor = is_fake_tensor
    try:
        yield
    finally:
        module.is_fake_tensor = original
