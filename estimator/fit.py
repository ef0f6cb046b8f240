"""Does the step fit on a GPU, what is the largest batch that does, and how long would it take.

Fit: the worst peak of the step on CUDA (the first or a steady step, with the allocator's 512-byte
blocks; under ``--parallel`` the worst rank's) plus ``CONTEXT_RESERVE`` must not exceed the GPU's
memory. The largest batch (per rank) is found by a bracketed secant search over
``training.batch_size``: for a fixed order of events every live-bytes point is affine in the batch,
so the peak is a maximum of affine functions (convex, piecewise linear) and a secant through two
batches lands on, or next to, the boundary in a few steps; each step re-simulates only the layers
that differ (``periodic.py``), and a bisection step after any secant step that gains little keeps
the search logarithmic whatever the rounding does. Step time is the exact matmul FLOP count over
the GPU's dense peak, which is a lower bound, and at a model FLOPs utilisation (MFU, the fraction of
peak a real run reaches; PaLM, Chowdhery et al. 2022, appendix B, reports 46% for its largest run;
30-50% is typical of well-tuned training).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from estimator.api import Estimate, estimate
from estimator.config import Config
from estimator.hardware import CONTEXT_RESERVE, GPU
from estimator.nogc import without_gc
from estimator.timeline import Peak

MAX_BATCH_SEARCH = 1 << 24


@dataclass(frozen=True)
class Fit:
    gpu: GPU
    peak_bytes: int
    needed_bytes: int  # peak + context reserve
    fits: bool
    max_batch_size: int  # 0: not even a batch of 1 fits
    step_seconds_at_peak: float
    step_seconds_at_mfu: float
    mfu: float
    batch_capped: bool = False  # the search stopped at MAX_BATCH_SEARCH: the answer is "at least"
    batch_applies: bool = True  # False: the batch is not training.batch_size (a module's input shapes)
    worst_ranks: str = ""  # under --parallel: the ranks whose peak decides ("" on one device)
    parallel: str | None = None
    world_size: int = 1
    alternatives: tuple[Alternative, ...] = ()  # when it does not fit: what would, each checked

    @property
    def headroom_bytes(self) -> int:
        return self.gpu.memory_bytes - self.needed_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.gpu.name,
            "memory_bytes": self.gpu.memory_bytes,
            "context_reserve_bytes": CONTEXT_RESERVE,
            "needed_bytes": self.needed_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "max_batch_size": self.max_batch_size if self.batch_applies else None,
            "max_batch_size_is_search_cap": self.batch_capped,
            "step_seconds_at_peak": self.step_seconds_at_peak,
            "step_seconds_at_mfu": self.step_seconds_at_mfu,
            "mfu": self.mfu,
            "parallel": self.parallel,
            "world_size": self.world_size,
            "worst_ranks": self.worst_ranks or None,
            "alternatives": [a.to_json() for a in self.alternatives],
            "source": self.gpu.source,
        }


@dataclass(frozen=True)
class Alternative:
    """One change to the step and what it gives: the worst-rank peak plus the reserve, against the GPU."""

    change: str  # as the user would type it
    needed_bytes: int
    fits: bool
    worst_ranks: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"change": self.change, "needed_bytes": self.needed_bytes, "fits": self.fits,
                "worst_ranks": self.worst_ranks or None}


def step_peak(config: Config, parallel: str | None = None, world_size: int = 1) -> tuple[int, str]:
    """The worst CUDA peak of the step (first or steady), and under ``parallel`` the ranks that have it."""
    if parallel is None:
        from estimator.simulate import simulate

        step = simulate(config, "cuda")
        return max(step.first_peak.bytes, step.steady_peak.bytes), ""
    from estimator.parallel import rank_groups

    groups = rank_groups(config, parallel, world_size, "cuda")
    worst = max(groups, key=lambda g: max(g.estimate.peak_bytes, g.estimate.first_step_peak_bytes))
    return max(worst.estimate.peak_bytes, worst.estimate.first_step_peak_bytes), worst.label()


def _with_batch(config: Config, batch: int) -> Config:
    return config.model_copy(update={"training": config.training.model_copy(update={"batch_size": batch})})


def batch_applies(config: Config) -> bool:
    """Whether ``training.batch_size`` is the batch the step uses (not so for a module's input shapes)."""
    from estimator.families.base import get_family

    family = get_family(config.model.family)
    if not hasattr(family, "batch_in_force"):
        return True
    return family.batch_in_force(config.model, config.training).batch_source == "training.batch_size"


def search_batch(fits: Callable[[int], int], budget: int, cap: int = MAX_BATCH_SEARCH) -> tuple[int, bool]:
    """The largest b in [1, cap] with ``fits(b) <= budget`` for a nondecreasing ``fits``; (0, False) if none.

    The second value says the answer is the cap itself (the search stopped there, the true largest
    batch may be larger). Secant steps on the convex, piecewise-linear peak; a bisection step whenever
    a secant step leaves more than half the bracket, so at most ~2·log2(cap) evaluations.
    """
    cache: dict[int, int] = {}

    def f(b: int) -> int:
        if b not in cache:
            cache[b] = fits(b)
        return cache[b]

    if f(1) > budget:
        return 0, False
    lo, before, hi = 1, 0, 0  # f(lo) <= budget; before: the previous lo (0: none); hi: a batch that does not fit
    stalled = False
    while not hi or hi - lo > 1:
        # extend the line through the last two batches that fit: on a convex peak, at or beyond the boundary
        ahead = (lo + (budget - f(lo)) * (lo - before) // (f(lo) - f(before))
                 if before and f(lo) > f(before) else 2 * lo)
        if before and ahead <= lo:
            guess = lo + 1  # the line says lo is the boundary: check the next batch
        elif hi and stalled:
            guess = (lo + hi) // 2  # the last step gained less than half: bisect once
        elif hi and not lo < ahead < hi:  # the chord from lo to hi: at or below the boundary
            guess = lo + (budget - f(lo)) * (hi - lo) // (f(hi) - f(lo))
        else:
            guess = ahead
        guess = min(max(guess, lo + 1), hi - 1 if hi else cap)
        width = (hi or 2 * cap) - lo
        if f(guess) <= budget:
            if guess == cap:
                return cap, True
            before, lo = lo, guess
            if not hi or guess + 1 < hi:  # one batch more: the boundary, or a local slope to extend
                if f(guess + 1) > budget:
                    hi = guess + 1
                elif guess + 1 == cap:
                    return cap, True
                else:
                    before, lo = guess, guess + 1
        else:
            hi = guess
        stalled = bool(hi) and (hi - lo) * 2 > width
    return lo, False


def largest_batch(config: Config, gpu: GPU, parallel: str | None = None, world_size: int = 1) -> int:
    """The largest ``training.batch_size`` (per rank) whose step fits on ``gpu`` (0 if a batch of 1 does not)."""
    return _search(config, gpu.memory_bytes - CONTEXT_RESERVE, parallel, world_size)[0]


def _search(config: Config, budget: int, parallel: str | None, world_size: int) -> tuple[int, bool]:
    if parallel is None:
        return largest_single_batch(config, budget)
    if model_state_floor(config, parallel, world_size) > budget:
        return 0, False
    return search_batch(lambda b: step_peak(_with_batch(config, b), parallel, world_size)[0], budget)


def largest_single_batch(config: Config, budget: int, cap: int = MAX_BATCH_SEARCH) -> tuple[int, bool]:
    """:func:`search_batch` on one device, the step simulated at a few batches only.

    The batch is predicted by :class:`~estimator.affine_batch.AffinePeak` (the step's events at batch 1
    and at the config's batch, or 2, sizes affine in the batch, each rounded to CUDA's blocks), then
    confirmed on the step's own events at it and at the next (built, not replayed: ``affine_batch``):
    the predicted batch fits and the next does not, which on a nondecreasing peak (what
    :func:`search_batch` assumes) is the answer. Where the programs do not line up, or the confirmation
    fails, the secant search runs on the step's own events (the batches already built are not built
    again). ``tests/test_fit_affine.py`` checks both against the simulated
    step at every batch of a range.
    """
    from estimator.affine_batch import AffinePeak, unrounded_programs

    programs: dict[int, Any] = {}
    real: dict[int, int] = {}

    def at(b: int) -> Any:
        if b not in programs:
            programs[b] = unrounded_programs(_with_batch(config, b))
        return programs[b]

    def simulated(b: int) -> int:
        """The step's worst peak at ``b`` from its own events (``AffinePeak.exact``: ``step_peak``'s value)."""
        if b not in real:
            real[b] = AffinePeak.exact(at(b)).peak(b)
        return real[b]

    if model_state_floor(config) > budget or simulated(1) > budget:
        return 0, False
    other = config.training.batch_size if config.training.batch_size > 1 else 2
    model = AffinePeak.fit((1, at(1)), (other, at(other)))
    if model is not None:
        best, capped = search_batch(model.peak, budget, cap)
        if capped:
            if simulated(cap) <= budget:
                return cap, True
        elif best and simulated(best) <= budget < simulated(best + 1):
            return best, False
    return search_batch(simulated, budget, cap)


#: the roles whose bytes do not depend on the batch: parameters, their gradients and the optimizer's state
MODEL_STATE_ROLES = ("parameter", "gradient", "optimizer_state")


def model_state_floor(config: Config, parallel: str | None = None, world_size: int = 1) -> int:
    """A lower bound on the worst CUDA peak of ``config``'s step (the worst rank's under ``parallel``) at every
    batch size, read off the step at the config's batch (simulated already: ``step_peak``).

    A step's events are the same at every batch, in the same order; the batch changes only the sizes of
    inputs, activations and temporaries. So the parameter, gradient and optimizer-state bytes live at the
    moment of a peak are live at that moment at any batch too, and a peak at a batch of 1 is at least their
    sum: where that alone exceeds the budget, no batch fits and nothing more is simulated.
    """
    if parallel is None:
        from estimator.simulate import simulate

        steps = [simulate(config, "cuda")]
    else:
        from estimator.parallel import rank_groups

        steps = [group.estimate.step for group in rank_groups(config, parallel, world_size, "cuda")]
    return max(sum(peak.by_role.get(role, 0) for role in MODEL_STATE_ROLES)
               for step in steps for peak in (step.first_peak, step.steady_peak))


STAGES = ("ddp", "zero1", "zero2", "zero3")
WORLD_SIZES = tuple(2**k for k in range(1, 14))  # 2 ... 8,192 ranks, for the smallest world size that fits


def alternatives(config: Config, gpu: GPU, parallel: str | None, world_size: int) -> list[Alternative]:
    """What would fit instead, each re-estimated: checkpointing, 8-bit Adam, 16-bit (and with fp32 master
    weights), CPU offload, micro-batches of 1 accumulated, the smallest tensor-parallel degree, a higher ZeRO
    stage (FSDP2 beyond zero2), and the smallest power-of-two world size under zero3.

    Each is independent of the others: they are computed as tasks (``forked.run_all``: shared with a forked
    child where that is safe, the costliest first), and listed in this order whichever computed them.
    """
    budget = gpu.memory_bytes - CONTEXT_RESERVE

    def attempt(change: str, cfg: Config, strategy: str | None, n: int) -> Alternative | None:
        try:
            peak, ranks = step_peak(cfg, strategy, n)
        except Exception:  # noqa: BLE001 - an alternative this model cannot take is simply not offered
            return None
        return Alternative(change, peak + CONTEXT_RESERVE, peak <= budget, ranks)

    def trials(*changes: tuple[str, Config, str | None, int]) -> Callable[[], list[Alternative]]:
        """A task: the changes tried in order (one task, so that they share what they build in one process)."""
        return lambda: [option for change in changes if (option := attempt(*change)) is not None]

    def updated(section: str, **values: Any) -> Config:
        part = getattr(config, section).model_copy(update=values)
        return config.model_copy(update={section: part})

    tasks: list[tuple[int, Callable[[], list[Alternative]]]] = []  # (cost rank: highest first, task), listed order
    family = config.model.family
    if family in ("transformer", "moe") and config.training.activation_checkpointing == "none":
        tasks.append((3, trials(("--set training.activation_checkpointing=full",
                                 updated("training", activation_checkpointing="full"), parallel, world_size))))
    if config.optimizer.name in ("adam", "adamw"):
        tasks.append((0, trials(("-o adam8bit", updated("optimizer", name="adam8bit"), parallel, world_size))))
    if config.training.precision in ("fp32", "amp-bf16", "amp-fp16"):
        sixteen = [("-p bf16", updated("training", precision="bf16"), parallel, world_size)]
        if parallel in ("zero3", "fsdp") or config.training.precision != "fp32":
            # the 16-bit layout with fp32 master weights (FSDP2's MixedPrecisionPolicy under zero3/fsdp)
            sixteen.append(("-p bf16 --set training.master_weights=true",
                            updated("training", precision="bf16", master_weights=True), parallel, world_size))
        tasks.append((2, trials(*sixteen)))
    if parallel in ("zero3", "fsdp") and not config.parallel.offload:
        # every family FSDP2 models offload for (transformer, moe, a traced module or hf model); the mlp
        # family's FSDP2 timeline refuses it, and ``attempt`` leaves a refused alternative out
        tasks.append((1, trials(("--set parallel.offload=true (model states in host memory)",
                                 updated("parallel", offload=True), parallel, world_size))))
    batch = config.training.batch_size
    if batch > 1 and batch_applies(config):
        # the same global batch as micro-batches of 1 accumulated (accumulation.py: gradients kept between them)
        steps = batch * config.training.grad_accum_steps
        tasks.append((3, trials((f"-b 1 --set training.grad_accum_steps={steps}",
                                 updated("training", batch_size=1, grad_accum_steps=steps), parallel, world_size))))
    if family == "transformer" and parallel is None:
        tasks.append((4, lambda: _smallest_tp(config, budget, attempt)))
    n = max(world_size, 2) if parallel else 8
    rank = STAGES.index(parallel) if parallel in STAGES else -1 if parallel is None else len(STAGES)
    higher = [stage for i, stage in enumerate(STAGES) if i > rank]
    for stage in higher[-2:]:
        tasks.append((2, trials((f"--parallel {stage} -n {n:,}", config, stage, n))))

    def smallest_world() -> list[Alternative]:
        smallest = _smallest_world(config, budget)
        return [] if smallest is None else [
            Alternative(f"--parallel zero3 -n {smallest[0]:,}", smallest[1] + CONTEXT_RESERVE, True, smallest[2])]

    tasks.append((2, smallest_world))
    from estimator.forked import run_all
    from estimator.parallel import dropped, fsdp_own, fsdp_split, replicated  # noqa: F401

    # ^ what the layouts' tasks import, imported once here rather than once in each process that runs one

    order = sorted(range(len(tasks)), key=lambda i: -tasks[i][0])  # stable: the listed order among equals
    answers = dict(zip(order, run_all([tasks[i][1] for i in order]), strict=True))
    listed = [option for i in range(len(tasks)) for option in answers[i]]
    # the smallest world size may be the higher stage's own -n: the same change is listed once
    return [option for k, option in enumerate(listed) if option.change not in {o.change for o in listed[:k]}]


def _smallest_tp(config: Config, budget: int, attempt: Callable[..., Alternative | None]) -> list[Alternative]:
    """Tensor parallelism (docs/tp.md): the smallest degree of 2, 4, 8 that fits, else 8."""
    for t in (2, 4, 8):
        tp = config.parallel.model_copy(update={"strategy": "tp", "world_size": t, "tp_size": t})
        with_tp = config.model_copy(update={"parallel": tp})
        if t < 8 and _tp_lower_bound(with_tp, t) > budget:
            continue  # its model states alone do not fit: the step would not either
        option = attempt(f"--parallel tp -n {t}", with_tp, "tp", t)
        if option is not None and (option.fits or t == 8):
            return [option]
    return []


def _tp_lower_bound(config: Config, t: int) -> int:
    """A lower bound on a TP rank's peak (0 where the layout is refused: the estimate says why).

    At ``optimizer.step()`` of the steady step the rank holds its parameters, their gradients and the
    optimizer state together (``tp.tp_model_states``), so its peak is at least their sum.
    """
    from estimator.errors import EstimatorError
    from estimator.parallel.base import RankContext
    from estimator.parallel.tp import check_layout, tp_model_states

    try:
        check_layout(config, t)
        return sum(tp_model_states(RankContext(config, t, "cuda"), t))
    except EstimatorError:
        return 0


def _smallest_world(config: Config, budget: int) -> tuple[int, int, str] | None:
    """The smallest power-of-two world size whose zero3 worst rank fits (None: none up to 8,192 ranks fits).

    The zero3 peak is not monotone in the world size: Shard(0) pads every tensor to a multiple of N rows,
    so once N passes a tensor's rows its all-gather buffers grow with N while the shards stop shrinking
    (docs/benchmarks.md). So the world sizes are scanned upwards and the first that fits is the answer.
    A world size whose lower bound (``_zero3_lower_bound``) exceeds the budget is passed over without
    computing its step; one whose rank 0 does not fit costs that rank alone (the worst rank's peak is at
    least rank 0's), and rank 0's step raises the activation floor the bound uses, so a model whose
    activations alone exceed the budget stops the scan at the first world size computed.
    """
    from estimator.parallel import per_rank_estimate

    try:
        floor = _activation_floor(config)
        for n in WORLD_SIZES:
            if floor > budget:  # every rank of every world size holds at least these bytes: none fits
                return None
            if _zero3_lower_bound(config, n, floor) > budget:
                continue
            first = per_rank_estimate(config, "zero3", n, "cuda", 0)
            floor = max(floor, *(_held(peak) for peak in (first.step.first_peak, first.step.steady_peak)))
            if max(first.peak_bytes, first.first_step_peak_bytes) > budget:
                continue
            peak, ranks = step_peak(config, "zero3", n)  # every distinct rank (kept for the answer)
            if peak <= budget:
                return n, peak, ranks
    except Exception:  # noqa: BLE001 - a family zero3 does not model
        return None
    return None


def _held(peak: Peak) -> int:
    """The activation and input bytes live at a peak."""
    return peak.by_role.get("activation", 0) + peak.by_role.get("input", 0)


def _activation_floor(config: Config) -> int:
    """The activation and input bytes live at the single-device CUDA step's first and steady peaks.

    Every zero3 rank runs the same forward and backward on its own batch of ``training.batch_size`` (the
    activation and input events are the single device's, rounded alike, whatever the world size), so at
    the matching moment of its steady step it holds the same activation and input bytes: a lower bound
    on its peak whatever N. The same holds of the activation and input bytes at any zero3 rank's peak.
    """
    from estimator.simulate import simulate

    step = simulate(config, "cuda")
    return max(_held(step.first_peak), _held(step.steady_peak))


def _zero3_lower_bound(config: Config, world_size: int, floor: int) -> int:
    """A lower bound on rank 0's zero3 peak on ``world_size`` ranks, without simulating its step.

    Rank 0 holds the most rows of every tensor (``fsdp.shard``); its sharded parameters and optimizer state
    are live through the whole steady step, so at the moment of ``floor`` (``_activation_floor``) too, and
    its sharded gradients with them at ``optimizer.step()``: the peak is at least the larger of
    floor + parameters + state and parameters + gradients + state (+ the 'step' scalars). Under CPU offload
    the model states are in host memory and only the floor is left; a 2-D mesh (``parallel.tp_size`` > 1)
    shards differently and gets no bound (0: the world size is simulated).
    """
    if config.parallel.tp_size != 1:
        return 0
    if config.parallel.offload:
        return floor
    from estimator.parallel.base import RankContext
    from estimator.parallel.fsdp import rank_model_states

    parameters, gradients, state, step_tensors = rank_model_states(RankContext(config, world_size, "cuda"), 0)
    return max(floor + parameters + state, parameters + gradients + state + step_tensors)


@without_gc
def fit_on(est: Estimate, gpu: GPU, mfu: float, parallel: str | None = None, world_size: int = 1,
           suggest: bool = True) -> Fit:
    """Fit, largest batch and step time of ``est``'s config on ``gpu`` (per rank under ``parallel``)."""
    cuda = est if est.device == "cuda" else estimate(est.config, "cuda")
    peak, ranks = step_peak(est.config, parallel, world_size)
    needed = peak + CONTEXT_RESERVE
    flops_per_second = gpu.peak_flops(est.config.training.precision)
    seconds = cuda.flops.matmul / flops_per_second
    applies = batch_applies(est.config)
    best, capped = _search(est.config, gpu.memory_bytes - CONTEXT_RESERVE, parallel, world_size) if applies else (
        0, False)
    fits = needed <= gpu.memory_bytes
    options = () if fits or not suggest else tuple(alternatives(est.config, gpu, parallel, world_size))
    return Fit(gpu, peak, needed, fits, best, seconds, seconds / mfu, mfu, capped, applies, ranks, parallel,
               world_size, options)
