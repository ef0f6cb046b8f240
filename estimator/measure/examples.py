"""Small modules for the module family: the docs' examples and the tests' fixtures.

Point a config at them with ``module: estimator.measure.examples:make_mlp`` (docs/module.md).
Each factory takes ``device`` so the module is created where the caller wants it (on fake/meta
tensors for a trace, on the verify device for a real step).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def make_mlp(
    in_dim: int = 16,
    hidden: int = 32,
    out_dim: int = 4,
    bias: bool = True,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """Three ``nn.Linear`` layers with ReLU between them: in -> hidden -> hidden -> out."""
    kw = {"bias": bias, "device": device}
    return nn.Sequential(
        nn.Linear(in_dim, hidden, **kw), nn.ReLU(),
        nn.Linear(hidden, hidden, **kw), nn.ReLU(),
        nn.Linear(hidden, out_dim, **kw),
    )


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + (x Aᵀ) Bᵀ · alpha/rank``.

    After Hu et al. 2021 (LoRA): B starts at zero, so the update starts at zero; only A and B train.
    """

    def __init__(
        self, in_dim: int, out_dim: int, rank: int, alpha: float = 16.0, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.base = nn.Linear(in_dim, out_dim, device=device)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, in_dim, device=device) / math.sqrt(in_dim))
        self.lora_b = nn.Parameter(torch.zeros(out_dim, rank, device=device))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def make_lora_mlp(
    in_dim: int = 32,
    hidden: int = 64,
    out_dim: int = 8,
    rank: int = 4,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """Two LoRA layers with GELU between them: the base weights frozen, the adapters trained."""
    return nn.Sequential(
        LoRALinear(in_dim, hidden, rank, device=device), nn.GELU(), LoRALinear(hidden, out_dim, rank, device=device)
    )


class TinyLM(nn.Module):
    """Token ids -> logits: an embedding, a pre-norm MLP block, a head (for cross_entropy examples)."""

    def __init__(self, vocab: int = 64, dim: int = 32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, device=device)
        self.norm = nn.LayerNorm(dim, device=device)
        self.up = nn.Linear(dim, 4 * dim, device=device)
        self.down = nn.Linear(4 * dim, dim, device=device)
        self.head = nn.Linear(dim, vocab, bias=False, device=device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        x = x + self.down(F.gelu(self.up(self.norm(x))))
        return self.head(x)


def make_tiny_lm(vocab: int = 64, dim: int = 32, device: torch.device | str | None = None) -> TinyLM:
    return TinyLM(vocab, dim, device=device)


def make_convnet(channels: int = 8, classes: int = 10, size: int = 8,
                 device: torch.device | str | None = None) -> nn.Sequential:
    """Conv2d, BatchNorm2d (buffers: running statistics), ReLU, then a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, device=device), nn.BatchNorm2d(channels, device=device), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * (size - 2) ** 2, classes, device=device),
    )
