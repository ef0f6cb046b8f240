"""Rich rendering of estimates (tables, the timeline chart) and their explanations. No formulas here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich import box
from rich.bar import Bar
from rich.cells import cell_len
from rich.console import Console, Group
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from estimator.comparison import Row
from estimator.families.base import get_family
from estimator.units import human_bytes, human_count, human_flops

if TYPE_CHECKING:
    from estimator.api import Estimate

BAR_WIDTH = 24
SPARK = "▁▂▃▄▅▆▇█"
PHASE_SHORT = {"optimizer_step": "optim."}
ROLE_LABELS = {
    "parameter": "parameters",
    "input": "inputs + targets",
    "activation": "activations",
    "gradient": "gradients",
    "optimizer_state": "optimizer state",
    "temporary": "temporaries",
}


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A bar of ``width`` cells for a fraction in [0, 1], with eighth-cell resolution."""
    fraction = min(max(fraction, 0.0), 1.0)
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    return "█" * full + (" ▏▎▍▌▋▊▉"[rest] if rest else "")


def describe(est: Estimate) -> str:
    """One line naming the model, the batch in force, the optimizer, precision and device."""
    cfg = est.config
    model = cfg.model
    if model.family == "mlp":
        shape = f"mlp D={model.dim}, {model.num_layers} layers"
    elif model.family == "module":
        shape = f"module {model.module}"
    elif model.family == "hf":  # the real transformers model, traced (docs/hf.md)
        shape = model.describe()
    else:
        shape = f"{model.family} d_model={getattr(model, 'd_model', '?')}, {getattr(model, 'num_layers', '?')} layers"
    opt = cfg.optimizer
    options = ", ".join(f"{k}={opt.option(k)}" for k in ("lr", "momentum", "betas", "eps", "weight_decay")
                        if opt.option(k) not in (None, 0, 0.0))
    precision = cfg.training.precision + (" + fp32 master" if cfg.training.master_weights else "")
    return (f"{shape} · {batch_in_force(est)} · {opt.name}({options}) · {precision} · "
            f"{est.device} ({est.implementation} optimizer kernels)")


def batch_in_force(est: Estimate) -> str:
    """The batch the step really uses: B (and S), saying where a figure not given comes from."""
    b, model = est.batch, est.config.model
    text = f"B={b.batch_size}"
    if model.family == "module":
        text += " (inputs " + ", ".join(f"{list(i.shape)} {i.dtype}" for i in model.inputs) + ")"
    elif b.batch_source != "training.batch_size":
        text += f" ({b.batch_source})"
    if b.seq_len is not None:
        text += f", seq_len={b.seq_len}" + (" (the model's max_seq_len)" if b.seq_source == "model.max_seq_len"
                                              else "")
    from estimator.accumulation import data_parallel_ranks, global_batch

    k, n = est.config.training.grad_accum_steps, data_parallel_ranks(est.config)
    if k > 1 or n > 1:  # the global batch: micro-batch x accumulation x data-parallel ranks
        text += f", global batch {b.batch_size} x {k} x {n} = {global_batch(est.config, b.batch_size):,}"
    return text


def defaults_note(est: Estimate) -> str | None:
    """The header's second line when a preset or HF config got the training defaults."""
    filled = getattr(est.config, "training_defaults", ())
    if not filled:
        return None
    values = ", ".join(item.split("=", 1)[1] for item in filled)
    return f"defaults for a preset: {values}; override with -o/-p (or --set)"


def print_fitting(console: Console, table: Table) -> None:
    """Print ``table`` with its numbers whole: right-aligned (number) columns never wrap or shrink; if
    the table cannot fit the console that way, print it stacked, one block of 'column: value' per row."""
    for column in table.columns:
        if column.justify == "right":
            column.no_wrap = True
        if column.no_wrap:  # such a column is only whole at its full width, header included
            column.min_width = max([cell_len(str(c)) for c in column.cells] + [cell_len(str(column.header)), 1])
    width = console.width
    if _widest(table) <= width or _minimum_width(console, table) <= width:
        console.print(table)
        return
    console.print(stacked(table))


def _minimum_width(console: Console, table: Table) -> int:
    """The narrowest the table can be without cutting a word (measured free of the console's width)."""
    return Measurement.get(console, console.options.update_width(1_000_000), table).minimum


def _widest(table: Table) -> float:
    """An upper bound of the width rich measures for ``table``, read off its cells' text (inf where unsure).

    rich's measurement lays the table out twice and measures every cell three times (about 20 % of
    rendering an estimate's tables); when even this bound fits the console, the minimum does too, so
    :func:`print_fitting` needs no measurement. The bound is at least rich's maximum: per column, the
    longest cell's ``cell_len`` (a rendered cell is a sub-sequence of its markup source: tags and escapes
    removed, emoji codes shortened; its widest line no longer than the whole) plus the left and right
    padding, plus two edges and the separators between columns. A table with a fixed width or minimum
    width, a column of fixed width or ratio, or a cell other than text is left to rich (inf).
    """
    if table.width is not None or table.min_width is not None:
        return float("inf")
    _, right, _, left = table.padding
    total = 2 + max(len(table.columns) - 1, 0)
    for column in table.columns:
        if column.width is not None or column.ratio is not None:
            return float("inf")
        cells = [column.header, *column.cells] + ([column.footer] if table.show_footer else [])
        if not all(isinstance(cell, (str, Text)) for cell in cells):
            return float("inf")
        total += max(cell_len(cell if isinstance(cell, str) else cell.plain) for cell in cells) + left + right
    return total


def stacked(table: Table) -> Group:
    """``table`` as one block per row: the first cell, then 'header: value' for every other non-empty cell."""
    headers = [str(c.header) or "·" for c in table.columns]
    cells = [list(c.cells) for c in table.columns]
    parts: list[Any] = []
    if table.title:
        parts.append(Text(str(table.title), style="bold"))
    for row in range(len(table.rows)):
        first = str(cells[0][row])
        lines = [f"  {headers[i]}: {cells[i][row]}" for i in range(1, len(headers)) if str(cells[i][row]).strip()]
        parts.append(Text.from_markup(first, style="bold"))  # the cells are markup, as the table renders them
        parts.extend(Text.from_markup(line) for line in lines)
    if table.caption:
        parts.append(Text(str(table.caption), style="dim"))
    return Group(*parts)


def memory_table(est: Estimate) -> Table:
    """The seed's first-order table: each term with bytes, units, share and a bar."""
    m = est.memory
    table = Table(title="Memory, the seed's first-order sum (section 6)", title_justify="left", box=box.SIMPLE_HEAD)
    for col, justify in (("term", "left"), ("bytes", "right"), ("", "right"), ("share", "right"), ("", "left")):
        table.add_column(col, justify=justify, overflow="crop")  # type: ignore[arg-type]
    rows = [("parameters", m.parameters), ("activations", m.activations), ("gradients", m.gradients),
            ("optimizer state", m.optimizer_state)]
    for name, value in rows:
        share = value / m.total if m.total else 0.0
        table.add_row(name, f"{value:,}", human_bytes(value), f"{share:6.1%}", bar(share))
    table.add_section()
    table.add_row("total", f"{m.total:,}", human_bytes(m.total), "100.0%", "", style="bold")
    return table


def peak_table(est: Estimate) -> Table:
    """The simulated peak of a steady step and of the first step, by role at the peak moment."""
    steady, first = est.step.steady_peak, est.step.first_peak
    table = Table(title="Peak of a real step (simulated timeline)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("live at the peak")
    table.add_column("steady step", justify="right")
    table.add_column("first step", justify="right")
    for role, label in ROLE_LABELS.items():
        a, b = steady.by_role.get(role, 0), first.by_role.get(role, 0)
        if a or b:
            table.add_row(label, human_bytes(a), human_bytes(b))
    table.add_section()
    table.add_row("peak", f"{human_bytes(steady.bytes)}", f"{human_bytes(first.bytes)}", style="bold")
    table.add_row("bytes", f"{steady.bytes:,}", f"{first.bytes:,}")
    table.add_row("phase", steady.phase, first.phase)
    return table


def flops_table(est: Estimate) -> Table:
    f = est.flops
    table = Table(title="FLOPs per step (2 FLOPs per multiply-add)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("count")
    table.add_column("FLOPs", justify="right")
    table.add_column("", justify="right")
    rule = "6·B·P  (forward 2·B·P + backward 4·B·P)" if not f.attention else "6·N·T + attention (forward + backward)"
    table.add_row(rule, f"{f.per_step:,}", human_flops(f.per_step))
    table.add_row("  forward", f"{f.forward:,}", human_flops(f.forward))
    table.add_row("  backward", f"{f.backward:,}", human_flops(f.backward))
    if f.attention:
        table.add_row("  of which attention, 12·L·H·Q·T (PaLM app. B)", f"{f.attention:,}", human_flops(f.attention))
    table.add_row("exact matmul count (FlopCounterMode)", f"{f.matmul:,}", human_flops(f.matmul))
    table.caption = flop_rule_note(est)
    table.caption_justify = "left"
    return table


def flop_rule_note(est: Estimate) -> str:
    """What the rule's B (or T) and P (or N) are: the very values the FLOPs above use."""
    f, model, b = est.flops, est.config.model, est.batch
    n, total = f.rule_parameters or est.parameters, est.parameters
    if model.family == "mlp":
        return f"B·P uses B = {f.tokens:,} samples (training.batch_size) and P = {n:,}, every parameter"
    if model.family == "module":
        what = ("target elements (cross_entropy: one per token)" if model.loss == "cross_entropy"
                else "samples (model.inputs[0].shape[0])")
        left = "" if n == total else (f", of {total:,}: those the forward reads, less any used only through "
                                      "embedding lookups (Kaplan et al. 2020 leave embeddings out; docs/module.md)")
        return f"B·P uses B = {f.tokens:,} {what} and P = {n:,} parameters{left}"
    tokens = (f"T = B·S = {b.batch_size:,}·{b.seq_len:,} = {f.tokens:,} tokens" if b.seq_len is not None
              else f"T = {f.tokens:,} tokens")
    if model.family == "moe":  # active parameters and the routing assumption (docs/moe.md)
        from estimator.families.moe import rule_note

        return rule_note(model, est.config.training, tokens, n, total)
    if n == total:
        return f"6·N·T uses {tokens} and N = {n:,}, every parameter (a tied embedding counts once, as the head)"
    lookups = [name for name, on in (("the token embedding", not getattr(model, "tie_embeddings", False)),
                                     ("the position table", getattr(model, "positions", "") == "learned")) if on]
    tied = "; the tied token embedding counts once, as the output head" if getattr(model, "tie_embeddings",
                                                                                     False) else ""
    return (f"6·N·T uses {tokens} and N = {n:,}: the {total:,} parameters less {total - n:,} used only through lookups "
            f"({' and '.join(lookups) or 'embeddings'}), which do no matmul (Kaplan et al. 2020, Table 1: "
            f"non-embedding N; docs/formulas.md){tied}")


def explain_terms(est: Estimate) -> list[tuple[int, str]]:
    """The steady peak as the seed's sum plus signed terms, each with its reason.

    ``memory.total + sum(terms) == peak_bytes`` exactly: every role live at the peak is compared with
    its first-order term, and on CUDA the 512-byte rounding of the live tensors is its own term
    (computed from the exact and the rounded step, :meth:`Estimate.block_rounding_at_peak`).
    """
    m, peak = est.memory, est.step.steady_peak
    rounding = est.block_rounding_at_peak()
    live = {role: n - (rounding or {}).get(role, 0) for role, n in peak.by_role.items()}
    terms: list[tuple[int, str]] = []
    desc = getattr(get_family(est.config.model.family), "activation_description", "the saved activations")
    if live.get("input"):
        terms.append((live["input"], f"+ {human_bytes(live['input'])} inputs and targets live on the device; "
                                     "the seed omits them."))
    if live.get("temporary"):
        terms.append((live["temporary"], f"+ {human_bytes(live['temporary'])} temporaries live at that moment "
                                         "(gradients flowing back, optimizer step buffers, casts); the seed omits "
                                         "them."))
    held = live.get("activation", 0)
    if held < m.activations:
        part = f"only {human_bytes(held)} of the" if held else "none of the"
        terms.append((held - m.activations, f"- {part} {human_bytes(m.activations)} of activations ({desc}) are "
                                            "live then: backward frees each layer's saved tensors as its gradients "
                                            "appear."))
    elif held > m.activations:
        amp = est.config.training.precision.startswith("amp")
        why = ("the head's output, which the loss saves" + (", and autocast's 16-bit copies of the weights and "
               "input" if amp else "") if est.config.model.family == "mlp" else
               "recomputed in backward by activation checkpointing"
               if est.config.training.activation_checkpointing != "none" else "held beyond the saved set")
        terms.append((held - m.activations, f"+ {human_bytes(held - m.activations)} more activations than {desc}: "
                                            f"{why}."))
    grads = live.get("gradient", 0)
    if grads != m.gradients:
        terms.append((grads - m.gradients, f"- {human_bytes(m.gradients - grads)} of gradients do not exist yet at "
                                           "the peak." if grads < m.gradients else
                      f"+ {human_bytes(grads - m.gradients)} more gradient bytes than one per trainable parameter."))
    scalars = m.optimizer_step_tensors if est.step_tensors_on_device else 0
    if scalars:
        terms.append((scalars, f"+ {human_bytes(scalars)} optimizer state: torch's per-parameter 'step' scalars "
                               "on the device (kept apart from the seed's sum)."))
    missing = m.optimizer_state + scalars - live.get("optimizer_state", 0)
    if missing:
        terms.append((-missing, f"- {human_bytes(missing)} of optimizer state is not allocated at that moment."
                      if missing > 0 else f"+ {human_bytes(-missing)} more optimizer state than the seed counts."))
    params = live.get("parameter", 0) - m.parameters
    if params:
        terms.append((params, f"+ {human_bytes(params)} module buffers (e.g. running statistics), held with the "
                              "parameters; the seed omits them." if params > 0 else
                      f"- {human_bytes(-params)} of parameters are not on the device."))
    for role, n in live.items():
        if role not in ("input", "temporary", "activation", "gradient", "optimizer_state", "parameter") and n:
            terms.append((n, f"+ {human_bytes(n)} {role.replace('_', ' ')} live at that moment."))
    if rounding:
        total = sum(rounding.values())
        parts = ", ".join(f"{ROLE_LABELS.get(r, r)} +{human_bytes(n)}" for r, n in rounding.items())
        terms.append((total, f"+ {human_bytes(total)}: CUDA's allocator rounds every tensor up to a multiple of "
                             f"512 bytes (max_memory_allocated counts the rounded blocks): {parts}."))
    return terms


def explain(est: Estimate) -> list[str]:
    """Why the peak differs from the seed's sum, term by term, from the live set at the peak."""
    m, peak = est.memory, est.step.steady_peak
    notes = [f"The seed's sum is {human_bytes(m.total)}; the steady step peaks at {human_bytes(peak.bytes)} "
             f"during {peak.phase} ({_ratio(peak.bytes, m.total)} of the sum)."]
    notes += [text for _, text in explain_terms(est)]
    if est.device == "cuda":
        if est.block_rounding_at_peak() is None:
            notes.append("The figures above include CUDA's 512-byte rounding of each tensor.")
        notes.append("The CUDA context (~300-500 MiB) and the allocator's cache come on top (nvidia-smi shows "
                     "those, max_memory_allocated does not).")
    return notes


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def render_estimate(est: Estimate, console: Console, timeline: bool = False) -> None:
    console.print(Text(describe(est), style="bold"))
    note = defaults_note(est)
    if note:
        console.print(Text(note, style="dim"))
    count = f"{est.parameters:,}" + (f" ({human_count(est.parameters)})" if est.parameters >= 1000 else "")
    console.print(f"parameters: {count}"
                  + (f", trainable {est.trainable_parameters:,}" if est.trainable_parameters != est.parameters
                     else ""))
    print_fitting(console, memory_table(est))
    if est.memory.optimizer_step_tensors:
        where = "on the device" if est.step_tensors_on_device else "on the CPU"
        console.print(f"  + {est.memory.optimizer_step_tensors:,} B of torch 'step' tensors (one float32 scalar "
                      f"per parameter tensor, {where}), not part of the seed's sum")
    print_fitting(console, peak_table(est))
    console.print(Panel("\n".join(explain(est)), title=Text("why the peak is not the sum"),  # no markup to parse
                        title_align="left"))
    if timeline:
        console.print(timeline_panel(est))
    print_fitting(console, flops_table(est))


def timeline_panel(est: Estimate, width: int = 64) -> Panel:
    """Live bytes over a steady step: a per-phase bar chart and a sparkline of the whole curve."""
    points = est.step.steady_curve()
    return Panel(Group(*timeline_rows(points, est.step.steady_peak.bytes, width)),
                 title="live bytes over a steady step", title_align="left")


def timeline_rows(points: list[tuple[str, int]], top: int, width: int = 64) -> list[Any]:
    """Rows for a timeline chart; shared by the estimate and the measurement."""
    from estimator.timeline import phase_peaks

    table = Table.grid(padding=(0, 1))
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(ratio=1)  # the bar takes the width left (rich's Bar scales to it)
    # a phase's peak starts at the bytes live when it began (as max_memory_allocated after a reset)
    starts = [(phase, points[i - 1][1]) for i, (phase, _) in enumerate(points) if i and points[i - 1][0] != phase]
    for phase, value in phase_peaks(points + starts).items():
        table.add_row(phase, human_bytes(value), Bar(top or 1, 0, value, width=40))
    return [table, Text(sparkline([v for _, v in points], width), style="cyan"),
            Text(phase_axis(points, width), style="dim")]


def sparkline(values: list[int], width: int) -> str:
    """The maximum of each of ``width`` buckets, as block characters scaled from 0 to the max."""
    if not values:
        return ""
    top = max(values) or 1
    buckets = _buckets(len(values), width)
    return "".join(SPARK[min(7, int(max(values[a:b]) / top * 7.999))] for a, b in buckets)


def phase_axis(points: list[tuple[str, int]], width: int) -> str:
    """Under the sparkline: the first letter of the phase each bucket starts in."""
    buckets = _buckets(len(points), width)
    letters = {"setup": "s", "forward": "F", "loss": "L", "backward": "B", "optimizer_step": "O", "zero_grad": "Z"}
    out, last = [], None
    for a, _ in buckets:
        phase = points[a][0]
        out.append(letters.get(phase, "?") if phase != last else "·")
        last = phase
    return "".join(out) + "   F forward, L loss, B backward, O optimizer step, Z zero_grad"


def _buckets(n: int, width: int) -> list[tuple[int, int]]:
    width = max(1, min(width, n))
    return [(i * n // width, max((i + 1) * n // width, i * n // width + 1)) for i in range(width)]


def render_compare(results: list[Estimate], console: Console) -> None:
    """One row per optimizer: state, seed's total, simulated peaks, bytes per parameter."""
    if not results:
        return
    console.print(Text(describe(results[0]).split(" · ")[0] + " · compare optimizers", style="bold"))
    note = defaults_note(results[0])
    if note:
        console.print(Text(note, style="dim"))
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("optimizer", "copies", "state", "seed sum", "peak", "1st peak", "B/param"):
        table.add_column(col, justify="left" if col == "optimizer" else "right", no_wrap=True)
    for est in results:
        n = est.trainable_parameters or 1
        m = est.memory
        table.add_row(est.config.optimizer.name, f"{m.optimizer_state / n / _param_bytes(est):.2f}×",
                      human_bytes(m.optimizer_state), human_bytes(m.total), human_bytes(est.peak_bytes),
                      human_bytes(est.first_step_peak_bytes),
                      f"{(m.parameters + m.gradients + m.optimizer_state) / n:.2f}")
    print_fitting(console, table)
    console.print("copies: optimizer-state tensors per parameter; seed sum: parameters + activations + "
                  "gradients + state; peak / 1st peak: simulated peak of a steady / the first step; "
                  "B/param: bytes of parameters + gradients + optimizer state, per parameter.")


def _param_bytes(est: Estimate) -> int:
    from estimator.precision import precision_plan

    return precision_plan(est.config.training.precision).state_bytes


def render_optimizers(console: Console) -> None:
    """The registry as a table, or (on a console too narrow for it) one block per optimizer."""
    from estimator.optimizers import get_optimizer, optimizer_names

    table = Table(title="Registered optimizers", title_justify="left", show_lines=True)
    for col in ("name", "state per parameter", "update rule", "source", "torch"):
        table.add_column(col)
    for name in optimizer_names():
        spec = get_optimizer(name)
        table.add_row(name, optimizer_state_summary(name), spec.update_rule, spec.source, spec.torch_class or "—")
    print_fitting(console, table)  # no word is cut: where the columns cannot fit whole, one block per optimizer


PROBE_MATRIX = (4096, 4096)
"""The parameter the 'state per parameter' column describes (a 4096 x 4096 fp32 matrix)."""
PROBE_SMALL = (8, 8)


def optimizer_state_summary(name: str) -> str:
    """The state tensors a parameter gets and their bytes per parameter, read off the registry.

    For an fp32 4096 x 4096 matrix: full copies as 'N× params'; Adafactor's factored state as
    'rows + cols per matrix'; 8-bit state as bytes per parameter with its per-block scales; a
    different figure for small tensors (8-bit Adam keeps fp32 state for them) is given beside it.
    """
    from estimator.families.base import ParamTensor
    from estimator.optimizers import get_optimizer
    from estimator.precision import DTYPE_BYTES

    spec = get_optimizer(name)
    extra = " + step" if spec.step_tensor else ""

    def per_param(shape: tuple[int, ...]) -> tuple[list[Any], float]:
        param = ParamTensor("w", shape)
        states = spec.state_tensors(param, None)
        return states, sum(s.numel * DTYPE_BYTES[s.dtype or "fp32"] for s in states) / param.numel

    states, big = per_param(PROBE_MATRIX)
    if not states:
        return f"none{extra}"
    names = ", ".join(s.name for s in states)
    rows, cols = PROBE_MATRIX
    numel = rows * cols
    if all(s.dtype is None for s in states) and sum(s.numel for s in states) == rows + cols:
        vector_states, _ = per_param((rows,))
        return (f"{names}{extra}  (factored: rows + cols values per matrix, {rows + cols:,} for "
                f"{rows}×{cols}; a vector keeps {sum(s.numel for s in vector_states) // rows}× params)")
    if all(s.dtype is None for s in states):
        copies = sum(s.numel for s in states) // numel
        return f"{names}{extra}  ({copies}× params in the param dtype: {big:g} B/param in fp32)"
    scales = [s for s in states if s.numel < numel]
    block = f", an fp32 scale per {numel // scales[0].numel} values" if scales else ""
    small_states, small = per_param(PROBE_SMALL)
    small_note = f"; {small:g} B/param for tensors too small to quantize" if small != big else ""
    codes = sorted({f"{DTYPE_BYTES[s.dtype] * 8}-bit" for s in states if s.numel == numel and s.dtype})
    return (f"{names}{extra}  ({'/'.join(codes)} codes{block}: {big:.3g} B/param for a {rows}×{cols} "
            f"matrix{small_note})")


def render_verification(ver: Any, console: Console, tolerance: float | None, plot_points: bool = False) -> None:
    """Estimate and measurement side by side, with ratios and what the seed's sum leaves out."""
    est, m = ver.estimate, ver.measurement
    model_run = ver.model_run if est.config.model.family == "hf" else None  # transformers' class, named
    console.print(Text(describe(est) + f" · measured on {m.device} with {ver.impl} optimizers"
                       + (f" · model run: {model_run}" if model_run else ""), style="bold"))
    note = defaults_note(est)
    if note:
        console.print(Text(note, style="dim"))
    table = Table(title="Estimate vs measurement (one real step)", title_justify="left", box=box.SIMPLE_HEAD)
    for col, justify in (("figure", "left"), ("estimated", "right"), ("measured", "right"), ("ratio", "right"),
                         ("", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for row in ver.rows:
        ok = "" if tolerance is None else ("✓" if row.within(tolerance) else "✗")
        fmt = human_flops if row.key == "flops_matmul" else human_bytes
        ratio = f"{row.ratio:.4f}" if row.ratio is not None else ("=" if row.measured == row.estimated else "—")
        table.add_row(row.label, fmt(row.estimated), fmt(row.measured), ratio, ok)
    print_fitting(console, table)
    exact = Table(box=None, padding=(0, 2), show_header=True)
    exact.add_column("exact bytes")
    exact.add_column("estimated", justify="right")
    exact.add_column("measured" if m.uninstrumented is None else "real step", justify="right")
    if m.uninstrumented is not None:  # CPU: the tracker's step and the allocator's total, not compared
        exact.add_column("instrumented", justify="right")
        exact.add_column("allocator", justify="right")
    u = m.uninstrumented
    for key in ("first_step_peak_bytes", "peak_bytes"):
        row = next(r for r in ver.rows if r.key == key)
        more = [] if u is None else (
            [f"{m.first_step.peak_bytes:,}", f"{u.allocator_first_peak:,}"] if key == "first_step_peak_bytes"
            else [f"{m.steady_step.peak_bytes:,}", f"{u.allocator_steady_peak:,}"])
        exact.add_row(row.label, f"{row.estimated:,}", f"{row.measured:,}", *more)
    print_fitting(console, exact)
    real = m.real_steady_step
    notes = [
        f"The seed's first-order total is {human_bytes(est.memory.total)}; the measured steady step peaks at "
        f"{human_bytes(real.peak_bytes)} during {real.peak_phase}.",
        leaves_out(est),
        "Measured figures are all live tensor bytes on the device, including those that existed before the step "
        "(what torch.cuda.max_memory_allocated means).",
    ]
    # what verify added to the estimate's saved activations (autocast's kept weight copies, compare_rows)
    copies = next(r for r in ver.rows if r.key == "activations").estimated - est.saved_activation_bytes
    if copies:
        notes.append(f"Saved for backward includes the {human_bytes(copies)} of 16-bit weight copies autocast makes "
                     "and autograd keeps for backward (the estimate's activations figure leaves them out: they "
                     "scale with the parameters; the peaks count them).")
    if u is not None:
        notes.append(
            "CPU: the peaks compared are the real step's, from the allocator's own records with no dispatch mode "
            "active (torch.profiler): the blocks ATen ops returned. 'allocator' adds the blocks no op returned "
            f"(kernel workspaces, wrapped scalars, checkpoint's RNG state: {human_bytes(u.not_op_output_bytes)} "
            "more at the steady peak) and is the CPU's max_memory_allocated. 'instrumented' is the live-tensor "
            "tracker's step (a dispatch mode, under which autograd sums a reused tensor's gradients out of "
            "place); the other rows come from it.")
    if m.baseline_bytes:
        notes.append(f"{human_bytes(m.baseline_bytes)} were allocated before the model was built (cuBLAS "
                     "workspaces from the warm-up); max_memory_allocated includes them, the peaks above do not.")
    if m.cuda_context_bytes is not None:
        notes.append(f"CUDA: the allocator reserved up to {human_bytes(m.cuda_reserved_bytes or 0)}; the CUDA "
                     f"context takes another {human_bytes(m.cuda_context_bytes)} (both show in nvidia-smi, "
                     "neither in max_memory_allocated).")
    if getattr(ver, "routing", None) is not None and ver.routing.steady_step:
        from estimator.measure.moe_verify import routing_note

        notes.append(routing_note(ver.routing, m.real_steady_step.peak_bytes - m.baseline_bytes))
    if ver.impl == "textbook":
        notes.append("--impl textbook: the estimate models torch.optim's kernels; the seed's textbook optimizers "
                     "allocate different temporaries (e.g. `lr * grad / torch.sqrt(g2 + eps)` makes three), "
                     "so their peaks differ — see docs/measurement.md.")
    console.print(Panel("\n".join(notes), title="what the numbers mean", title_align="left"))
    if plot_points:
        console.print(Panel(Group(*timeline_rows(real.timeline, real.peak_bytes)),
                            title="measured live bytes over the steady step", title_align="left"))


def leaves_out(est: Estimate) -> str:
    """What the first-order total does not count, in the family's own terms."""
    family = get_family(est.config.model.family)
    desc = getattr(family, "activation_description", "the saved activations")
    if est.config.model.family == "mlp":
        counted = ("The seed's total leaves out: the inputs and targets, everything autograd saves beyond "
                   "B·D·layers (the head's output, casts under autocast), ")
    else:
        counted = (f"The first-order total counts as activations {desc}; it leaves out: the inputs and targets, ")
    return (counted + "the gradients flowing back during backward, the optimizer's temporaries, and torch's 'step' "
            "scalars; and it assumes activations and gradients coexist, which they never do in full: backward frees "
            "each layer's saved tensors as its gradients appear.")


def render_models(rows: list[dict[str, Any]], console: Console) -> None:
    """The preset table: computed and published parameter counts side by side."""
    table = Table(title="Model presets (estimator estimate --model NAME)", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("name", "parameters", "pub.", "d_model", "L", "H/KV", "vocab"):
        table.add_column(col, justify="left" if col == "name" else "right", no_wrap=True)
    for r in rows:
        same = "✓" if r["parameters"] == r["published"] else f"{r['published']:,}"
        table.add_row(r["name"], f"{r['parameters']:,}", same, str(r["d_model"]), str(r["num_layers"]),
                      f"{r['num_heads']}/{r['num_kv_heads']}", str(r["vocab_size"]))
    print_fitting(console, table)
    console.print("pub.: ✓ when the computed count equals the released checkpoint's total; L layers, H/KV query and "
                  "key/value heads; sources in docs/transformer.md")


def render_fit(fit: Any, est: Estimate, console: Console) -> None:
    """Fits or not, headroom, the largest batch that fits, and the step time bounds."""
    g = fit.gpu
    verdict = "[green]fits[/green]" if fit.fits else "[red]does not fit[/red]"
    where = (f" on the worst rank ({'ranks' if '-' in fit.worst_ranks or ',' in fit.worst_ranks else 'rank'} "
             f"{fit.worst_ranks} of {fit.world_size:,} under {fit.parallel})" if fit.parallel else "")
    lines = [
        f"{g.name}: {human_bytes(g.memory_bytes)}. The step needs {human_bytes(fit.needed_bytes)}{where} "
        f"(peak {human_bytes(fit.peak_bytes)} with CUDA's 512-byte blocks + "
        f"{human_bytes(fit.needed_bytes - fit.peak_bytes)} kept for the CUDA context): {verdict}, "
        f"headroom {human_bytes(fit.headroom_bytes)}.",
        _largest_batch_line(fit),
        f"Step time: at least {_seconds(fit.step_seconds_at_peak)} at the dense peak "
        f"({g.peak_flops(est.config.training.precision) / 1e12:g} TFLOP/s for {est.config.training.precision}); "
        f"{_seconds(fit.step_seconds_at_mfu)} at {fit.mfu:.0%} MFU.",
        f"Source: {g.source}.",
    ]
    console.print(Panel("\n".join(lines), title=f"on {g.name}", title_align="left"))


def render_alternatives(fit: Any, console: Console) -> None:
    """When the step does not fit: each alternative re-estimated, with what it needs and whether it fits."""
    if not fit.alternatives:
        return
    table = Table(title=f"Instead, on {fit.gpu.name} (each re-estimated; needs = worst-rank peak + context reserve)",
                  title_justify="left", box=box.SIMPLE_HEAD)
    # a change wraps between its words, never inside one (it is copied as it stands); a terminal too narrow for
    # that gets the stacked form (print_fitting)
    longest_word = max(len(word) for a in fit.alternatives for word in a.change.split())
    table.add_column("change", overflow="fold", min_width=longest_word)
    for col, justify in (("needs", "right"), ("fits", "left"), ("worst ranks", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for a in fit.alternatives:
        table.add_row(a.change, human_bytes(a.needed_bytes), "[green]yes[/green]" if a.fits else "no",
                      a.worst_ranks or "-")
    print_fitting(console, table)


def _largest_batch_line(fit: Any) -> str:
    """The largest batch, said for what it is: per rank, a search cap, or not applicable."""
    per = " per rank" if fit.parallel else ""
    if not fit.batch_applies:
        return "Largest batch: not searched (this model's batch is fixed by its input shapes, model.inputs)."
    if fit.max_batch_size == 0:
        return (f"Largest training.batch_size{per} that fits: none, not even a batch of 1 "
                "(shard the model: --parallel zero3, see ZeRO/FSDP)")
    if fit.batch_capped:
        return (f"Largest training.batch_size{per} that fits: at least {fit.max_batch_size:,} "
                "(the search stops there; the peak barely grows with the batch)")
    return f"Largest training.batch_size{per} that fits: {fit.max_batch_size:,}"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def render_gpus(console: Console) -> None:
    from estimator.hardware import GPUS

    table = Table(title="GPUs (estimator estimate --gpu NAME)", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("name", "memory", "16-bit TFLOP/s", "FP32 TFLOP/s"):
        table.add_column(col, justify="left" if col == "name" else "right")
    for g in GPUS.values():
        table.add_row(g.name, human_bytes(g.memory_bytes), f"{g.bf16_tflops:g}" if g.bf16_tflops else "—",
                      f"{g.fp32_tflops:g}")
    print_fitting(console, table)
    console.print("Dense peaks (no structured sparsity) from NVIDIA's datasheets; `estimator gpus --json` lists "
                  "the source of each row. V100 and T4 have no bf16: their 16-bit figure is fp16.")


def rank_rows(est: Any, measured: Any) -> list[Row]:
    """The figures one rank's estimate and measurement both have."""
    return [
        Row("parameters", "parameters", est.parameters, measured.parameters),
        Row("gradients", "gradients", est.gradients, measured.gradients),
        Row("optimizer_state", "opt. state", est.optimizer_state, measured.optimizer_state),
        Row("first_step_peak_bytes", "1st peak", est.first_step_peak_bytes, measured.first_step.peak_bytes),
        Row("peak_bytes", "steady peak", est.peak_bytes, measured.steady_step.peak_bytes),
        *communication_rows(est, measured),
    ]


def communication_rows(est: Any, measured: Any) -> list[Row]:
    """The collectives' logical bytes per step and the calls of a later step, estimated and recorded."""
    from estimator.measure.comm_record import measured_communication

    got, want = measured_communication(measured), getattr(est, "communication_volume", None)
    if got is None or want is None:
        return []
    rows = [Row(f"communication_{key}_bytes", f"coll. B {label}", getattr(want, key).size_bytes,
                getattr(got, key).size_bytes)
            for key, label in (("first_step", "step 1"), ("second_step", "step 2"), ("steady_step", "step 3"))
            ] + [Row("communication_steady_step_calls", "coll. calls", want.steady_step.calls, got.steady_step.calls)]
    for g in getattr(want.steady_step, "groups", ()):  # a 2-D mesh: step 3 per process group (dp, tp)
        other = got.steady_step.group(g.name) if hasattr(got.steady_step, "group") else None
        rows += [Row(f"communication_steady_step_{g.name}_bytes", f"coll. B {g.name}", g.volume.size_bytes,
                     other.size_bytes if other else 0),
                 Row(f"communication_steady_step_{g.name}_calls", f"coll. calls {g.name}", g.volume.calls,
                     other.calls if other else 0)]
    return rows


def render_ranks(estimates: list[Any], measured: list[Any] | None, console: Console, tolerance: float | None) -> None:
    """Estimated (and measured) bytes per rank under the data-parallel strategy."""
    if measured is None:
        render_rank_estimates(estimates, console)
        return
    first = estimates[0]
    title = f"Per rank: {first.strategy} on {first.world_size} ranks (training.batch_size is per rank)"
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("figure", no_wrap=True)
    for est in estimates:
        table.add_column(f"rank {est.rank} est.", justify="right", no_wrap=True)
        table.add_column(f"rank {est.rank} meas.", justify="right", no_wrap=True)
    rows = [rank_rows(est, m) for est, m in zip(estimates, measured, strict=True)]
    for i, row in enumerate(rows[0]):
        cells: list[str] = []
        for rank in rows:
            ok = "" if tolerance is None else (" ✓" if rank[i].within(tolerance) else " ✗")
            cells += [f"{rank[i].estimated:,}", f"{rank[i].measured:,}{ok}"]
        table.add_row(row.label, *cells)
    table.add_row("comm.", *[c for est in estimates for c in (f"{est.communication:,}", "")])
    table.add_row("peak phase", *[PHASE_SHORT.get(c, c) for est, m in zip(estimates, measured, strict=True)
                                  for c in (est.step.steady_peak.phase, m.steady_step.peak_phase)])
    for column in table.columns:
        column.min_width = max([cell_len(str(c)) for c in column.cells] + [cell_len(str(column.header))])
    if _minimum_width(console, table) > console.width:
        table = _ranks_long(estimates, measured, rows, title, tolerance)
    print_fitting(console, table)
    console.print("bytes; the comm. row: persistent communication buffers, DDP's gradient buckets (estimated only); "
                  "coll. B: bytes handed to collectives per step (S of each call; recorded by torch's flight "
                  "recorder), coll. calls: collectives in step 3 (dp, tp: per process group of a 2-D mesh); "
                  "optim.: optimizer_step. "
                  "docs/distributed.md: what torch allocates per strategy (buckets, FSDP2 all-gathers and "
                  "reduce-scatters) and the sources.")


def _ranks_long(estimates: list[Any], measured: list[Any], rows: list[list[Row]], title: str,
                tolerance: float | None) -> Table:
    """The per-rank comparison one (rank, figure) per row: as narrow as the single-device table."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("rank", "figure", "estimated", "measured", ""):
        table.add_column(col, justify="right" if col in ("estimated", "measured") else "left", no_wrap=True)
    for est, m, rank in zip(estimates, measured, rows, strict=True):
        for row in rank:
            ok = "" if tolerance is None else ("✓" if row.within(tolerance) else "✗")
            table.add_row(str(est.rank), row.label, f"{row.estimated:,}", f"{row.measured:,}", ok)
        table.add_row(str(est.rank), "comm.", f"{est.communication:,}", "", "")
        table.add_row(str(est.rank), "peak phase", PHASE_SHORT.get(est.step.steady_peak.phase,
                                                                   est.step.steady_peak.phase),
                      PHASE_SHORT.get(m.steady_step.peak_phase, m.steady_step.peak_phase), "", end_section=True)
    return table


def render_rank_estimates(estimates: list[Any], console: Console) -> None:
    """One row per rank (any number of ranks fits the terminal); exact bytes are in --json."""
    first = estimates[0]
    table = Table(title=f"Per rank: {first.strategy} on {first.world_size} ranks (training.batch_size is per rank)",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
    for col in ("rank", "params", "grads", "state", "comm.", "sent/step", "1st peak", "peak", "phase"):
        table.add_column(col, justify="left" if col in ("rank", "phase") else "right", no_wrap=True)
    for est in estimates:
        volume = getattr(est, "communication_volume", None)
        table.add_row(est.label() if hasattr(est, "label") else str(est.rank), human_bytes(est.parameters),
                      human_bytes(est.gradients),
                      human_bytes(est.optimizer_state), human_bytes(est.communication),
                      human_bytes(volume.steady_step.wire_bytes()) if volume else "-",
                      human_bytes(est.first_step_peak_bytes), human_bytes(est.peak_bytes),
                      PHASE_SHORT.get(est.step.steady_peak.phase, est.step.steady_peak.phase))
    print_fitting(console, table)
    for est in estimates:  # FSDP2 CPU offload: the model states are in host memory, not on the device
        host = getattr(est, "host", None)
        if host:
            label = est.label() if hasattr(est, "label") else str(est.rank)
            console.print(f"host memory (CPU offload), rank {label}: parameters {human_bytes(host['parameters'])}, "
                          f"gradients {human_bytes(host['gradients'])}, optimizer state "
                          f"{human_bytes(host['optimizer_state'] + host['optimizer_step_tensors'])}; "
                          f"{human_bytes(est.host_bytes)} in all (the device columns show 0)", markup=False)
    render_communication(estimates, console)
    console.print("state: optimizer state; comm.: persistent communication buffers (DDP's gradient buckets); "
                  "sent/step: bytes a rank sends (and receives) per step on a ring (docs/distributed.md, "
                  "Communication volume); optim.: optimizer_step. "
                  "docs/distributed.md: what torch allocates per strategy and the sources of the formulas; "
                  "exact bytes with --json.")




def render_communication(estimates: list[Any], console: Console) -> None:
    """The collectives of a later step per rank, by kind: one table per distinct set of ranks."""
    distinct: dict[Any, list[str]] = {}
    for est in estimates:
        volume = getattr(est, "communication_volume", None)
        if volume is not None:
            distinct.setdefault(volume, []).append(est.label() if hasattr(est, "label") else str(est.rank))
    for volume, labels in distinct.items():
        step = volume.steady_step
        where = "every rank" if len(distinct) == 1 else f"ranks {','.join(labels)}"
        groups = "".join(f", {g.name} groups of {g.size}" for g in getattr(step, "groups", ()))
        table = Table(title=f"Communication per step, {where} (N={step.world_size}{groups})", title_justify="left",
                      box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0), pad_edge=False)
        for col in ("collective", "calls", "size", "sent = received"):
            table.add_column(col, justify="left" if col == "collective" else "right", no_wrap=True)
        for kind, v, wire in step.rows():
            table.add_row(kind, f"{v.calls:,}", human_bytes(v.size_bytes), human_bytes(wire))
        table.add_row("total", f"{step.calls:,}", human_bytes(step.size_bytes), human_bytes(step.wire_bytes()),
                      style="bold")
        print_fitting(console, table)
        for label, other in (("first", volume.first_step), ("second", volume.second_step)):
            extra = other.calls - step.calls
            if extra:
                console.print(f"the {label} step calls {extra} more (DDP's bucket rebuild: "
                              f"{human_bytes(other.size_bytes - step.size_bytes)})")
