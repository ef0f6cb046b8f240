"""The ``estimator`` command: parse options -> call the API -> render. No formulas here."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from estimator.errors import EstimatorError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Memory and FLOPs of one training step: estimated instantly, then verified for real.",
    pretty_exceptions_enable=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ConfigArg = typer.Argument(None, help="YAML or JSON config; none = the seed's example (B=2, D=4, AdaGrad)")
SetOpt = typer.Option(None, "--set", "-s", help="override a field: --set training.batch_size=8 (repeatable)")
BatchOpt = typer.Option(None, "--batch-size", "-b", help="shortcut for --set training.batch_size=N")
OptimOpt = typer.Option(None, "--optimizer", "-o", help="shortcut for --set optimizer.name=NAME")
PrecOpt = typer.Option(None, "--precision", "-p", help="fp32 | bf16 | fp16 | amp-bf16 | amp-fp16")
ModelOpt = typer.Option(None, "--model", "-m", help="a preset name (see `estimator models`)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object to stdout instead of tables")
ParallelOpt = typer.Option(None, "--parallel", help="per-rank memory under ddp | zero1 | zero2 | zero3 (FSDP)")
WorldSizeOpt = typer.Option(2, "--world-size", "-n", help="ranks for --parallel (batch_size is per rank)")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn EstimatorError into 'error: ...' lines on stderr and exit code 2 (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EstimatorError as exc:
            for problem in exc.problems:
                err.print(f"error: {problem}", markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


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
    data["model"] = {"preset": model}
    return load_config(None, overrides, base=data)


def _rank_estimates(cfg: Any, parallel: Optional[str], world_size: int, device: str) -> list[Any]:
    """Per-rank estimates for --parallel, or [] without it."""
    if parallel is None:
        return []
    from estimator.distributed import per_rank_estimates

    return per_rank_estimates(cfg, parallel, world_size, device)


def emit_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


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
    mfu: float = typer.Option(0.4, "--mfu", help="model FLOPs utilisation assumed for the step time (0-1]"),
    parallel: Optional[str] = ParallelOpt,
    world_size: int = WorldSizeOpt,
) -> None:
    """Estimate memory, the peak and FLOPs of one training step (no torch needed)."""
    from estimator.api import estimate as run_estimate

    if plot is not None:
        from estimator.plot import check_plot_path

        check_plot_path(plot)
    if not 0 < mfu <= 1:
        raise EstimatorError(f"--mfu: expected a fraction in (0, 1], got {mfu}")
    gpu_spec = None
    if gpu is not None:
        from estimator.hardware import get_gpu

        gpu_spec = get_gpu(gpu)
    cfg = build_config(config, set_, batch_size, optimizer, precision, model, device)
    result = run_estimate(cfg)
    fit = None
    if gpu_spec is not None:
        from estimator.fit import fit_on

        fit = fit_on(result, gpu_spec, mfu)
    ranks = _rank_estimates(cfg, parallel, world_size, result.device)
    if plot is not None:
        from estimator.plot import plot_timeline

        plot_timeline(plot, estimated=result)
    if as_json:
        extra = {"gpu": fit.to_json()} if fit else {}
        if ranks:
            extra["distributed"] = {"strategy": parallel, "world_size": world_size,
                                    "ranks": [r.to_json() for r in ranks]}
        emit_json({**result.to_json(), **extra})
        return
    from estimator.report import render_estimate, render_fit, render_ranks

    render_estimate(result, out, timeline=timeline)
    if fit is not None:
        render_fit(fit, result, out)
    if ranks:
        render_ranks(ranks, None, out, None)
    if plot is not None:
        out.print(f"wrote {plot}")


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

    cfg = build_config(config, set_, batch_size, None, precision, model, device)
    names = [n.strip() for n in optimizers.split(",") if n.strip()]
    if not names:
        raise EstimatorError("--optimizers: give at least one optimizer name, e.g. sgd,adam")
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
        None, "--parallel", help="run --world-size gloo processes on the CPU: ddp | zero1 | zero3 (FSDP2)"),
    world_size: int = WorldSizeOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Run one real optimizer step on the device and show estimate and measurement side by side."""
    if impl not in ("torch", "textbook"):
        raise EstimatorError(f"--impl: expected torch or textbook, got {impl!r}")
    if tolerance is not None and not 0 <= tolerance < 10:
        raise EstimatorError(f"--tolerance: expected a fraction such as 0.05, got {tolerance}")
    if plot is not None:
        from estimator.plot import check_plot_path

        check_plot_path(plot)
    cfg = build_config(config, set_, batch_size, optimizer, precision, model)
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

        plot_timeline(plot, estimated=result.estimate, measured=result.measurement.steady_step.timeline,
                      title=f"live bytes over one steady-state step ({result.measurement.device})")
    if as_json:
        emit_json(result.to_json())
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
    from estimator.measure.verify import refuse_if_too_large

    estimates = per_rank_estimates(cfg, parallel, world_size, "cpu")
    need = max(max(r.peak_bytes, r.first_step_peak_bytes) for r in estimates) * world_size
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
        from estimator.families.transformer import parameter_count

        cfg = preset.config()
        rows.append({"name": name, "parameters": parameter_count(cfg), "published": preset.params,
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
def schema() -> None:
    """Print the JSON Schema of the config file (for editor completion)."""
    from estimator.config import Config

    emit_json(Config.model_json_schema())


def main() -> None:
    """Entry point of the console script and of ``python -m estimator``."""
    app(prog_name="estimator")
