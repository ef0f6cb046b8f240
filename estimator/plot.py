"""The live-bytes timeline as a picture (matplotlib, imported only here, only when asked)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from estimator.errors import EstimatorError

if TYPE_CHECKING:
    from estimator.api import Estimate

PHASE_COLOURS = {"forward": "#dbeafe", "loss": "#fef3c7", "backward": "#dcfce7", "optimizer_step": "#fce7f3",
                 "zero_grad": "#f3f4f6", "setup": "#ffffff"}
FORMATS = (".png", ".svg", ".pdf")


def check_plot_path(path: Path) -> None:
    """Refuse a path we could not write before any work is done (one clear line, exit 2).

    The directory is tested by creating (and removing) a temporary file in it, the same call that
    writes the chart later: permission bits alone do not tell (``/sys`` and ``/proc`` look writable
    to root; a read-only mount does not show in them).
    """
    if path.suffix.lower() not in FORMATS:
        raise EstimatorError(f"--plot {path}: expected a file ending in {', '.join(FORMATS)}")
    try:
        parent = path.parent.resolve()
        if not parent.is_dir():
            raise EstimatorError(f"--plot {path}: the directory {path.parent} does not exist")
        if path.is_dir():
            raise EstimatorError(f"--plot {path}: is a directory")
        fd, probe = tempfile.mkstemp(suffix=path.suffix, dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EstimatorError(f"--plot {path}: cannot write there: {exc.strerror or exc}") from None


def plot_timeline(
    path: Path,
    estimated: Estimate | None = None,
    measured: list[tuple[str, int]] | None = None,
    title: str = "live bytes over one steady-state training step",
) -> None:
    """Draw the estimated curve (and the measured one over it) against phase-normalised time.

    Both curves are drawn per phase on a common axis (each phase spans the same width), so an
    estimate and a measurement with different event counts line up phase by phase. The file is
    written to a temporary name and renamed, so a failure never leaves a half-written file.
    """
    check_plot_path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EstimatorError("--plot needs matplotlib: pip install 'estimator[plot]'") from None

    curves: list[tuple[str, list[tuple[str, int]], str]] = []
    if estimated is not None:
        curves.append(("estimated", estimated.step.steady_curve(), "#2563eb"))
    if measured:
        curves.append(("measured", measured, "#dc2626"))
    phases = [p for p in PHASE_COLOURS if any(ph == p for _, pts, _ in curves for ph, _ in pts)]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for i, phase in enumerate(phases):
        ax.axvspan(i, i + 1, color=PHASE_COLOURS[phase], zorder=0)
        ax.text(i + 0.5, 1.0, phase.replace("_", " "), transform=ax.get_xaxis_transform(), ha="center",
                va="bottom", fontsize=8)
    scale, unit = _unit(max((v for _, pts, _ in curves for _, v in pts), default=1))
    for label, points, colour in curves:
        xs, ys = _phase_positions(points, phases)
        ax.step(xs, [y / scale for y in ys], where="post", label=label, color=colour, linewidth=1.6)
    ax.set_xlim(0, len(phases))
    ax.set_ylim(bottom=0)
    ax.set_xticks([])
    ax.set_ylabel(f"live bytes ({unit})")
    ax.set_title(title, pad=18)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent.resolve())
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a new file normally gets 0666 & ~umask
        os.replace(tmp, path)
    except OSError as exc:
        raise EstimatorError(f"--plot {path}: cannot write there: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _phase_positions(points: list[tuple[str, int]], phases: list[str]) -> tuple[list[float], list[int]]:
    """x in [i, i+1) for the points of the i-th phase, spread evenly inside it."""
    xs: list[float] = []
    ys: list[int] = []
    for i, phase in enumerate(phases):
        inside = [v for ph, v in points if ph == phase]
        for j, value in enumerate(inside):
            xs.append(i + j / max(len(inside), 1))
            ys.append(value)
    return xs, ys


def _unit(top: float) -> tuple[float, str]:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if top >= scale:
            return float(scale), unit
    return 1.0, "B"
