"""Run one data-parallel training step for real on ``world_size`` CPU processes (gloo) and measure each rank.

Each rank is a spawned process on the loopback interface; it builds the model, wraps it for the
strategy (ddp: ``DistributedDataParallel``; zero1: DDP + ``ZeroRedundancyOptimizer``; zero3: FSDP2
``fully_shard`` per layer, then the root) and measures a first and a steady step with the same
:class:`LiveTensorTracker` and phase probe as ``measure_training_step``: all live tensor bytes on the
device, including what existed before the step. zero2 has no torch implementation that matches
ZeRO-2 (FSDP's SHARD_GRAD_OP keeps parameters unsharded only between forward and backward), so it
is estimate-only. Results come back as one JSON file per rank in a temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from estimator.config import Config
from estimator.errors import EstimatorError, Interrupted
from estimator.measure.comm_record import RECORDER_ENV, CollectiveLog, calls_to_json
from estimator.measure.models import step_parts, torch_optimizer_class, torch_optimizer_kwargs
from estimator.measure.step import StepMeasurement, StepProbe, TrackerSource, gc_frozen, gc_paused
from estimator.measure.tracker import LiveTensorTracker

MEASURED_STRATEGIES: tuple[str, ...] = ("ddp", "zero1", "zero3", "fsdp", "tp")
DEFAULT_TIMEOUT_S = 120.0
# The ranks are forked from multiprocessing's fork server, which imports these once for every run of
# the process: a spawned rank imported torch itself and, lazily, the engines' modules (fsdp brings about
# 600 modules, dynamo 220): about 5 s of CPU per rank on every run. The server is single-threaded when
# it forks, which is what makes forking after importing torch safe.
RANK_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor.parallel",
                "torch.distributed.optim", "torch._dynamo", "estimator.measure.distributed", "estimator.measure.tp"]
START_METHOD = "forkserver"
RANK_PROCESS_BYTES = 320 << 20
"""Resident memory of one spawned rank besides its tensors: the interpreter, torch and gloo. Measured on
torch 2.13 (CPU): the children's peak RSS (``RUSAGE_CHILDREN.ru_maxrss``) was 318-320 MiB for the seed's
model under ddp and zero3, where the tensors are a few hundred bytes."""


@dataclass
class RankMeasurement:
    """What one rank measured; bytes are storage bytes of this process's tensors on the CPU."""

    rank: int
    world_size: int
    strategy: str
    setup_bytes: int  # live after building, wrapping and the optimizer's constructor
    first_step: StepMeasurement
    steady_step: StepMeasurement
    parameters: int  # this rank's parameter bytes (its shards under zero3)
    gradients: int  # this rank's .grad bytes right after the steady backward (shards under zero3)
    optimizer_state: int  # this rank's optimizer state, excluding 'step' scalars
    optimizer_step_tensors: int
    # the collectives this rank called, in order (comm_record.calls_to_json): setup, first_step, second_step,
    # third_step
    communication: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("first_step", "steady_step")}
        data["first_step"] = self.first_step.to_json()
        data["steady_step"] = self.steady_step.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RankMeasurement:
        steps = {k: StepMeasurement(**{**data[k], "timeline": [tuple(p) for p in data[k]["timeline"]]})
                 for k in ("first_step", "steady_step")}
        return cls(**{**data, **steps})


def _free_port() -> int:
    """A free TCP port on the loopback interface (bind to port 0, let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_distributed(
    config: Config, strategy: str, world_size: int, device: str = "cpu", timeout: float = DEFAULT_TIMEOUT_S,
) -> list[RankMeasurement]:
    """Spawn ``world_size`` gloo processes, run two steps on each, return each rank's measurement."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    if not dist.is_available():
        raise EstimatorError("torch.distributed is not available in this torch build")
    if device != "cpu":
        raise EstimatorError("measure_distributed: only device 'cpu' (gloo) is supported")
    if strategy not in MEASURED_STRATEGIES:
        raise EstimatorError(f"--parallel {strategy}: torch has no implementation to measure; estimate only "
                             f"(measured: {', '.join(MEASURED_STRATEGIES)})")
    if config.model.family not in ("mlp", "transformer") and not (
            config.model.family in ("module", "hf") and strategy in ("zero3", "fsdp")):
        raise EstimatorError(f"--parallel: measures the mlp and transformer families (and a traced module under "
                             f"zero3/fsdp), not {config.model.family!r}")
    if config.parallel.offload:
        raise EstimatorError("parallel.offload: estimate only; on the CPU the host and the device are the same "
                             "memory, so a gloo run cannot tell what CPU offload moves (docs/distributed.md)")
    if config.training.master_weights and (strategy not in ("zero3", "fsdp")
                                           or config.model.family not in ("transformer", "module", "hf")):
        raise EstimatorError("training.master_weights: measured as FSDP2's MixedPrecisionPolicy (--parallel zero3 "
                             "or fsdp, transformer family); torch has no engine for fp32 master weights under "
                             f"{strategy} (estimate only)")
    with tempfile.TemporaryDirectory(prefix="estimator-dist-") as out, _stop_on_signals(world_size) as stop:
        # the fork server's environment is the one it started with: the ranks take this process's, now
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
               "GLOO_SOCKET_IFNAME": "lo", "ESTIMATOR_RUN_PARENT": str(os.getpid())}
        ctx: Any = None
        try:
            _start_fork_server()
            with stop.deferred():  # every rank is known (ctx) before an interrupt stops the run
                ctx = mp.start_processes(_worker, args=(world_size, strategy, config, env, out),
                                         nprocs=world_size, join=False, start_method=START_METHOD)
            deadline = time.monotonic() + timeout
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise EstimatorError(f"distributed measurement did not finish within {timeout:.0f} s")
        except ProcessException as exc:  # a rank raised or died: one line, not its traceback
            first = str(exc).strip().splitlines()
            raise EstimatorError(f"--parallel {strategy}: rank {exc.error_index} failed: "
                                 f"{first[-1] if first else type(exc).__name__}") from None
        finally:
            import multiprocessing

            # interrupted while spawning: the ranks started so far are this process's only children
            for p in ctx.processes if ctx is not None else multiprocessing.active_children():
                if p.is_alive():
                    p.kill()
                p.join(5)
        results = []
        for rank in range(world_size):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                results.append(RankMeasurement.from_json(json.load(f)))
    return results


def _stop_with_the_parent(parent: int) -> None:
    """End this rank when the process that started the run is gone (killed outright, it stopped none).

    A forked rank's parent is the fork server, which outlives a killed client while any rank holds its
    pipe, and a rank waiting for a peer that never came would wait out gloo's timeout. A daemon thread
    looks every half second (asleep in between, so the tracker's settling never waits for it).
    """

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(parent, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # a pid reused by another user's process: the parent is gone
                os._exit(1)

    threading.Thread(target=watch, name="estimator-parent-watch", daemon=True).start()


def _start_fork_server() -> None:
    """Start the fork server the ranks come from (once per process), with SIGINT ignored.

    A Ctrl-C reaches the whole process group. A forked rank takes the server's signal dispositions,
    and the server keeps those it started with: started with SIGINT ignored, no rank installs Python's
    KeyboardInterrupt handler, so none prints a traceback; the parent stops them
    (:func:`_stop_on_signals`). The server reads ``RANK_PRELOAD`` in the background; the ranks are forked
    once it has.
    """
    from multiprocessing import forkserver

    with _ranks_ignore_sigint():
        forkserver.set_forkserver_preload(RANK_PRELOAD)
        forkserver.ensure_running()


@contextlib.contextmanager
def _ranks_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT while the fork server is started: a disposition is per process, and only an
    ignored one survives exec. The window is the exec of one process (milliseconds); a Ctrl-C in it is
    lost, the next one stops the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Stop:
    """Raises :class:`Interrupted` on SIGINT/SIGTERM, or, inside :meth:`deferred`, once the block ends."""

    def __init__(self, world_size: int) -> None:
        self.world_size, self.defer, self.pending = world_size, False, 0

    def __call__(self, signum: int, frame: Any) -> None:
        if self.defer:
            self.pending = self.pending or signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        raise Interrupted(signum, f"stopped the {self.world_size} ranks and removed their temporary directory")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold an interrupt while the ranks are created: a forked rank exists before this process has read
        its pid from the fork server, and an interrupt in between left a rank no one knew to stop (it kept
        running and held the terminal's pipes open). The wait is the fork server's first import of torch at
        most (seconds, once per process)."""
        self.defer = True
        try:
            yield
        finally:
            self.defer = False
        if self.pending:
            self._raise(self.pending)


@contextlib.contextmanager
def _stop_on_signals(world_size: int) -> Iterator[_Stop]:
    """SIGINT/SIGTERM in the parent raise :class:`Interrupted`, so the ``finally`` that kills the ranks
    and the temporary directory's cleanup both run (a default SIGTERM would end the parent at once and
    leave ``$TMPDIR/estimator-dist-*`` and the ranks behind)."""
    stop = _Stop(world_size)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- inside each rank
def _worker(rank: int, world_size: int, strategy: str, config: Config, env: dict[str, str], out: str) -> None:
    import torch.distributed as dist

    _stop_with_the_parent(int(env["ESTIMATOR_RUN_PARENT"]))
    os.environ.update({**env, **RECORDER_ENV})  # the flight recorder lists every collective (comm_record.py)
    torch.set_num_threads(1)  # 2 cores shared by the ranks; the figures do not depend on threads
    # The Cruncher returns squeeze(-1), a view; FSDP2 warns in case a caller modifies it in place,
    # which the step never does.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        with gc_frozen():  # torch's objects out of the step's collections (step.gc_frozen)
            result = _measure_rank(config, strategy, rank, world_size)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result.to_json(), f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _mixed_precision(config: Config) -> Any:
    """FSDP2's MixedPrecisionPolicy for ``training.master_weights`` (None without it): 16-bit all-gather and
    compute over fp32 shards, gradients reduced in ``parallel.reduce_dtype``."""
    if not config.training.master_weights:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from estimator.measure.models import TORCH_DTYPES

    param_dtype = TORCH_DTYPES[config.training.precision]
    reduce = torch.float32 if config.parallel.reduce_dtype == "fp32" else param_dtype
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce)


def _as_built(config: Config) -> Config:
    """The config the ranks build the model from: fp32 parameters under the MixedPrecisionPolicy."""
    if not config.training.master_weights:
        return config
    training = config.training.model_copy(update={"precision": "fp32", "master_weights": False})
    return config.model_copy(update={"training": training})


def _wrap(model: nn.Module, strategy: str, world_size: int, reshard_after_forward: bool = True,
          mp_policy: Any = None, units: list[nn.Module] | None = None) -> nn.Module:
    """DDP for ddp/zero1 (default bucket_cap_mb, gradient_as_bucket_view=False); FSDP2 for zero3 on ``units``
    (default :func:`_blocks`), then the root."""
    if strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    # zero3: FSDP2's default; fsdp: as the config's parallel.reshard_after_forward says
    reshard = True if strategy == "zero3" else reshard_after_forward
    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for block in _blocks(model) if units is None else units:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, **policy)
    # the root as FSDP2 sets it when not told (reshard_after_forward=None): kept gathered from its forward
    # to its backward, which starts with it (docs/distributed.md); False when blocks are kept too
    fully_shard(model, mesh=mesh, reshard_after_forward=None if reshard else False, **policy)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units: the MLP's layers (each with its own weight), the transformer's blocks."""
    layers = getattr(model, "layers", None) or getattr(model, "blocks", None)
    if layers is None:
        raise EstimatorError("zero3: no 'layers' or 'blocks' to shard")
    return list(layers)


def _module_units(config: Config, model: nn.Module) -> list[nn.Module] | None:
    """A traced module's FSDP2 units, chosen as the estimate chose them (module_trace.fsdp_unit_modules)."""
    if config.model.family not in ("module", "hf"):
        return None
    from estimator.measure.module_trace import fsdp_unit_modules
    from estimator.parallel.fsdp import unit_classes

    return list(fsdp_unit_modules(model, unit_classes(config))[0].values())


def _local(t: Tensor | None) -> Tensor | None:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    if t is not None and hasattr(t, "to_local"):
        return t.to_local()  # type: ignore[no-any-return]
    return t


def _bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        t = _local(t)
        if isinstance(t, Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def _optimizer(config: Config, strategy: str, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    cls, kwargs = torch_optimizer_class(config.optimizer.name), torch_optimizer_kwargs(config)
    if strategy == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=cls, **kwargs)
    return cls(params, **kwargs)  # type: ignore[no-any-return]


def _state(optimizer: torch.optim.Optimizer, step: bool) -> list[Tensor]:
    inner = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps the local one in .optim
    return [v for s in inner.state.values() for k, v in s.items() if isinstance(v, Tensor) and (k == "step") == step]


def _measure_rank(config: Config, strategy: str, rank: int, world_size: int) -> RankMeasurement:
    device = torch.device("cpu")
    torch.manual_seed(0)
    parts = step_parts(_as_built(config), device)
    tracker = LiveTensorTracker(device, phase="setup")
    source = TrackerSource(tracker)
    grads = 0
    log = CollectiveLog(world_size)
    communication: dict[str, Any] = {}
    with tracker:
        if strategy == "tp" or config.parallel.tp_size > 1:  # tensor parallel, alone or on a 2-D mesh
            from estimator.measure.tp import loss_context, wrap_tp

            model = wrap_tp(parts.build_model(), config, strategy, world_size, _mixed_precision(config))
            loss_ctx = lambda: loss_context(config)  # noqa: E731  (a fresh context each time: single use)
        else:
            built = parts.build_model()
            model = _wrap(built, strategy, world_size, config.parallel.reshard_after_forward,
                          _mixed_precision(config), _module_units(config, built))
            loss_ctx = contextlib.nullcontext
        inputs, target = parts.make_batch()
        optimizer = _optimizer(config, strategy, [p for p in model.parameters() if p.requires_grad])
        setup = tracker.live_bytes
        communication["setup"] = calls_to_json(log.take())

        def forward_backward(enter: Any) -> tuple[Any, Any]:
            nonlocal grads
            enter("forward")
            autocast: Any = contextlib.nullcontext()
            if parts.autocast_dtype is not None:
                autocast = torch.autocast(device_type="cpu", dtype=parts.autocast_dtype)
            with autocast, loss_ctx():
                if parts.loss_fn is None:
                    pred, loss = None, model(*inputs, target)
                else:
                    pred = model(*inputs)
                    enter("loss")
                    loss = parts.loss_fn(pred, target)
            enter("backward")
            with loss_ctx():
                loss.backward()
            grads = _bytes(p.grad for p in model.parameters())
            return pred, loss

        def run(enter: Any) -> None:
            # gradient accumulation: K micro-batches (FSDP2 reduce-scatters after each), one optimizer step
            no_sync = not config.parallel.sync_every_micro_batch and hasattr(model, "set_requires_gradient_sync")
            for _ in range(config.training.grad_accum_steps - 1):
                if no_sync:  # FSDP2 keeps the unsharded gradients until the last micro-batch
                    model.set_requires_gradient_sync(False)
                pred, loss = forward_backward(enter)
                del pred, loss
            if no_sync:
                model.set_requires_gradient_sync(True)
            pred, loss = forward_backward(enter)
            if config.training.grad_accum_steps > 1:
                del pred, loss
                pred = loss = None
            enter("optimizer_step")
            optimizer.step()
            enter("zero_grad")
            optimizer.zero_grad(set_to_none=True)
            del pred, loss

        steps = []
        for label in ("first_step", "steady_step"):
            probe = StepProbe(source, None, label)
            with gc_paused():
                probe.begin()
                run(probe.enter)
                steps.append(probe.end())
            communication[label.replace("steady", "second")] = calls_to_json(log.take())
        run(lambda phase: None)  # a third step, for its collectives only: DDP rebuilds its buckets in the second
        communication["third_step"] = calls_to_json(log.take())
        debug = os.environ.get("ESTIMATOR_DIST_EVENTS")  # a directory: dump every tracker event per rank
        if debug:
            with open(os.path.join(debug, f"rank{rank}.events"), "w") as f:
                f.writelines(f"{e.phase} {e.kind} {e.delta} {e.live_bytes} {e.op} {e.shape}\n" for e in tracker.events)
    return RankMeasurement(
        rank=rank, world_size=world_size, strategy=strategy, setup_bytes=setup,
        first_step=steps[0], steady_step=steps[1],
        parameters=_bytes(model.parameters()), gradients=grads,
        optimizer_state=_bytes(_state(optimizer, step=False)),
        optimizer_step_tensors=_bytes(_state(optimizer, step=True)),
        communication=communication,
    )



def main(argv: list[str] | None = None) -> None:
    """``python -m estimator.measure.distributed [--world-size N] [--set k=v ...]``: the accuracy table."""
    import argparse

    from estimator import load_config
    from estimator.distributed import per_rank_estimate

    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--strategies", default=",".join(MEASURED_STRATEGIES))
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(None, overrides=args.set)
    print("| strategy | rank | first-step est. | measured | steady est. | measured | steady phase |")
    print("|---|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        for m in measure_distributed(config, strategy, args.world_size):
            e = per_rank_estimate(config, strategy, args.world_size, "cpu", m.rank)
            print(f"| {strategy} | {m.rank} | {e.first_step_peak_bytes:,} | {m.first_step.peak_bytes:,} | "
                  f"{e.peak_bytes:,} | {m.steady_step.peak_bytes:,} | {m.steady_step.peak_phase} |")


if __name__ == "__main__":
    main()
