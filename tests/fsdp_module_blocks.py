"""A tiny stack of repeated blocks for the FSDP2-of-a-traced-module tests and benchmarks/fsdp_accuracy.py:
an embedding, ``layers`` pre-norm residual MLP blocks in an ``nn.ModuleList``, a final norm and a head."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """``x + down(gelu(up(norm(x))))``."""

    def __init__(self, dim: int, hidden: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, device=device)
        self.up = nn.Linear(dim, hidden, device=device)
        self.down = nn.Linear(hidden, dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Stack(nn.Module):
    """Token ids -> logits through ``layers`` blocks."""

    def __init__(self, vocab: int, dim: int, hidden: int, layers: int, device: torch.device | str | None = None
                 ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, device=device)
        self.blocks = nn.ModuleList(Block(dim, hidden, device=device) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, device=device)
        self.head = nn.Linear(dim, vocab, bias=False, device=device)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def make_stack(vocab: int = 40, dim: int = 16, hidden: int = 24, layers: int = 3,
               device: torch.device | str | None = None) -> Stack:
    """The stack; the default sizes make rows that 2, 3 and 4 ranks split unevenly in places."""
    return Stack(vocab, dim, hidden, layers, device=device)
