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


class Shared(nn.Module):
    """One block applied twice (weights shared across depth, as ALBERT does): its FSDP2 unit runs twice."""

    def __init__(self, dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, 2 * dim, device=device) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](self.blocks[0](self.blocks[0](x)))


def make_shared(dim: int = 8, device: torch.device | str | None = None) -> Shared:
    """:class:`Shared`, for the refusal of a unit whose forward runs more than once."""
    return Shared(dim, device=device)
