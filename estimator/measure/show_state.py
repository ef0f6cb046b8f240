"""``verify --show-state``: the seed's remark -- the model's state_dict and the optimizer's state,
before and after one step, showing that the weights changed and that AdaGrad's accumulator now
holds the squared gradients."""

from __future__ import annotations

from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from estimator.config import Config
from estimator.measure.models import optimizer_factory, step_parts


def _fmt(t: torch.Tensor, limit: int = 8) -> str:
    flat = t.detach().float().flatten().tolist()
    shown = ", ".join(f"{v:.4f}" for v in flat[:limit])
    return f"[{shown}{', …' if len(flat) > limit else ''}] {tuple(t.shape)}"


def show_state(config: Config, device: torch.device, impl: str, console: Console) -> dict[str, Any]:
    """Run one step of the seed's loop, print state before and after; return the checks made."""
    parts = step_parts(config, device)
    torch.manual_seed(0)
    model = parts.build_model()
    optimizer = optimizer_factory(config, impl)(model.parameters())
    inputs, target = parts.make_batch()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _print_state(console, "before the step", model, optimizer)
    loss = parts.loss_fn(model(*inputs), target) if parts.loss_fn else model(*inputs, target)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _print_state(console, "after the step", model, optimizer)
    changed = {k: not torch.equal(before[k], v) for k, v in model.state_dict().items()}
    checks: dict[str, Any] = {"loss": float(loss.detach()), "weights_changed": changed}
    accum = _accumulators(model, optimizer)
    if accum:
        # after one step from a zero accumulator: G_1 = g_1 ⊙ g_1
        checks["accumulator_is_squared_grad"] = {
            name: bool(torch.allclose(acc, grads[name] ** 2)) for name, acc in accum.items()
        }
    console.print(f"loss = {checks['loss']:.6f}")
    for name, did in changed.items():
        console.print(f"{name}: {'changed' if did else 'UNCHANGED'} by the step")
    for name, ok in checks.get("accumulator_is_squared_grad", {}).items():
        console.print(f"{name}: optimizer accumulator == grad² of this step: {ok}")
    return checks


def _accumulators(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdaGrad's sum of squared gradients: 'g2' in the seed's class, 'sum' in torch.optim.Adagrad."""
    found = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p, {})
        for key in ("g2", "sum"):
            if key in state:
                found[name] = state[key]
    return found


def _print_state(console: Console, title: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    table = Table(title=f"state {title}", title_justify="left", show_lines=False)
    table.add_column("tensor", no_wrap=True)
    table.add_column("values", overflow="fold")
    for key, value in model.state_dict().items():
        table.add_row(f"model.{key}", _fmt(value))
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            shown = _fmt(value) if isinstance(value, torch.Tensor) and value.dim() else str(
                float(value) if isinstance(value, torch.Tensor) else value)
            table.add_row(escape(f"optimizer[{names.get(id(p), '?')}].{key}"), shown)
    if not optimizer.state:
        table.add_row("optimizer state", "(empty: created lazily inside the first step)")
    console.print(table)
