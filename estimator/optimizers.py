"""The optimizer registry: which state tensors each optimizer keeps per parameter, and why.

One decorated function per optimizer (the ``torch.utils.flop_counter`` registry pattern): it
receives a parameter's shape and the optimizer options and returns that parameter's state tensors.
The decorator records the update rule, the source paper, the torch class that implements it, when
torch creates the state, and the temporaries torch's for-loop ``step()`` allocates (measured with
the live-tensor tracker on torch 2.13, CPU; see docs/peak.md). Pure Python: no torch import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any, Literal

from estimator.families.base import ParamTensor

StateInit = Literal["constructor", "first_step", "first_step_inline"]


@dataclass(frozen=True)
class StateTensor:
    """One optimizer-state tensor of one parameter.

    ``dtype`` None means "the parameter's dtype" (``torch.zeros_like(param)``).
    """

    name: str
    numel: int
    dtype: str | None = None


@dataclass(frozen=True)
class LoopOp:
    """One step of what torch's for-loop ``step()`` does to a parameter-sized temporary.

    ``alloc``: a new tensor the size of the parameter; ``free``: this parameter's one is released;
    ``free_previous``: the *previous* parameter's one is released -- a tensor bound to a loop
    variable (``denom = ...``) lives until the next iteration rebinds the name. Whatever is still
    held after the last parameter is released when ``step()`` returns.
    """

    action: Literal["alloc", "free", "free_previous", "state"]
    name: str


def _script(*ops: str) -> list[LoopOp]:
    """``_script("+sqrt", "+denom", "-sqrt", "<denom")``: + alloc, - free, < free previous,
    ``@state``: where state created inside the loop (SGD's momentum buffer) appears."""
    kinds = {"+": "alloc", "-": "free", "<": "free_previous", "@": "state"}
    return [LoopOp(kinds[op[0]], op[1:]) for op in ops]  # type: ignore[arg-type]


@dataclass(frozen=True)
class OptimizerSpec:
    """Everything the estimator knows about one optimizer."""

    name: str
    title: str
    update_rule: str
    source: str
    torch_class: str | None
    state_fn: Callable[[ParamTensor, Any], list[StateTensor]]
    step_tensor: bool
    state_init: StateInit
    loop_script: Callable[[Any], list[LoopOp]]
    foreach_script: Callable[[Any], list[LoopOp]]
    fused: bool
    matmul_flops: Callable[[ParamTensor], int]
    defaults: dict[str, Any] = field(default_factory=dict)

    def state_tensors(self, param: ParamTensor, options: Any) -> list[StateTensor]:
        """State tensors of one parameter (none for a frozen one)."""
        if not param.trainable:
            return []
        return self.state_fn(param, options)


_OPTIMIZERS: dict[str, OptimizerSpec] = {}


def _nothing(options: Any) -> list[Any]:
    return []


def register_optimizer(
    name: str,
    *,
    title: str,
    update_rule: str,
    source: str,
    torch_class: str | None,
    step_tensor: bool,
    state_init: StateInit = "first_step",
    loop_script: Callable[[Any], list[LoopOp]] = _nothing,
    foreach_script: Callable[[Any], list[LoopOp]] = _nothing,
    fused: bool = False,
    matmul_flops: Callable[[ParamTensor], int] = lambda param: 0,
    defaults: dict[str, Any] | None = None,
) -> Callable[[Callable[[ParamTensor, Any], list[StateTensor]]], Callable]:
    """Register ``fn(param, options) -> state tensors`` under ``name``; duplicates are refused."""

    def wrap(fn: Callable[[ParamTensor, Any], list[StateTensor]]) -> Callable:
        if name in _OPTIMIZERS:
            raise ValueError(f"optimizer {name!r} is already registered")
        _OPTIMIZERS[name] = OptimizerSpec(
            name=name,
            title=title,
            update_rule=update_rule,
            source=source,
            torch_class=torch_class,
            state_fn=fn,
            step_tensor=step_tensor,
            state_init=state_init,
            loop_script=loop_script,
            foreach_script=foreach_script,
            fused=fused,
            matmul_flops=matmul_flops,
            defaults=defaults or {},
        )
        return fn

    return wrap


def get_optimizer(name: str) -> OptimizerSpec:
    """The spec registered under ``name`` (the config layer validates names first)."""
    return _OPTIMIZERS[name]


def optimizer_names() -> list[str]:
    return list(_OPTIMIZERS)


def _like(param: ParamTensor, *names: str) -> list[StateTensor]:
    return [StateTensor(n, param.numel) for n in names]


def _weight_decay(options: Any) -> list[LoopOp]:
    """Coupled (L2) weight decay: ``grad = grad.add(param, alpha=wd)``, rebound at the next iteration."""
    return _script("<grad_wd", "+grad_wd") if _option(options, "weight_decay") else []


def _sgd_script(options: Any) -> list[LoopOp]:
    """torch's ``_single_tensor_sgd``: the update is in place, but ``grad`` is rebound.

    ``grad = grad.add(param, alpha=wd)`` makes a tensor that lives until ``grad`` is rebound: by
    ``grad = buf`` (momentum), by the Nesterov sum ``grad = grad.add(buf, alpha=μ)``, or at the top
    of the next iteration. The first step clones the momentum buffer after the decay.
    """
    wd, momentum = bool(_option(options, "weight_decay")), bool(_option(options, "momentum"))
    nesterov = momentum and getattr(options, "nesterov", False)
    ops = ["<grad_nesterov", "<grad_wd"] + (["+grad_wd"] if wd else []) + ["@state"]
    ops += ["+grad_nesterov"] if nesterov else []
    ops += ["-grad_wd"] if wd and momentum else []
    return _script(*ops)


def _sgd_foreach(options: Any) -> list[LoopOp]:
    """``_multi_tensor_sgd``: a new grads list for weight decay; Nesterov adds into it in place."""
    return _script("@state", "+grad_wd") if _option(options, "weight_decay") else _script("@state")


def _wd_list(options: Any) -> list[LoopOp]:
    return _script("+grad_wd") if _option(options, "weight_decay") else []


def _option(options: Any, key: str) -> Any:
    """The option in force: the config's ``option()`` knows the optimizer's defaults."""
    if hasattr(options, "option"):
        return options.option(key)
    return getattr(options, key, None)


@register_optimizer(
    "sgd",
    title="Stochastic gradient descent",
    update_rule="θ ← θ − η·g",
    source="Robbins & Monro 1951; the seed, section 1.1",
    torch_class="torch.optim.SGD",
    step_tensor=False,
    state_init="first_step_inline",
    loop_script=_sgd_script,
    foreach_script=_sgd_foreach,
    fused=True,
    defaults={"lr": 0.01, "momentum": 0.0, "weight_decay": 0.0},
)
def _sgd(param: ParamTensor, options: Any) -> list[StateTensor]:
    # torch.optim.SGD keeps a momentum buffer only when momentum != 0.
    return _like(param, "momentum_buffer") if _option(options, "momentum") else []


@register_optimizer(
    "momentum",
    title="SGD with (heavy-ball or Nesterov) momentum",
    update_rule="v ← μ·v − η·g;  θ ← θ + v   (torch: b ← μ·b + g; θ ← θ − η·b, equal for constant η)",
    source="Polyak 1964; Sutskever et al. 2013 (Nesterov form); the seed, section 1.2",
    torch_class="torch.optim.SGD(momentum=μ)",
    step_tensor=False,
    state_init="first_step_inline",
    loop_script=_sgd_script,
    foreach_script=_sgd_foreach,
    fused=True,
    defaults={"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
)
def _momentum(param: ParamTensor, options: Any) -> list[StateTensor]:
    return _like(param, "momentum_buffer")


@register_optimizer(
    "adagrad",
    title="AdaGrad",
    update_rule="G ← G + g⊙g;  θ ← θ − η·g / (√G + ε)   (the seed: √(G + ε))",
    source="Duchi, Hazan & Singer 2011, JMLR 12; the seed, section 2",
    torch_class="torch.optim.Adagrad",
    step_tensor=True,
    state_init="constructor",
    # std = state_sum.sqrt().add_(eps), bound to a loop variable; foreach: sqrt and the scaled grads.
    loop_script=lambda o: [*_weight_decay(o), *_script("+std", "<std")],
    # foreach: std = _foreach_sqrt(sums) and numerator = _foreach_mul(grads, -clr); with weight decay
    # the decayed grads list is reused as the numerator.
    foreach_script=lambda o: _script("+grad_wd", "+std") if _option(o, "weight_decay") else _script("+std",
                                                                                                   "+scaled_grad"),
    fused=True,
    defaults={"lr": 0.01, "eps": 1e-10, "weight_decay": 0.0},
)
def _adagrad(param: ParamTensor, options: Any) -> list[StateTensor]:
    return _like(param, "sum")  # the seed calls it g2


def _rmsprop_script(options: Any) -> list[LoopOp]:
    # avg = square_avg.sqrt().add_(eps) (centered: square_avg.addcmul(...).sqrt_()), a loop variable.
    return [*_weight_decay(options), *_script("+avg", "<avg")]


@register_optimizer(
    "rmsprop",
    title="RMSProp",
    update_rule="v ← α·v + (1−α)·g⊙g;  θ ← θ − η·g / (√v + ε)   (+ momentum buffer, + centered mean)",
    source="Tieleman & Hinton 2012, Coursera NN lecture 6.5; centered: Graves 2013",
    torch_class="torch.optim.RMSprop",
    step_tensor=True,
    loop_script=_rmsprop_script,
    foreach_script=lambda o: [*_wd_list(o), *_script("+avg")],
    defaults={"lr": 0.01, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0},
)
def _rmsprop(param: ParamTensor, options: Any) -> list[StateTensor]:
    names = ["square_avg"]
    if _option(options, "momentum"):
        names.append("momentum_buffer")
    if getattr(options, "centered", False):
        names.append("grad_avg")
    return _like(param, *names)


def _adam_script(options: Any) -> list[LoopOp]:
    # denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps): the sqrt is freed at once,
    # denom lives until the next parameter's denom replaces it (measured: 3 tensors at the peak).
    return [*_weight_decay(options), *_script("+sqrt", "+denom", "-sqrt", "<denom")]


def _adam_foreach(options: Any) -> list[LoopOp]:
    """``_multi_tensor_adam``: the decayed grads list is deleted before ``_foreach_sqrt(exp_avg_sqs)``."""
    decay = _script("+grad_wd", "-grad_wd") if _option(options, "weight_decay") else []
    return [*decay, *_script("+sqrt")]


def _adam_state(param: ParamTensor, options: Any) -> list[StateTensor]:
    names = ["exp_avg", "exp_avg_sq"]
    if getattr(options, "amsgrad", False):
        names.append("max_exp_avg_sq")
    return _like(param, *names)


register_optimizer(
    "adam",
    title="Adam",
    update_rule="m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g⊙g;  θ ← θ − η·m̂ / (√v̂ + ε)",
    source="Kingma & Ba 2015, ICLR; amsgrad: Reddi et al. 2018",
    torch_class="torch.optim.Adam",
    step_tensor=True,
    loop_script=_adam_script,
    foreach_script=_adam_foreach,
    fused=True,
    defaults={"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
)(_adam_state)


register_optimizer(
    "adamw",
    title="AdamW (decoupled weight decay)",
    update_rule="Adam's m, v;  θ ← θ − η·(m̂ / (√v̂ + ε) + λ·θ)",
    source="Loshchilov & Hutter 2019, ICLR",
    torch_class="torch.optim.AdamW",
    step_tensor=True,
    # Decoupled decay is param.mul_(1 − ηλ), in place: no extra temporary.
    loop_script=lambda o: _script("+sqrt", "+denom", "-sqrt", "<denom"),
    foreach_script=lambda o: _script("+sqrt"),
    fused=True,
    defaults={"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "amsgrad": False},
)(_adam_state)


@register_optimizer(
    "lion",
    title="Lion (evolved sign momentum)",
    update_rule="θ ← θ − η·(sign(β1·m + (1−β1)·g) + λ·θ);  m ← β2·m + (1−β2)·g",
    source="Chen et al. 2023, 'Symbolic Discovery of Optimization Algorithms', NeurIPS",
    torch_class=None,
    step_tensor=False,
    # The paper's reference code: update = exp_avg * b1 + grad * (1 - b1); p.add_(sign(update), ...)
    loop_script=lambda o: _script("+m_b1", "+g_b1", "+update", "-m_b1", "-g_b1", "<update", "+sign", "-sign"),
    foreach_script=lambda o: _script("+update"),
    defaults={"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.0},
)
def _lion(param: ParamTensor, options: Any) -> list[StateTensor]:
    return _like(param, "exp_avg")


@register_optimizer(
    "adafactor",
    title="Adafactor (factored second moment, no first moment)",
    update_rule="R ← β·R + (1−β)·rowmean(g²);  C ← β·C + (1−β)·colmean(g²);  v̂ = R·C / mean(R);"
    "  θ ← θ − η·g/√v̂",
    source="Shazeer & Stern 2018, ICML; torch.optim.Adafactor (row_var/col_var for ≥2-D tensors)",
    torch_class="torch.optim.Adafactor",
    step_tensor=True,
    # var_estimate = row_var @ col_var / row_mean: one parameter-sized tensor held by a loop variable
    # (the row/column-sized temporaries beside it are not modelled).
    loop_script=lambda o: _script("+var_estimate", "<var_estimate"),
    foreach_script=lambda o: _script("+var_estimate"),
    # row_var (R x 1) @ col_var (1 x C): a matmul of 2·R·C FLOPs per matrix, which FlopCounterMode counts
    matmul_flops=lambda param: 2 * param.numel if len(param.shape) >= 2 else 0,
    defaults={"lr": 0.01},
)
def _adafactor(param: ParamTensor, options: Any) -> list[StateTensor]:
    # torch.optim.Adafactor: a matrix keeps a row vector (last dim -> 1) and a column vector
    # (second-to-last dim -> 1); a vector keeps a full-size 'variance'.
    if len(param.shape) < 2:
        return _like(param, "variance")
    lead = prod(param.shape[:-2])  # shapes, not numel ratios: an empty shard (0 rows) keeps its columns
    rows = lead * param.shape[-2]
    cols = lead * param.shape[-1]
    return [StateTensor("row_var", rows), StateTensor("col_var", cols)]


BNB_BLOCK_SIZE = 256
BNB_MIN_8BIT_SIZE = 4096


@register_optimizer(
    "adam8bit",
    title="8-bit Adam (block-wise quantized state, bitsandbytes Adam8bit)",
    update_rule="Adam's update, with m and v stored as 8-bit codes plus one fp32 absmax per 256-element block",
    source="Dettmers et al. 2022, '8-bit Optimizers via Block-wise Quantization', ICLR; bitsandbytes"
    " (blocksize 256, tensors under min_8bit_size=4096 elements keep fp32 state)",
    torch_class="bitsandbytes.optim.Adam8bit",
    step_tensor=False,
    defaults={"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8},
)
def _adam8bit(param: ParamTensor, options: Any) -> list[StateTensor]:
    n = param.numel
    if n < BNB_MIN_8BIT_SIZE:
        return [StateTensor("state1", n, "fp32"), StateTensor("state2", n, "fp32")]
    blocks = -(-n // BNB_BLOCK_SIZE)
    return [
        StateTensor("state1", n, "int8"),
        StateTensor("state2", n, "int8"),
        StateTensor("absmax1", blocks, "fp32"),
        StateTensor("absmax2", blocks, "fp32"),
    ]


# --------------------------------------------------------------------------- option validation
_CHECKED_BY = {
    "lion": "the Lion reference code, google/automl lion/lion_pytorch.py",
    "adam8bit": "bitsandbytes Optimizer2State",
}


def option_problem(name: str, key: str, value: Any) -> str | None:
    """Why ``name`` would refuse the option ``key=value``, or None when it takes it.

    Exactly the checks of each optimizer's constructor (torch 2.13, ``torch/optim``), so a config
    that validates never makes ``verify`` crash inside torch:

    * ``lr >= 0``: sgd.py:45, adagrad.py:45, rmsprop.py:47, adam.py:58 (AdamW is Adam),
      _adafactor.py:38;
    * ``momentum >= 0``: sgd.py:47, rmsprop.py:51;
    * ``weight_decay >= 0``: sgd.py:49, adagrad.py:49, rmsprop.py:53, adam.py:66;
    * ``eps >= 0``: adagrad.py:55, rmsprop.py:49, adam.py:60;
    * ``alpha >= 0``: rmsprop.py:55;
    * ``0 <= betas[i] < 1``: adam.py:62-65;
    * ``nesterov`` needs ``momentum > 0`` and zero dampening: sgd.py:63 (see :func:`nesterov_problem`).

    Lion and 8-bit Adam have no torch class; their reference implementations check the same
    (``0 <= lr``, ``0 <= eps``, ``0 <= betas[i] < 1``, ``0 <= weight_decay``). Finiteness is checked
    by the config (``allow_inf_nan=False``). Beyond torch: an option the optimizer does not take
    (``betas`` for sgd) is refused rather than ignored, and the ``momentum`` optimizer needs a
    momentum above 0 (with 0, torch keeps no buffer: that is ``sgd``).
    """
    spec = _OPTIMIZERS.get(name)
    if spec is None or value is None:
        return None
    if key not in spec.defaults:
        return f"{name} takes no {key} (its options: {', '.join(spec.defaults)})"
    checker = _CHECKED_BY.get(name) or spec.torch_class or name
    checker = checker.split("(")[0]
    if key == "betas":
        for i, beta in enumerate(value):
            if not 0.0 <= beta < 1.0:
                return f"expected 0 <= β{i + 1} < 1 ({checker} checks it), got {beta}"
        return None
    if not 0.0 <= value:
        return f"expected {key} >= 0 ({checker} checks it), got {value}"
    if name == "momentum" and key == "momentum" and value == 0:
        return "the momentum optimizer needs momentum > 0 (with 0 torch keeps no buffer: use -o sgd)"
    return None


def nesterov_problem(name: str, momentum: float | None) -> str | None:
    """torch.optim.SGD (sgd.py:63): Nesterov momentum requires a momentum above 0 and zero dampening.

    ``momentum`` is the config's value (None: the optimizer's default); dampening is always 0 here.
    """
    if name not in ("sgd", "momentum"):
        return "nesterov applies to sgd and momentum only"
    in_force = momentum if momentum is not None else _OPTIMIZERS[name].defaults.get("momentum", 0.0)
    if not in_force > 0:
        return (f"nesterov requires momentum > 0 (torch.optim.SGD checks it); momentum in force is {in_force}: "
                "set optimizer.momentum")
    return None
