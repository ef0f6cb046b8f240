"""The seed's textbook optimizers, written from the update rules as readable teaching code.

They are deliberately naive: every line of the update rule is one tensor expression, so each
creates the temporaries a reader would expect (``lr * grad``, ``g2 + eps``, ...). torch.optim's
implementations fuse these into in-place ops; ``docs/measurement.md`` measures the difference in
peak memory. Parameters without a gradient are skipped, as torch.optim does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class SGD(torch.optim.Optimizer):
    """Stochastic gradient descent: θ ← θ − η g (Robbins & Monro 1951).

    The seed's code verbatim. torch.optim.SGD with ``momentum=0`` computes the same update with
    one fused ``param.add_(grad, alpha=-lr)``, i.e. without the ``lr * grad`` temporary.
    """

    def __init__(self, params: Params, lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                p.data -= lr * grad


class Momentum(torch.optim.Optimizer):
    """SGD with (heavy-ball) momentum: v_t = μ v_{t−1} − η g_t; θ ← θ + v_t (Polyak 1964).

    With ``nesterov=True``: θ ← θ + μ v_t − η g_t (Sutskever et al. 2013). torch.optim.SGD
    (``momentum=μ``, ``dampening=0``) keeps b_t = μ b_{t−1} + g_t and does θ ← θ − η b_t; for a
    constant η, v_t = −η b_t, so both give the same parameters. State: one buffer ``v`` per parameter.
    """

    def __init__(
        self, params: Params, lr: float = 0.01, momentum: float = 0.9, nesterov: bool = False
    ) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov})

    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.data
                if "v" not in state:
                    state["v"] = torch.zeros_like(grad)
                v = state["v"]
                v.mul_(mu).sub_(lr * grad)  # v_t = μ v_{t−1} − η g_t, in place: the state is not reallocated
                if group["nesterov"]:
                    p.data += mu * v - lr * grad  # θ ← θ + μ v_t − η g_t
                else:
                    p.data += v  # θ ← θ + v_t


class AdaGrad(torch.optim.Optimizer):
    """AdaGrad (Duchi, Hazan & Singer 2011): G_t = G_{t−1} + g_t²; θ ← θ − η g_t / sqrt(G_t + ε).

    The seed's code, including its details: the sum is stored as ``state["g2"]``, ε = 1e-5 sits
    INSIDE the square root, and ``state.get("g2", torch.zeros_like(grad))`` evaluates its default
    every step, so it allocates (and immediately drops) a parameter-sized zero tensor each time.
    torch.optim.Adagrad puts ε outside, sqrt(G_t) + ε, with ε = 1e-10 by default;
    ``eps_outside_sqrt=True`` gives that form, so the two then compute the same parameters.
    """

    def __init__(
        self, params: Params, lr: float = 0.01, eps: float = 1e-5, eps_outside_sqrt: bool = False
    ) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "eps_outside_sqrt": eps_outside_sqrt})

    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.data
                g2 = state.get("g2", torch.zeros_like(grad))
                g2 += torch.square(grad)  # g2_t = g2_{t-1} + grad_t^2
                state["g2"] = g2
                if group["eps_outside_sqrt"]:
                    p.data -= lr * grad / (torch.sqrt(g2) + eps)
                else:
                    p.data -= lr * grad / torch.sqrt(g2 + eps)


class RMSProp(torch.optim.Optimizer):
    """RMSProp (Tieleman & Hinton 2012, Coursera lecture 6.5): AdaGrad with an EMA instead of a sum.

    s_t = α s_{t−1} + (1 − α) g_t²; θ ← θ − η g_t / sqrt(s_t + ε). As for the seed's AdaGrad,
    ε sits inside the square root by default; torch.optim.RMSprop (``centered=False``,
    ``momentum=0``) uses sqrt(s_t) + ε, which ``eps_outside_sqrt=True`` reproduces. State: ``s``.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 0.01,
        alpha: float = 0.99,
        eps: float = 1e-8,
        eps_outside_sqrt: bool = False,
    ) -> None:
        super().__init__(params, {"lr": lr, "alpha": alpha, "eps": eps, "eps_outside_sqrt": eps_outside_sqrt})

    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.data
                if "s" not in state:
                    state["s"] = torch.zeros_like(grad)
                s = state["s"]
                s.mul_(alpha).add_((1 - alpha) * torch.square(grad))  # s_t = α s_{t−1} + (1 − α) g_t²
                if group["eps_outside_sqrt"]:
                    p.data -= lr * grad / (torch.sqrt(s) + eps)
                else:
                    p.data -= lr * grad / torch.sqrt(s + eps)


class Adam(torch.optim.Optimizer):
    """Adam (Kingma & Ba 2015): EMAs of g and g² with bias correction.

    m_t = β1 m_{t−1} + (1 − β1) g_t;  v_t = β2 v_{t−1} + (1 − β2) g_t²;
    m̂ = m_t / (1 − β1^t);  v̂ = v_t / (1 − β2^t);  θ ← θ − η m̂ / (sqrt(v̂) + ε)   (ε outside, as in the paper).
    ``weight_decay`` λ is the L2 form (g ← g + λθ) unless ``decoupled_weight_decay=True``, which is
    AdamW's θ ← θ (1 − ηλ) before the update (Loshchilov & Hutter 2019). Same rule and defaults as
    torch.optim.Adam/AdamW; the difference is memory: the step count t is a Python int here, not a
    tensor per parameter, and each expression allocates its temporaries.
    """

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.data
                if not state:  # created lazily at the first step, like torch.optim
                    state["t"] = 0
                    state["m"] = torch.zeros_like(grad)
                    state["v"] = torch.zeros_like(grad)
                if wd != 0 and group["decoupled_weight_decay"]:
                    p.data.mul_(1 - lr * wd)  # AdamW: θ ← θ (1 − ηλ), independent of the gradient
                elif wd != 0:
                    grad = grad + wd * p.data  # L2 regularization folded into the gradient
                state["t"] += 1
                t, m, v = state["t"], state["m"], state["v"]
                m.mul_(beta1).add_((1 - beta1) * grad)  # m_t = β1 m_{t−1} + (1 − β1) g_t
                v.mul_(beta2).add_((1 - beta2) * torch.square(grad))  # v_t = β2 v_{t−1} + (1 − β2) g_t²
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                p.data -= lr * m_hat / (torch.sqrt(v_hat) + eps)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay, λ = 0.01 like torch.optim.AdamW."""

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, decoupled_weight_decay=True)


TEXTBOOK: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "adagrad": AdaGrad,
    "rmsprop": RMSProp,
    "adam": Adam,
    "adamw": AdamW,
}
