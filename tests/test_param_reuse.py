"""Models that reuse a parameter within a step: the estimate against the real, uninstrumented step.

Why these need their own tests (issue 14): while any ``TorchDispatchMode`` is active -- the
live-tensor tracker, FakeTensorMode -- autograd's engine sums a node's fan-in gradients out of place
(``old + var``, ``InputBuffer::accumulate`` in ``torch/csrc/autograd/input_buffer.cpp``, because
``at::isTensorSubclassLike`` is true under a mode). The real step adds in place (``old.add_(var)``)
when the buffer ``old`` is a dense tensor nothing else references. Which one happens depends on how
the *first* gradient to arrive was made:

* ``h @ W`` (mm): the weight's gradient is a fresh mm output -> every later sum is in place;
* ``F.linear(x, W)`` / ``nn.Linear``: the gradient reaches W through ``t()``, a view, whose base
  also holds the storage -> out of place in the real step too;
* a tied embedding: in place if the lookup's dense gradient arrives first (the table is read as an
  output projection first, then looked up), out of place if the projection's (a view) does.

For each model: the estimate (the module family, traced on fake tensors with the real step's sums)
equals the real step's peaks (verify on the CPU: the allocator's records, no dispatch mode), and the
tracker's instrumented step differs exactly by the out-of-place sums: one ``+W`` spike, released at
once, per sum that the real step does in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from estimator.loader import load_config, validate_config  # noqa: E402
from estimator.measure import verify as verify_module  # noqa: E402

MODELS = '''
import torch
from torch import nn
from torch.nn import functional as F


class LoopRNN(nn.Module):
    """One weight applied ``steps`` times with ``@`` (an RNN written as a loop)."""

    def __init__(self, dim=16, steps=3, device=None):
        super().__init__()
        self.w = nn.Parameter(torch.randn(dim, dim, device=device) / dim ** 0.5)
        self.steps = steps

    def forward(self, x):
        h = x
        for _ in range(self.steps):
            h = torch.tanh(h @ self.w)
        return h


class Albert(nn.Module):
    """One nn.Linear shared by every layer of a residual stack (ALBERT's cross-layer sharing)."""

    def __init__(self, dim=16, layers=3, device=None):
        super().__init__()
        self.layer = nn.Linear(dim, dim, device=device)
        self.layers = layers

    def forward(self, x):
        for _ in range(self.layers):
            x = x + torch.relu(self.layer(x))
        return x


class TiedLookupFirst(nn.Module):
    """GPT-2's order: look the tokens up, then project onto the same table."""

    def __init__(self, vocab=32, dim=8, device=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, device=device)

    def forward(self, idx):
        return F.linear(torch.tanh(self.emb(idx)), self.emb.weight)


class TiedProjectionFirst(nn.Module):
    """The other order: project onto the table first, then look tokens up in it."""

    def __init__(self, vocab=32, dim=8, device=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, device=device)
        self.proj = nn.Linear(dim, dim, device=device)

    def forward(self, x, idx):
        scores = F.linear(self.proj(x), self.emb.weight)
        return scores.sum(-1, keepdim=True) * self.emb(idx)


class Twice(nn.Module):
    """One block (Linear + ReLU) called twice in the same forward."""

    def __init__(self, dim=16, device=None):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(dim, dim, device=device), nn.ReLU())
        self.head = nn.Linear(dim, 1, device=device)

    def forward(self, x):
        return self.head(self.block(self.block(x)))
'''

TOKENS = {"dtype": "int64", "high": 32}
# name -> (model config, {bytes of a sum the real step does in place: how many such sums})
CASES: dict[str, tuple[dict[str, Any], dict[int, int]]] = {
    # W's three gradients (mm outputs): two sums of 16·16·4 B
    "loop": ({"module": "reusemods:LoopRNN", "inputs": [{"shape": [4, 16]}], "loss": "sum"}, {1024: 2}),
    # three uses of one nn.Linear: the weight's first gradient arrives through t() and the bias's as a
    # view of sum(0, keepdim=True), so the first sum of each is out of place in the real step too; its
    # result is a fresh tensor, so the second is in place (16·16·4 B and 16·4 B). The residual stream
    # x1, x2 (each read by the layer and by the residual add): one in-place sum of 4·16·4 B each.
    "albert": ({"module": "reusemods:Albert", "inputs": [{"shape": [4, 16]}]}, {1024: 1, 64: 1, 256: 2}),
    "tied_lookup_first": ({"module": "reusemods:TiedLookupFirst", "inputs": [{"shape": [2, 5], **TOKENS}],
                           "loss": "cross_entropy"}, {}),
    # the lookup's dense gradient arrives first: one sum of 32·8·4 B in place
    "tied_projection_first": ({"module": "reusemods:TiedProjectionFirst",
                               "inputs": [{"shape": [4, 8]}, {"shape": [4], **TOKENS}]}, {1024: 1}),
    "twice": ({"module": "reusemods:Twice", "inputs": [{"shape": [4, 16]}]}, {}),
}


@pytest.fixture
def reuse_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "reusemods.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))


def extra_sums(instrumented: list[tuple[str, int]], real: list[tuple[str, int]]) -> dict[int, int] | None:
    """Explain the instrumented curve as the real one plus out-of-place sums: wherever the two part,
    the instrumented one must go up by ``s`` (the sum allocated) and straight back (the buffer it
    replaced released) before they agree again. Returns {s: count}, or None if that does not explain it."""
    sums: dict[int, int] = {}
    i = j = 0
    while i < len(instrumented):
        if j < len(real) and instrumented[i] == real[j]:
            i, j = i + 1, j + 1
            continue
        before = real[j - 1][1] if j else None
        if before is None or i + 1 >= len(instrumented) or instrumented[i + 1][1] != before:
            return None
        size = instrumented[i][1] - before
        sums[size] = sums.get(size, 0) + 1
        i += 2
    return sums if j == len(real) else None


@pytest.mark.parametrize(("name", "optimizer"), [*((name, "sgd") for name in CASES),
                                                   ("loop", "adam"), ("albert", "adam"),
                                                   ("tied_projection_first", "adam")])
def test_estimate_equals_the_real_step(reuse_modules: None, name: str, optimizer: str) -> None:
    model, in_place = CASES[name]
    cfg = validate_config({"model": model, "optimizer": {"name": optimizer}})
    result = verify_module.run_verify(cfg, "cpu")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []
    m = result.measurement
    assert m.uninstrumented is not None
    assert result.estimate.peak_bytes == m.real_steady_step.peak_bytes
    assert result.estimate.first_step_peak_bytes == m.real_first_step.peak_bytes
    # the estimate's curve is the real step's, point for point
    assert result.estimate.step.steady_curve() == m.real_steady_step.timeline
    # the tracker's instrumented step is the real one plus a copy for each sum it makes out of place
    assert extra_sums(m.steady_step.timeline, m.real_steady_step.timeline) == in_place
    if not in_place:
        assert m.steady_step.peak_bytes == m.real_steady_step.peak_bytes


def test_loop_weight_by_hand(reuse_modules: None) -> None:
    """LoopRNN, dim 16, 3 steps, batch 4, loss sum, SGD: the backward of the real step by hand.

    Start: W 1024 + x 256 = 1280. Forward per step: mm out +256, tanh +256, mm out freed: 2048,
    then the loss +4. Backward (W's three gradients t_{i-1}ᵀ g_i, 1024 B each): the first is moved
    into AccumulateGrad's buffer, the next two are added into it in place and freed. The peak is at
    the second of them: 4104 live + 256 (the input gradient of the middle step) = 4360. The tracker's
    step allocates each sum anew instead: 4104 + 1024 = 5128 at the first sum.
    """
    model, _ = CASES["loop"]
    result = verify_module.run_verify(validate_config({"model": model, "optimizer": {"name": "sgd"}}), "cpu")
    m = result.measurement
    assert m.real_steady_step.start_bytes == 1280
    assert (result.estimate.peak_bytes, m.real_steady_step.peak_bytes, m.steady_step.peak_bytes) == (4360, 4360, 5128)


TINY_GPT_TIED = ["model.family=transformer", "model.vocab_size=512", "model.d_model=64", "model.num_layers=2",
                 "model.num_heads=4", "model.max_seq_len=64", "model.tie_embeddings=true", "training.batch_size=2",
                 "training.seq_len=32", "optimizer.name=sgd"]


def test_gpt2_tied_embeddings_are_summed_out_of_place_in_the_real_step_too() -> None:
    """The transformer family (GPT-2's order: lookup, then lm_head on the same table): the lm_head's
    gradient reaches the table first, as a view, so the real step sums out of place as well."""
    result = verify_module.run_verify(load_config(overrides=TINY_GPT_TIED), "cpu")
    assert [(r.key, r.estimated, r.measured) for r in result.rows if r.estimated != r.measured] == []
    m = result.measurement
    assert result.estimate.peak_bytes == m.real_steady_step.peak_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_max_memory_allocated(reuse_modules: None, name: str) -> None:
    """On CUDA nothing instruments the step: max_memory_allocated per phase against the estimate (512 B blocks)."""
    model, _ = CASES[name]
    result = verify_module.run_verify(validate_config({"model": model, "optimizer": {"name": "sgd"}}), "cuda")
    assert result.measurement.uninstrumented is None
    for key in ("peak_bytes", "first_step_peak_bytes"):
        row = next(r for r in result.rows if r.key == key)
        assert row.within(0.02), row
