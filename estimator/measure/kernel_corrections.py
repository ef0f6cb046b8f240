"""Where a real CPU kernel's output storage is not what its meta (fake) kernel says: the table the trace applies.

The module family traces on fake tensors, whose storages have the sizes the *meta* kernels give. For
most ops that is exactly what the real kernel allocates (checked op by op, docs/module.md). These are
the known exceptions, each a function ``(args, kwargs, fake outputs) -> {output index: real bytes}``
(an empty dict: nothing to correct for these arguments). ``tests/test_trace_kernels.py`` runs every
entry's real kernel on real tensors and checks the bytes it returns against the function.

* ``aten.mse_loss`` (mean/sum): the real kernel computes the unreduced ``(input - target)²`` in a
  buffer of the broadcast shape and returns a 0-d *view* of it (``aten/src/ATen/native/Loss.cpp``,
  ``mse_loss``: ``at::mean(loss)`` on an ``at::empty`` of the broadcast shape, then ``as_strided``);
  the meta kernel returns a fresh 0-d tensor.
* ``aten.native_batch_norm`` / ``aten.native_group_norm`` with a 16-bit input and fp32 weights
  (autocast's recipe): the CPU kernels keep mean and inverse std in fp32 (``batch_norm_cpu`` uses the
  accumulate type, ``at::opmath_type``); the meta kernels give them the input's dtype.
* ``aten.mkldnn_rnn_layer`` (``nn.LSTM`` on the CPU, one call per layer and direction): the real kernel
  returns oneDNN's training *workspace* (output 3, a uint8 tensor saved for backward); the meta kernel
  (``torch/_meta_registrations.py``, ``mkldnn_rnn_layer``) returns 0 bytes. Its size is oneDNN's
  (:func:`lstm_workspace_bytes`).
* ``aten.mkldnn_rnn_layer_backward``: the meta kernel returns one tensor for both bias gradients, the
  real kernel two (:data:`DISTINCT_OUTPUTS`, applied by :func:`separate_outputs`).
* ``aten._grouped_mm`` (transformers 5's default MoE experts): the meta kernel refuses fp32 inputs
  (``_meta_grouped_mm_common`` mirrors the CUDA kernel's bf16-only check) where the CPU kernel computes
  them; during a trace an fp32 call gets the meta kernel's output tensor, shaped and strided as the real
  one (:func:`fp32_grouped_mm_meta`; checked against the real kernel in the tests).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

_aten = torch.ops.aten
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
#: oneDNN rounds every part of an RNN workspace up to a page (``rnn_utils::set_offsets``, ``page_size = 4096``)
ONEDNN_PAGE = 4096

Correction = Callable[[tuple, dict, list[Tensor]], dict[int, int]]


def mse_loss_bytes(args: tuple, kwargs: dict, outs: list[Tensor]) -> dict[int, int]:
    """mse_loss (mean/sum) returns a view of its unreduced, broadcast-shaped buffer."""
    reduction = args[2] if len(args) > 2 else kwargs.get("reduction", 1)
    if not reduction:
        return {}
    numel = torch.broadcast_shapes(args[0].shape, args[1].shape).numel()
    return {0: numel * outs[0].element_size()}


def norm_stats_bytes(args: tuple, kwargs: dict, outs: list[Tensor]) -> dict[int, int]:
    """Batch/group norm keep fp32 mean and inverse std for a 16-bit input with fp32 weights (autocast)."""
    x, weight = args[0], args[1] if len(args) > 1 else None
    if x.dtype in _SIXTEEN_BIT and isinstance(weight, Tensor) and weight.dtype == torch.float32:
        return {i: outs[i].numel() * 4 for i in (1, 2) if len(outs) > i and outs[i].numel()}
    return {}


def onednn_good_ld(dim: int, itemsize: int) -> int:
    """oneDNN's leading dimension for a GEMM operand (``rnn_utils::get_good_ld``): rounded up to 64 bytes,
    plus 64 bytes more if the result is a multiple of 256 elements (avoids 4K aliasing)."""
    step = 64 // itemsize
    ld = -(-dim // step) * step
    return ld + step if ld % 256 == 0 else ld


def _page(nbytes: int) -> int:
    return -(-nbytes // ONEDNN_PAGE) * ONEDNN_PAGE


def lstm_workspace_bytes(batch: int, steps: int, input_size: int, hidden: int, itemsize: int = 4) -> int:
    """Bytes of the workspace oneDNN's vanilla LSTM keeps for backward, for one layer and one direction.

    From oneDNN's ``rnn_utils::set_workspace_sizes`` and ``set_offsets`` (``src/cpu/rnn/rnn_utils.hpp``,
    ``rnn_utils.cpp``) with ``n_layer = n_dir = 1`` (ATen's ``mkldnn_rnn_layer`` runs one layer and
    direction per call), ``n_gates = 4``, ``mb = batch``, ``n_iter = steps``, ``slc = input_size``,
    ``sic = dhc = hidden``. Seven parts, each starting on a 4096-byte page, the total rounded to a page
    (measured: the workspace tensor is always a whole number of pages):

    ============================  =====================================================  ==========
    part                          elements                                               bytes each
    ============================  =====================================================  ==========
    gates                         ``steps · batch · good_ld(4·hidden)``                  4 (float)
    ht                            ``steps · batch · good_ld(hidden)``                    itemsize
    states (layer = iter)         ``2 · (steps+1) · batch · good_ld(max(input, hidden))`` itemsize
    c states                      ``2 · (steps+1) · batch · hidden``                     4
    diff states layer, iter       ``2 · (steps+1) · batch · good_ld(max(input, hidden))`` 4, twice
    diff c states                 ``2 · (steps+1) · batch · hidden``                     4
    ============================  =====================================================  ==========

    Checked against the real kernel for fp32 over a grid of shapes (``tests/test_trace_kernels.py``);
    16-bit LSTMs do not reach oneDNN on CPUs without native bf16 support (this machine), so the
    16-bit column sizes are oneDNN's types, not measured here.
    """
    states = 2 * (steps + 1) * batch
    wide = onednn_good_ld(max(input_size, hidden), itemsize)
    parts = [
        steps * batch * onednn_good_ld(4 * hidden, 4) * 4,
        steps * batch * onednn_good_ld(hidden, itemsize) * itemsize,
        states * wide * itemsize,
        states * hidden * 4,
        states * onednn_good_ld(max(input_size, hidden), 4) * 4,
        states * onednn_good_ld(max(input_size, hidden), 4) * 4,
        states * hidden * 4,
    ]
    return sum(_page(p) for p in parts)


def mkldnn_rnn_layer_bytes(args: tuple, kwargs: dict, outs: list[Tensor]) -> dict[int, int]:
    """``mkldnn_rnn_layer(input, w0, w1, w2, w3, hx, cx, reverse, batch_sizes, mode, hidden_size,
    num_layers, has_biases, bidirectional, batch_first, train)``: the training workspace (output 3).

    Only the LSTM (``mode`` 2, oneDNN's ``vanilla_lstm``) reaches this op from ``torch.nn``; in
    inference (``train=False``) oneDNN keeps no workspace.
    """
    names = ("input", "w0", "w1", "w2", "w3", "hx", "cx", "reverse", "batch_sizes", "mode", "hidden_size",
             "num_layers", "has_biases", "bidirectional", "batch_first", "train")
    given: dict[str, Any] = dict(zip(names, args, strict=False))
    given.update(kwargs)
    if not given.get("train", True) or given.get("mode", 2) != 2 or len(outs) < 4:
        return {}
    x = given["input"]
    steps, batch = x.shape[0], x.shape[1]  # time-major: ATen transposes a batch-first input before this op
    return {3: lstm_workspace_bytes(batch, steps, x.shape[-1], int(given["hidden_size"]), x.element_size())}


def separate_outputs(func: Any, out: Any) -> Any:
    """``out`` with each output of :data:`DISTINCT_OUTPUTS` that shares a storage with an earlier one cloned.

    Called on the fake kernel's result before anything sees it, so the trace allocates what the real
    kernel does. Outputs that do not alias are left alone.
    """
    indices = DISTINCT_OUTPUTS.get(func)
    if not indices or not isinstance(out, tuple):
        return out
    items = list(out)
    first, *rest = indices
    base = items[first].untyped_storage()
    for i in rest:
        if items[i].untyped_storage()._cdata == base._cdata:
            items[i] = items[i].clone()
    return tuple(items)


#: ops whose real kernel's output storage is not what the meta kernel says: output index -> bytes
REAL_KERNEL_BYTES: dict[Any, Correction] = {
    _aten.mse_loss.default: mse_loss_bytes,
    _aten.native_batch_norm.default: norm_stats_bytes,
    _aten.native_group_norm.default: norm_stats_bytes,
    _aten.mkldnn_rnn_layer.default: mkldnn_rnn_layer_bytes,
}

#: ops whose meta kernel returns one storage for outputs the real kernel allocates separately: the indices.
#: ``mkldnn_rnn_layer_backward``'s bias gradients (outputs 3 and 4, for ``bias_ih`` and ``bias_hh``): the meta
#: kernel returns the same tensor twice (``torch/_meta_registrations.py``: ``diff_b``), the CPU kernel two
#: (``aten/src/ATen/native/mkldnn/RNN.cpp``, ``mkldnn_rnn_layer_backward``), so AccumulateGrad can steal both.
DISTINCT_OUTPUTS: dict[Any, tuple[int, ...]] = {
    _aten.mkldnn_rnn_layer_backward.default: (3, 4),
}


@contextlib.contextmanager
def fp32_grouped_mm_meta() -> Iterator[None]:
    """Let the fake kernel of ``aten._grouped_mm`` take fp32 inputs, as the CPU kernel does, while tracing.

    Other dtypes go to torch's own meta kernel, checks included. The override is a ``torch.library``
    registration for the Meta key, removed on exit.
    """
    from torch._meta_registrations import _create_grouped_mm_output_tensor, meta_grouped_mm

    def grouped_mm(mat_a: Tensor, mat_b: Tensor, offs: Tensor | None = None, bias: Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> Tensor:
        if mat_a.dtype == mat_b.dtype == torch.float32 and out_dtype in (None, torch.float32) and bias is None:
            return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, torch.float32)
        return meta_grouped_mm(mat_a, mat_b, offs, bias, out_dtype)

    with warnings.catch_warnings():  # "overriding a previously registered kernel": on purpose, undone on exit
        warnings.simplefilter("ignore")
        library = torch.library.Library("aten", "IMPL")
        library.impl("_grouped_mm", grouped_mm, "Meta")
    try:
        yield
    finally:
        library._destroy()
