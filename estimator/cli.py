"""The ``estimator`` command: parse options -> call the API -> render. No formulas here."""

from __future__ import annotations

import functools
import gc
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

from estimator.errors import EstimatorError, Interrupted
from estimator.nogc import gc_paused
from estimator.output import OutputError, SafeStdout, user_stdout_to_stderr, write_json
from estimator.startup import plugin_loader_stand_in

with gc_paused():  # typer's modules live as long as the process: no collections while they load (startup.py)
    import typer
    from typer.core import TyperCommand, TyperGroup


def _plain_flags(params: list[Any]) -> None:
    """On/off flags take no value: no ``<bool>`` metavar in --help."""
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""


class _FlagCommand(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_flags(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        _plain_flags([option] if option is not None else [])
        return option


class _FlagGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_flags(self.params)

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        """Typer's main, but a usage error (an unknown option, ``-b x``) is one ``error:`` line, exit 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.Abort:
            _print_errors(["aborted"])
            sys.exit(1)
        except Exception as exc:
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise
            ctx = getattr(exc, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _print_errors([f"{exc.format_message()}{hint}"])
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        _plain_flags([option] if option is not None else [])
        return option


class _Typer(typer.Typer):
    """typer.Typer whose commands show flags as flags in --help."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _FlagCommand)
        return super().command(*args, **kwargs)


app = _Typer(
    cls=_FlagGroup,
    add_completion=False,
    no_args_is_help=False,
    help="Memory and FLOPs of one training step: estimated instantly, then verified for real.",
    pretty_exceptions_enable=False,
)


class _LazyConsole:
    """A rich ``Console`` made on first use, so that ``--json`` output never imports rich (about 30 ms).

    Every attribute is the real console's; ``stdout=True`` writes through :class:`SafeStdout`.
    """

    def __init__(self, stdout: bool) -> None:
        self._stdout = stdout
        self._console: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = (Console(file=SafeStdout(), highlight=False, emoji=False) if self._stdout
                             else Console(stderr=True, highlight=False, emoji=False))
        return getattr(self._console, name)


out: Any = _LazyConsole(stdout=True)
err: Any = _LazyConsole(stdout=False)

MAX_WORLD_SIZE = 1 << 20
"""The most ranks ``estimate --parallel`` accepts (1,048,576: 64x the 16,384 GPUs of Llama 3 405B's run)."""


def _version(value: bool) -> None:
    if value:
        from estimator import __version__

        out.print(f"estimator {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                 help="print the version and exit"),
) -> None:
    """Memory and FLOPs of one training step: estimated instantly, then verified for real."""

ConfigArg = typer.Argument(None, help="YAML or JSON config; none = the seed's example (B=2, D=4, AdaGrad)")
SetOpt = typer.Option(None, "--set", "-s", help="override a field: --set training.batch_size=8 (repeatable)")
BatchOpt = typer.Option(None, "--batch-size", "-b", help="shortcut for --set training.batch_size=N")
OptimOpt = typer.Option(None, "--optimizer", "-o", help="shortcut for --set optimizer.name=NAME")
PrecOpt = typer.Option(None, "--precision", "-p", help="fp32 | bf16 | fp16 | amp-bf16 | amp-fp16")
ModelOpt = typer.Option(None, "--model", "-m", help="a preset name (see `estimator models`), a local "
                        "config.json (or its directory), or a Hugging Face hub id org/name (docs/hf.md)")
JsonOpt = typer.Option(False, "--json", help="print one JSON document instead of tables: an object "
                       "(estimate, verify) or a list (compare, optimizers, models, gpus); docs/json.md")
ParallelOpt = typer.Option(None, "--parallel",
                           help="per-rank memory under ddp | zero1 | zero2 | zero3 (FSDP) | fsdp | tp (tensor)")
TpOpt = typer.Option(None, "--tp", help="tensor-parallel degree N: --parallel tp -n N, or dp x N with fsdp/zero3")
SpOpt = typer.Option(False, "--sp", help="with tensor parallelism: sequence parallelism (parallel.sequence_parallel)")
WorldSizeOpt = typer.Option(None, "--world-size", "-n",
                            help="ranks for --parallel (default 2; batch_size is per rank)")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure as ``error: ...`` lines on stderr and an exit code, never a traceback.

    EstimatorError: exit 2 (bad input). A failed write to stdout: exit 2, or 141 for a closed pipe.
    SIGINT/SIGTERM: 130/143 (128 + the signal). Anything else is a bug: one line, exit 1, and
    ``ESTIMATOR_DEBUG=1`` shows the traceback. Under ``--json``, whatever user code prints to stdout
    goes to stderr, so stdout holds the one JSON document.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with user_stdout_to_stderr() if kwargs.get("as_json") else nullcontext():
                return fn(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as exc:
            code = report_failure(exc)
            if code is None:
                raise
            raise typer.Exit(code) from None

    return wrapper


def report_failure(exc: BaseException) -> int | None:
    """Print ``exc`` as one ``error:`` line and return the exit code; None for what is not ours to
    report (Typer's own exits and usage errors, and anything under ``ESTIMATOR_DEBUG=1``)."""
    if isinstance(exc, (typer.Exit, typer.Abort)) or hasattr(exc, "show"):
        return None
    if isinstance(exc, OutputError):
        _print_errors(exc.problems)
        return exc.exit_code
    if isinstance(exc, EstimatorError):
        _print_errors(exc.problems)
        return 2
    if isinstance(exc, Interrupted):
        _print_errors([exc.message])
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        _print_errors(["interrupted by SIGINT"])
        return 130
    if os.environ.get("ESTIMATOR_DEBUG"):
        return None
    if isinstance(exc, RecursionError):
        _print_errors(["the input is nested too deeply"])
        return 2
    if isinstance(exc, MemoryError):
        _print_errors(["out of memory; reduce the model or training.batch_size"])
        return 2
    first = (str(exc).strip().splitlines() or [""])[0]
    _print_errors([f"internal error: {type(exc).__name__}: {first} -- please report it "
                   "(ESTIMATOR_DEBUG=1 shows the traceback)"])
    return 1


def _print_errors(problems: list[str]) -> None:
    """One line per problem: control characters in echoed user text (a line break) are shown escaped."""
    for problem in problems:
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in problem)
        try:
            err.print(f"error: {text}", markup=False, soft_wrap=True)
        except OSError:  # stderr itself is gone: the exit code still says it
            pass


def tp_shortcuts(set_: Optional[list[str]], parallel: Optional[str], world_size: Optional[int], tp: Optional[int],
                 sp: bool) -> tuple[Optional[list[str]], Optional[str], Optional[int]]:
    """--tp N and --sp as --set parallel.tp_size=N / parallel.sequence_parallel=true; --tp alone: --parallel tp -n N."""
    extra = list(set_ or [])
    if tp is not None:
        if tp < 1:
            raise EstimatorError(f"--tp: expected a tensor-parallel degree >= 1, got {tp}")
        extra.append(f"parallel.tp_size={tp}")
        parallel = parallel or "tp"
        if parallel == "tp" and world_size is None:
            world_size = tp
    if sp:
        extra.append("parallel.sequence_parallel=true")
    return (extra or set_), parallel, world_size


def _mesh_json(cfg: Any, parallel: str, world_size: int, ranks: list[Any]) -> dict[str, Any]:
    """With tensor parallelism: the (dp, tp) mesh and each rank group's coordinates on it (docs/tp.md)."""
    from estimator.parallel.mesh import coordinates, mesh_shape

    dp, tp = mesh_shape(cfg, parallel, world_size)
    if tp == 1:  # a traced module under FSDP2: the units fully_shard wraps (docs/module.md)
        from estimator.parallel.fsdp import module_units_json

        units = module_units_json(cfg, parallel)
        return {"fsdp_units": units} if units else {}
    return {"mesh": {"dims": ["dp", "tp"], "shape": [dp, tp],
                     "groups": [coordinates(r.ranks, tp) for r in ranks]}}


def _print_mesh(cfg: Any, parallel: str, world_size: int) -> None:
    from estimator.parallel.mesh import describe, mesh_shape

    shape = mesh_shape(cfg, parallel, world_size)
    if shape[1] > 1:
        out.print(describe(shape), markup=False)
    from estimator.parallel.fsdp import module_units_line

    line = module_units_line(cfg, parallel)
    if line:
        out.print(line, markup=False)


def layout_in_force(cfg: Any, parallel: Optional[str], world_size: Optional[int], most: int = MAX_WORLD_SIZE,
                    why: str = "") -> tuple[Any, Optional[str], int]:
    """The config with the parallel layout in force: --parallel / -n over its ``parallel:`` section.

    Returns the config (its ``parallel`` section updated), the strategy (None: one device) and the world size;
    -n without a strategy (on the command line or in the config) is an error.
    """
    configured = cfg.parallel.strategy if cfg.parallel.strategy != "none" else None
    strategy = parallel or configured
    if cfg.parallel.offload and strategy not in ("zero3", "fsdp"):  # said, not silently ignored
        raise EstimatorError("parallel.offload: FSDP2's CPU offload applies with --parallel zero3 or fsdp, "
                             f"not {strategy or 'one device'}")
    from estimator.config import parallel_options_that_cannot_apply

    unused = parallel_options_that_cannot_apply(cfg.parallel, strategy, cfg.training.master_weights)
    if unused:  # said, not silently ignored
        raise EstimatorError(*unused)
    if strategy is None:
        world_size_in_force(None, world_size)
        return cfg, None, 1
    if world_size is None and (configured is not None or cfg.parallel.world_size != 1):
        world_size = cfg.parallel.world_size  # the config's ranks, also under --parallel (not the default 2)
    n = world_size_in_force(strategy, world_size, most, why)
    section = cfg.parallel.model_copy(update={"strategy": strategy, "world_size": n})
    from estimator.parallel.tp import plain_blocks

    return plain_blocks(cfg.model_copy(update={"parallel": section}), strategy), strategy, n


def world_size_in_force(parallel: Optional[str], world_size: Optional[int], most: int = MAX_WORLD_SIZE,
                        why: str = "") -> int:
    """The number of ranks for --parallel (2 unless -n is given); -n without --parallel is an error."""
    if parallel is None:
        if world_size is not None:
            raise EstimatorError(f"--world-size: applies with --parallel only (e.g. --parallel ddp -n {world_size})")
        return 1
    n = 2 if world_size is None else world_size
    if n < 1:
        raise EstimatorError(f"--world-size: expected at least 1 rank, got {n}")
    if n > most:
        raise EstimatorError(f"--world-size: at most {most:,} ranks{why}, got {n:,}")
    return n


MAX_CURVE_POINTS = 10_000
"""The most points a --timeline --json curve has (a 100,000-layer model has a million events)."""


def _curve_json(points: list[tuple[str, int]], most: int = MAX_CURVE_POINTS) -> list[dict[str, Any]]:
    """A live-bytes curve as JSON: one {phase, live_bytes} per event, in order.

    A curve of more than ``most`` events is cut into ``most`` runs of consecutive events, each run
    given by its highest point (its phase and bytes), so the peak and each phase's peak stay exact.
    """
    if len(points) > most:
        edges = [len(points) * i // most for i in range(most + 1)]
        points = [max(points[a:b], key=lambda p: p[1]) for a, b in zip(edges, edges[1:], strict=False)]
    return [{"phase": phase, "live_bytes": live} for phase, live in points]


def build_config(
    path: Optional[Path],
    sets: Optional[list[str]],
    batch_size: Optional[int] = None,
    optimizer: Optional[str] = None,
    precision: Optional[str] = None,
    model: Optional[str] = None,
    device: Optional[str] = None,
) -> Any:
    """Load the config and apply the shortcut options, then the --set overrides (which win)."""
    from estimator.loader import load_config, read_config_file

    overrides: list[str] = []
    if batch_size is not None:
        overrides.append(f"training.batch_size={batch_size}")
    if optimizer is not None:
        overrides.append(f"optimizer.name={optimizer}")
    if precision is not None:
        overrides.append(f"training.precision={precision}")
    if device is not None:
        overrides.append(f"device={device}")
    overrides += sets or []
    if model is None:
        return load_config(path, overrides)
    data = read_config_file(path) if path is not None else {}
    from estimator.presets import model_section

    data["model"] = model_section(model)  # a preset, else a local config.json, else org/name in the hub cache
    return load_config(None, overrides, base=data)


def _rank_estimates(cfg: Any, parallel: Optional[str], world_size: int, device: str) -> list[Any]:
    """Per-rank estimates for --parallel, or [] without it."""
    if parallel is None:
        return []
    from estimator.parallel import rank_groups

    return rank_groups(cfg, parallel, world_size, device)


def emit_json(payload: Any) -> None:
    """One strict (RFC 8259) JSON document on stdout; see estimator/output.py."""
    write_json(payload)


@app.command()
@user_errors
def estimate(
    config: Optional[Path] = ConfigArg,
    set_: Optional[list[str]] = SetOpt,
    batch_size: Optional[int] = BatchOpt,
    optimizer: Optional[str] = OptimOpt,
    precision: Optional[str] = PrecOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cuda | cpu (default: the config's, cuda)"),
    as_json: bool = JsonOpt,
    timeline: bool = typer.Option(False, "--timeline", help="draw live bytes over the step's phases"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write the timeline chart to this PNG (matplotlib)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", "-g", help="does it fit, largest batch, step time (see `gpus`)"),
    mfu: Optional[float] = typer.Option(
        None, "--mfu", help="with --gpu: model FLOPs utilisation assumed for the step time, (0-1] (default 0.4)"),
    parallel: Optional[str] = ParallelOpt,
    world_size: Optional[int] = WorldSizeOpt,
    tp: Optional[int] = TpOpt,
    sp: bool = SpOpt,
) -> None:
    """Estimate memory, the peak and FLOPs of one training step (no torch needed)."""
    from estimator.api import estimate as run_estimate
    from estimator.device_caveats import cpu_forms

    set_, parallel, world_size = tp_shortcuts(set_, parallel, world_size, tp, sp)

    if plot is not None:
        from estimator.plot import check_plot_path

        check_plot_path(plot)
    if mfu is not None and gpu is None:
        raise EstimatorError("--mfu: applies with --gpu only (the step time on that GPU)")
    mfu = 0.4 if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise EstimatorError(f"--mfu: expected a fraction in (0, 1], got {mfu}")
    gpu_spec = None
    if gpu is not None:
        from estimator.hardware import get_gpu

        gpu_spec = get_gpu(gpu)
    cfg = build_config(config, set_, batch_size, optimizer, precision, model, device)
    cfg, parallel, world_size = layout_in_force(cfg, parallel, world_size)
    result = run_estimate(cfg)
    caveats = cpu_forms(cfg.model, result.device)
    fit = None
    if gpu_spec is not None:
        from estimator.fit import fit_on

        fit = fit_on(result, gpu_spec, mfu, parallel, world_size if parallel else 1)
    ranks = _rank_estimates(cfg, parallel, world_size, result.device)
    if plot is not None:
        from estimator.plot import plot_timeline

        plot_timeline(plot, estimated=result)
    if as_json:
        extra = {"gpu": fit.to_json()} if fit else {}
        if cfg.checkpoint is not None:  # an hf_config/hub model with safetensors beside its config.json
            extra["checkpoint"] = {**cfg.checkpoint.to_json(), "config_parameters": result.parameters}
        if cfg.analytic_omissions:
            extra["analytic_omissions"] = list(cfg.analytic_omissions)
        if caveats:
            extra["device_caveats"] = list(caveats)
        if ranks:
            extra["distributed"] = {"strategy": parallel, "world_size": world_size,
                                    "ranks": [r.to_json() for r in ranks]}
            extra["distributed"].update(_mesh_json(cfg, parallel, world_size, ranks))
        if timeline:
            first, steady = result.step.first_curve(), result.step.steady_curve()
            extra["timeline"] = {"first_step": _curve_json(first), "steady_step": _curve_json(steady),
                                 "events": {"first_step": len(first), "steady_step": len(steady)}}
        emit_json({**result.to_json(), **extra})
        return
    from estimator.report import render_alternatives, render_estimate, render_fit, render_ranks

    render_estimate(result, out, timeline=timeline)
    if cfg.checkpoint is not None:
        from estimator.safetensors_header import summary_line

        out.print(summary_line(cfg.checkpoint, result.parameters), markup=False)
    for omission in cfg.analytic_omissions:
        out.print(f"Not in this estimate: {omission}.", markup=False)
    for caveat in caveats:
        out.print(f"On CUDA: {caveat}.", markup=False)
    if fit is not None:
        render_fit(fit, result, out)
        render_alternatives(fit, out)
    if ranks:
        render_ranks(ranks, None, out, None)
        _print_mesh(cfg, parallel, world_size)
    if plot is not None:
        out.print(f"wrote {plot}")


def optimizer_list(text: str) -> list[str]:
    """``--optimizers a,b,c``: names in order; an empty or repeated name is an error, not skipped."""
    names = [n.strip().lower() for n in text.split(",")]
    if names == [""]:
        raise EstimatorError("--optimizers: give at least one optimizer name, e.g. sgd,adam")
    for i, name in enumerate(names):
        if not name:
            raise EstimatorError(f"--optimizers {text}: name {i + 1} is empty (expected names separated by "
                                 "single commas, e.g. sgd,adam)")
        if name in names[:i]:
            raise EstimatorError(f"--optimizers {text}: {name!r} is given twice")
    return names


@app.command()
@user_errors
def compare(
    config: Optional[Path] = ConfigArg,
    optimizers: str = typer.Option(
        "sgd,momentum,adagrad,rmsprop,adam,adamw", "--optimizers", help="comma-separated optimizer names"
    ),
    set_: Optional[list[str]] = SetOpt,
    batch_size: Optional[int] = BatchOpt,
    precision: Optional[str] = PrecOpt,
    model: Optional[str] = ModelOpt,
    device: Optional[str] = typer.Option(None, "--device", "-d", help="cuda | cpu"),
    as_json: bool = JsonOpt,
) -> None:
    """Compare the same step under several optimizers."""
    from estimator.api import compare as run_compare

    names = optimizer_list(optimizers)
    cfg = build_config(config, set_, batch_size, None, precision, model, device)
    results = run_compare(cfg, names)
    if as_json:
        emit_json([{"optimizer": r.config.optimizer.name, **r.to_json()} for r in results])
        return
    from estimator.report import render_compare

    render_compare(results, out)


@app.command()
@user_errors
def optimizers(as_json: bool = JsonOpt) -> None:
    """List the registered optimizers: state tensors per parameter, update rule, source."""
    from estimator.optimizers import get_optimizer, optimizer_names
    from estimator.report import optimizer_state_summary, render_optimizers

    if as_json:
        emit_json([
            {"name": n, "state": optimizer_state_summary(n), "update_rule": get_optimizer(n).update_rule,
             "source": get_optimizer(n).source, "torch_class": get_optimizer(n).torch_class,
             "step_tensor": get_optimizer(n).step_tensor}
            for n in optimizer_names()
        ])
        return
    render_optimizers(out)


@app.command()
@user_errors
def verify(
    config: Optional[Path] = ConfigArg,
    device: str = typer.Option("auto", "--device", "-d", help="auto (CUDA if present, else the CPU) | cpu | cuda[:N]"),
    impl: str = typer.Option("torch", "--impl", help="torch (torch.optim) | textbook (the seed's optimizers)"),
    set_: Optional[list[str]] = SetOpt,
    batch_size: Optional[int] = BatchOpt,
    optimizer: Optional[str] = OptimOpt,
    precision: Optional[str] = PrecOpt,
    model: Optional[str] = ModelOpt,
    tolerance: Optional[float] = typer.Option(
        None, "--tolerance", help="exit 1 if any compared figure is off by more than this fraction (e.g. 0.05)"),
    show_state: bool = typer.Option(
        False, "--show-state", help="also print state_dict and optimizer state before/after one step"),
    timeline: bool = typer.Option(False, "--timeline", help="draw the measured live bytes over the step"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="write estimated and measured timelines to this PNG"),
    parallel: Optional[str] = typer.Option(
        None, "--parallel", help="run --world-size gloo processes on the CPU: ddp | zero1 | zero3 (FSDP2) | fsdp | tp"),
    world_size: Optional[int] = WorldSizeOpt,
    tp: Optional[int] = TpOpt,
    sp: bool = SpOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run one real optimizer step on the device and show estimate and measurement side by side."""
    set_, parallel, world_size = tp_shortcuts(set_, parallel, world_size, tp, sp)
    ranks_most = 4 * (os.cpu_count() or 1)
    why = f" on this machine (4 x its {os.cpu_count() or 1} CPUs: each rank is a process)"
    given_world_size = world_size
    world_size = world_size_in_force(parallel, world_size, ranks_most, why)

    def refuse_unused() -> None:  # what verify --parallel does not do is refused, not ignored
        unused = [name for name, given in (("--plot", plot is not None), ("--show-state", show_state),
                                           ("--timeline", timeline), ("--impl textbook", impl != "torch")) if given]
        if unused:
            raise EstimatorError(f"{unused[0]}: not available with --parallel (each rank's figures are compared "
                                 "in the per-rank table)")

    if parallel is not None:
        refuse_unused()
    if impl not in ("torch", "textbook"):
        raise EstimatorError(f"--impl: expected torch or textbook, got {impl!r}")
    if tolerance is not None and not 0 <= tolerance < 10:
        raise EstimatorError(f"--tolerance: expected a fraction such as 0.05, got {tolerance}")
    if plot is not None:
        from estimator.plot import check_plot_path

        check_plot_path(plot)
    from estimator.hf_config import engine_default

    with engine_default("transformers"):  # an hf_config/hub model: measure transformers' own model (docs/hf.md)
        cfg = build_config(config, set_, batch_size, optimizer, precision, model)
    if parallel is None and cfg.parallel.strategy != "none":  # the config's parallel: section, as if typed
        parallel = cfg.parallel.strategy
        world_size = world_size_in_force(parallel, cfg.parallel.world_size, ranks_most, why)
        refuse_unused()
    elif parallel is not None and given_world_size is None and cfg.parallel.world_size != 1:
        world_size = world_size_in_force(parallel, cfg.parallel.world_size, ranks_most, why)  # the config's ranks
    from estimator.config import parallel_options_that_cannot_apply

    unused = parallel_options_that_cannot_apply(cfg.parallel, parallel, cfg.training.master_weights)
    if unused:  # said, not silently ignored
        raise EstimatorError(*unused)
    torch_modules = _import_torch_side()
    if parallel is not None:
        _verify_parallel(cfg, parallel, world_size, device, tolerance, as_json)
        return
    status = err.status("building the model", spinner="dots") if not as_json else None
    with status or nullcontext():
        result = torch_modules.verify.run_verify(
            cfg, device, impl, on_phase=(lambda p: status.update(f"running: {p}")) if status else None)
    if show_state:  # after run_verify, which refused anything that would not fit
        device_obj = torch_modules.step.resolve_device(device)
        torch_modules.show_state.show_state(cfg, device_obj, impl, err if as_json else out)
    if plot is not None:
        from estimator.plot import plot_timeline

        plot_timeline(plot, estimated=result.estimate, measured=result.measurement.real_steady_step.timeline,
                      title=f"live bytes over one steady-state step ({result.measurement.device})")
    if as_json:
        data = result.to_json()
        if timeline:
            m = result.measurement
            data["timeline"] = {"estimated": _curve_json(result.estimate.step.steady_curve()),
                                "measured": _curve_json(getattr(m, "real_steady_step", m.steady_step).timeline)}
        emit_json(data)
    else:
        from estimator.report import render_verification

        render_verification(result, out, tolerance, plot_points=timeline)
        if plot is not None:
            out.print(f"wrote {plot}")
    if tolerance is not None and result.failures(tolerance):
        bad = ", ".join(f"{r.key} (ratio {r.ratio:.4f})" if r.ratio else r.key for r in result.failures(tolerance))
        err.print(f"verify: off by more than {tolerance:g}: {bad}", markup=False)
        raise typer.Exit(1)


def _verify_parallel(cfg: Any, parallel: str, world_size: int, device: str, tolerance: Optional[float],
                     as_json: bool) -> None:
    """verify --parallel: real gloo processes on the CPU, each rank's figures beside its estimate."""
    from estimator.distributed import per_rank_estimates
    from estimator.measure.distributed import measure_distributed
    from estimator.report import rank_rows, render_ranks

    if device not in ("auto", "cpu"):
        raise EstimatorError(f"--parallel: runs on the CPU with the gloo backend; got --device {device}")
    if world_size < 2:
        raise EstimatorError(f"--world-size: --parallel needs at least 2 ranks, got {world_size}")
    from estimator.parallel.tp import plain_blocks

    cfg = plain_blocks(cfg, parallel)
    from estimator.measure.distributed import RANK_PROCESS_BYTES
    from estimator.measure.verify import refuse_if_too_large

    estimates = per_rank_estimates(cfg, parallel, world_size, "cpu")
    # each rank is a process with its own torch (measured: about 320 MiB resident before the step)
    need = (max(max(r.peak_bytes, r.first_step_peak_bytes) for r in estimates) + RANK_PROCESS_BYTES) * world_size
    refuse_if_too_large(need, "cpu", f"this step on {world_size} ranks")
    with err.status(f"running {world_size} {parallel} processes", spinner="dots") if not as_json else nullcontext():
        measured = measure_distributed(cfg, parallel, world_size, "cpu")
    if as_json:
        emit_json({"strategy": parallel, "world_size": world_size, "ranks": [
            {"estimate": e.to_json(), "measurement": m.to_json(),
             "comparison": {r.key: {"estimated": r.estimated, "measured": r.measured} for r in rank_rows(e, m)}}
            for e, m in zip(estimates, measured, strict=True)]})
    else:
        render_ranks(estimates, measured, out, tolerance)
        _print_mesh(cfg, parallel, world_size)
    if tolerance is not None:
        bad = [f"rank {e.rank} {r.key}" for e, m in zip(estimates, measured, strict=True)
               for r in rank_rows(e, m) if not r.within(tolerance)]
        if bad:
            err.print(f"verify: off by more than {tolerance:g}: {', '.join(bad)}", markup=False)
            raise typer.Exit(1)


def _import_torch_side() -> Any:
    """Import the torch-side modules, or explain in one line how to install torch."""
    try:
        import importlib

        import torch  # noqa: F401
    except ImportError:
        raise EstimatorError("verify needs PyTorch: pip install 'estimator[torch]' (or any torch >= 2.4)") from None
    from types import SimpleNamespace

    return SimpleNamespace(
        verify=importlib.import_module("estimator.measure.verify"),
        step=importlib.import_module("estimator.measure.step"),
        show_state=importlib.import_module("estimator.measure.show_state"),
    )


@app.command()
@user_errors
def models(as_json: bool = JsonOpt) -> None:
    """List the model presets (use with --model NAME or `model: {preset: NAME}`)."""
    from estimator.presets import PRESETS
    from estimator.report import render_models

    rows = []
    for name, preset in PRESETS.items():
        from estimator.families.base import get_family

        cfg = preset.config()
        count = sum(p.numel for p in get_family(cfg.family).parameters(cfg))  # the transformer or moe family
        rows.append({"name": name, "parameters": count, "published": preset.params,
                     "d_model": cfg.d_model, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                     "num_kv_heads": cfg.kv_heads, "vocab_size": cfg.vocab_size, "source": preset.source})
    if as_json:
        emit_json(rows)
        return
    render_models(rows, out)


@app.command()
@user_errors
def gpus(as_json: bool = JsonOpt) -> None:
    """List the GPUs `estimate --gpu` knows: memory and dense peak throughput, with sources."""
    from estimator.hardware import GPUS
    from estimator.report import render_gpus

    if as_json:
        emit_json([{"name": g.name, "memory_bytes": g.memory_bytes, "bf16_tflops": g.bf16_tflops,
                    "fp32_tflops": g.fp32_tflops, "source": g.source} for g in GPUS.values()])
        return
    render_gpus(out)


@app.command()
@user_errors
def schema() -> None:
    """Print the JSON Schema of the config file (for editor completion)."""
    from estimator.config import Config

    emit_json(Config.model_json_schema())


def main() -> None:
    """Entry point of the console script and of ``python -m estimator``.

    Stdout is checked twice: closed before we start (``>&-``) is an error, and the final flush at
    exit (``> /dev/full``, a reader that went away) is reported as one line, not a traceback.
    """
    if sys.stdout is None:
        _print_errors(["stdout is closed; nothing could be printed (run without >&-)"])
        sys.exit(2)
    gc.freeze()  # the imports' objects live as long as the command: no collection scans them (startup.py)
    code: Any = 0
    try:
        with plugin_loader_stand_in():  # typer's per-option TypeAdapters need no plugin scan (startup.py)
            app(prog_name="estimator")
    except SystemExit as exc:
        code = exc.code
    except (Exception, KeyboardInterrupt) as exc:  # outside a command (an option's callback): the same lines
        code = report_failure(exc)
        if code is None:
            raise
    try:
        sys.stdout.flush()
    except OSError as exc:
        failure = OutputError(exc)
        if not code:
            _print_errors(failure.problems)
            code = failure.exit_code
    if code:  # whatever is still buffered could not be written: do not fail again at interpreter exit
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
    sys.exit(code)
