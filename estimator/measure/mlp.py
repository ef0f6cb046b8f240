"""The seed's "Cruncher" in torch, so the analytic MLP family can be checked against a real step."""

from __future__ import annotations

import math

import torch
from torch import nn


class Linear(nn.Module):
    """A bias-free layer that stores its weight as (in, out) and computes ``x @ W``, as the seed does.

    (``nn.Linear`` stores (out, in) and computes ``x @ W.T``; same FLOPs, but the seed's parameter
    shapes and saved tensors are what the estimator's formulas describe.)
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        weight = torch.randn(input_dim, output_dim, device=device, dtype=dtype) / math.sqrt(input_dim)
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Cruncher(nn.Module):
    """``num_layers`` bias-free D x D layers, then a D -> 1 head, then ``squeeze(-1)``; no nonlinearity."""

    def __init__(
        self,
        dim: int,
        num_layers: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Linear(dim, dim, device, dtype) for _ in range(num_layers)])
        self.final = Linear(dim, 1, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        x = self.final(x)
        return x.squeeze(-1)


def build_cruncher(
    dim: int, num_layers: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Cruncher:
    """A Cruncher created directly on ``device`` (no CPU copy first: a tracker sees only real tensors)."""
    return Cruncher(dim, num_layers, device=device, dtype=dtype)
