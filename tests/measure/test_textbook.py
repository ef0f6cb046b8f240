"""The textbook optimizers against torch.optim: the same parameters after 50 real steps."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from estimator.measure import textbook as tb
from estimator.measure.mlp import build_cruncher

MakeOpt = Callable[..., torch.optim.Optimizer]

# (textbook, torch.optim) pairs configured to compute the same update.
PAIRS: dict[str, tuple[MakeOpt, MakeOpt]] = {
    "sgd": (lambda p: tb.SGD(p, lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05)),
    # torch: b = μb + g, θ -= ηb.  seed: v = μv - ηg, θ += v.  With constant η, v = -ηb.
    "momentum": (
        lambda p: tb.Momentum(p, lr=0.02, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9),
    ),
    "nesterov": (
        lambda p: tb.Momentum(p, lr=0.02, momentum=0.9, nesterov=True),
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True),
    ),
    # torch.optim.Adagrad: θ -= η g / (sqrt(G) + ε); the seed has sqrt(G + ε). Same with ε outside ...
    "adagrad": (
        lambda p: tb.AdaGrad(p, lr=0.05, eps=1e-10, eps_outside_sqrt=True),
        lambda p: torch.optim.Adagrad(p, lr=0.05, eps=1e-10),
    ),
    # ... or with ε = 0, where the placement does not matter.
    "adagrad_eps0": (
        lambda p: tb.AdaGrad(p, lr=0.05, eps=0.0),
        lambda p: torch.optim.Adagrad(p, lr=0.05, eps=0.0),
    ),
    "rmsprop": (
        lambda p: tb.RMSProp(p, lr=0.01, alpha=0.99, eps=1e-8, eps_outside_sqrt=True),
        lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8),
    ),
    "adam": (lambda p: tb.Adam(p, lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
    "adam_l2": (
        lambda p: tb.Adam(p, lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
    ),
    "adamw": (lambda p: tb.AdamW(p, lr=0.01), lambda p: torch.optim.AdamW(p, lr=0.01)),
}

# Tolerances. Both use rtol=1e-6; atol covers parameters that pass near 0.
# float64: 50 steps of differently ordered arithmetic differ by ~1e-15 (measured: <= 1.1e-15), so
#   atol=1e-12 is 1000x that and still 1e5x below any formula difference (those move θ by >= 1e-4).
# float32: |θ| < 2 here, one ulp is <= 2.4e-7, and the implementations round differently (e.g.
#   lr * g / d versus addcdiv), so 50 steps random-walk a few ulps apart (measured: <= 6.3e-7 for
#   momentum); atol=1e-6 is ~4 ulps at 2, still 100x below a formula difference.
TOLERANCES = {torch.float64: (1e-6, 1e-12), torch.float32: (1e-6, 1e-6)}


def train(
    make_opt: MakeOpt, dtype: torch.dtype, steps: int = 50
) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """A Cruncher (D=16, 3 layers), a fresh random batch each step, fixed seeds."""
    torch.manual_seed(0)
    model = build_cruncher(16, 3, dtype=dtype)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=gen, dtype=dtype)
        y = torch.randn(8, generator=gen, dtype=dtype)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return torch.cat([p.detach().flatten() for p in model.parameters()]), opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_textbook_matches_torch_optim(name: str, dtype: torch.dtype) -> None:
    ours, theirs = PAIRS[name]
    start, _ = train(ours, dtype, steps=0)
    got, _ = train(ours, dtype)
    want, _ = train(theirs, dtype)
    assert (got - start).abs().max() > 0.1  # the run really trains
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_momentum_buffer_is_minus_lr_times_torchs() -> None:
    _, ours = train(PAIRS["momentum"][0], torch.float64)
    _, theirs = train(PAIRS["momentum"][1], torch.float64)
    for p_ours, p_theirs in zip(ours.state.values(), theirs.state.values(), strict=True):
        torch.testing.assert_close(p_ours["v"], -0.02 * p_theirs["momentum_buffer"], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", ["adagrad", "rmsprop"])
def test_eps_inside_the_sqrt_changes_training(name: str) -> None:
    """The seed's placement (inside, AdaGrad's ε = 1e-5) against torch's defaults: clearly different."""
    ours = {"adagrad": lambda p: tb.AdaGrad(p, lr=0.05), "rmsprop": lambda p: tb.RMSProp(p, lr=0.01)}[name]
    got, _ = train(ours, torch.float64)
    want, _ = train(PAIRS[name][1], torch.float64)
    assert (got - want).abs().max() > 1e-2


def test_seed_adagrad_first_step_differs_from_torch_by_hand() -> None:
    """θ = 1, g = 0.5, η = 0.01, one step.

    seed:  θ -= η g / sqrt(g² + 1e-5) = 0.005 / sqrt(0.25001) = 0.01 / sqrt(1.00004)
    torch: θ -= η g / (sqrt(g²) + 1e-10) = 0.005 / (0.5 + 1e-10) = 0.01 / (1 + 2e-10)
    With 1/sqrt(1 + x) = 1 - x/2 + 3x²/8 - ..., x = 4e-5:
      seed step  = 0.01 (1 - 2e-5 + 6e-10 - 2e-14)   = 0.009999800006
      torch step = 0.01 (1 - 2e-10 + 4e-20)          = 0.009999999998
    so θ_seed - θ_torch = 0.01 (2e-5 - 8e-10 + 2e-14) = 1.99992e-7 (to ~1e-16): the seed steps
    2e-5 (relative) shorter, 1000x what float64 rounding could explain.
    """
    thetas = []
    # the seed's AdaGrad with its defaults (ε = 1e-5 inside), torch's with its own (ε = 1e-10 outside)
    for make in (lambda p: tb.AdaGrad(p, lr=0.01), lambda p: torch.optim.Adagrad(p, lr=0.01)):
        theta = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = make([theta])
        theta.grad = torch.tensor([0.5], dtype=torch.float64)
        opt.step()
        thetas.append(theta.item())
    seed, torch_ = thetas
    assert seed - torch_ == pytest.approx(1.99992e-7, rel=1e-8)
    assert seed - torch_ == pytest.approx(0.005 * (1 / (0.5 + 1e-10) - 1 / math.sqrt(0.25001)), rel=1e-8)


def test_adagrad_g2_is_the_sum_of_squared_gradients() -> None:
    theta = torch.nn.Parameter(torch.zeros(3))
    opt = tb.AdaGrad([theta], lr=0.01)
    for grad in ([1.0, 2.0, 3.0], [0.5, -1.0, 2.0]):
        theta.grad = torch.tensor(grad)
        opt.step()
    assert torch.equal(opt.state[theta]["g2"], torch.tensor([1.25, 5.0, 13.0]))


def test_adagrad_g2_on_a_real_model() -> None:
    torch.manual_seed(0)
    model = build_cruncher(16, 3)
    opt = tb.AdaGrad(model.parameters(), lr=0.05)
    squares = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(2):
        F.mse_loss(model(torch.randn(8, 16)), torch.randn(8)).backward()
        for s, p in zip(squares, model.parameters(), strict=True):
            s += torch.square(p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for s, p in zip(squares, model.parameters(), strict=True):
        assert torch.equal(opt.state[p]["g2"], s)  # same additions in the same order: bit for bit


def test_parameters_without_gradient_are_left_alone() -> None:
    used, unused = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    for cls in tb.TEXTBOOK.values():
        opt = cls([used, unused])
        used.grad = torch.ones(2)
        opt.step()
        assert torch.equal(unused, torch.ones(2))
        assert not opt.state[unused]


def test_registry() -> None:
    assert tb.TEXTBOOK == {
        "sgd": tb.SGD,
        "momentum": tb.Momentum,
        "adagrad": tb.AdaGrad,
        "rmsprop": tb.RMSProp,
        "adam": tb.Adam,
        "adamw": tb.AdamW,
    }
    assert all(issubclass(c, torch.optim.Optimizer) for c in tb.TEXTBOOK.values())
