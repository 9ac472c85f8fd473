"""`moeconsol eval` and `moeconsol sweep`: quality of consolidated variants, options in, tables out."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from ..io.sizes import format_bytes
from . import app
from .options import parse_budgets, parse_named_files
from .progress import stage_progress
from .settings_text import settings_line

if TYPE_CHECKING:
    from ..quality.evaluate import EvalReport, SweepReport


def _num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def _print_eval(r: EvalReport) -> None:
    table = Table(title=f"quality of {r.artifact} ({settings_line(r.consolidation)})")
    for col in ("variant", "metric", "original", "consolidated", "base", "retained gain"):
        table.add_column(col, justify="left" if col in ("variant", "metric") else "right")
    for v in r.variants:
        gain = "-" if math.isnan(v.retained_gain) else f"{v.retained_gain:.1%}"
        table.add_row(v.name, v.metric, _num(v.original), _num(v.consolidated), _num(v.base), gain)
    Console().print(table)


def sweep_table(r: SweepReport) -> Table:
    """Methods x budgets, one quality (and retained gain) column per variant."""
    names = list(r.original)
    table = Table(
        title=f"bytes vs. {r.metric} ({'lower' if r.lower_is_better else 'higher'} is better; retained gain in brackets)"
    )
    for col in ("method", "budget", "expert memory", *names):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row("original", "", format_bytes(r.expert_bytes), *(_num(r.original[n]) for n in names))
    if r.base:
        table.add_row("base", "", "", *(_num(r.base[n]) for n in names))
    for p in r.points:
        budget = "-" if p.budget is None else f"{p.budget:g}"
        if p.error:
            table.add_row(p.method, budget, "n/a", *(["n/a"] * len(names)))
            continue
        mem = f"{format_bytes(p.expert_memory)} ({p.expert_fraction:.0%})"
        cells = []
        for n in names:
            g = p.retained_gain.get(n, math.nan)
            cells.append(_num(p.quality[n]) + ("" if math.isnan(g) else f" ({g:.0%})"))
        table.add_row(p.method, budget, mem, *cells)
    return table


_STAGES = {
    "originals": "scoring the original checkpoints",
    "consolidated": "scoring the consolidated variants",
    "sweep": "merging and scoring (originals, then each method at each budget)",
}


def _named(items: list[str], option: str) -> dict[str, str]:
    return parse_named_files(items, option, allow_unnamed=False)


@app.command("eval")
def eval_command(
    artifact: Path = typer.Argument(..., metavar="OUT", help="Artifact directory (from moeconsol merge)."),
    data: list[str] = typer.Option(
        ..., "--data", help="NAME=FILE: text (causal LMs) or JSONL of {input, target} (seq2seq); repeat."
    ),
    base: str | None = typer.Option(None, help="The pre-trained model: also scored, and each variant's retained gain."),
    variant: list[str] = typer.Option([], "--variant", help="Score only these variants (default: all that have data)."),
    chunk_len: int | None = typer.Option(None, help="Perplexity window in tokens (default min(2048, context length))."),
    max_examples: int | None = typer.Option(None, help="Seq2seq: score only the first N examples."),
    json_file: Path | None = typer.Option(None, "--json", help="Also write the report as JSON to this file."),
) -> None:
    """Quality of each variant: original checkpoint vs. consolidated (served by the runtime)."""
    files = _named(data, "--data")
    # torch, transformers and the runtime: imported once the options are checked (start-up time)
    from ..quality.evaluate import EvalSettings, eval_artifact

    settings = EvalSettings(chunk_len=chunk_len, max_examples=max_examples)
    with stage_progress(_STAGES) as report:
        r = eval_artifact(artifact, files, base, variant or None, settings, report)
    _print_eval(r)
    if json_file:
        json_file.write_text(json.dumps(r.to_dict(), indent=2, allow_nan=False) + "\n")


@app.command("sweep")
def sweep_command(
    models: list[str] = typer.Argument(..., metavar="MODEL...", help="Checkpoints: PATH or NAME=PATH."),
    data: list[str] = typer.Option(..., "--data", help="NAME=FILE per variant to score; repeat."),
    budgets: str = typer.Option("1.0,0.75,0.5,0.25", help="Fractions of all experts, comma-separated."),
    base: str | None = typer.Option(None, help="The pre-trained model: retained gain, task-arithmetic and ties."),
    calibration: list[str] = typer.Option(
        [], help="NAME=FILE (or FILE for all): adds the calibrated method (and allows --method deltas)."
    ),
    method: list[str] = typer.Option(
        [],
        "--method",
        help="Only these methods (default: all that apply; deltas only when named: calibrated with compressed expert deltas, bank + delta bytes within each budget).",
    ),
    output: Path | None = typer.Option(
        None,
        "-o",
        "--output",
        help="Directory for the results (sweep.json, sweep.png unless --json/--plot say otherwise); the temporary artifacts are made and removed in it.",
    ),
    chunk_len: int | None = typer.Option(None, help="Perplexity window in tokens."),
    max_examples: int | None = typer.Option(None, help="Seq2seq: score only the first N examples."),
    json_file: Path | None = typer.Option(None, "--json", help="Write the sweep as JSON to this file."),
    plot: Path | None = typer.Option(None, "--plot", help="Write a PNG: bytes vs. quality, one subplot per variant."),
) -> None:
    """Bytes vs. quality for every method (reference, budget, calibrated, merging baselines) at every budget.
    Each artifact is made in a temporary directory, scored and removed."""
    files, fractions = _named(data, "--data"), parse_budgets(budgets)
    calibration_files = parse_named_files(calibration, "--calibration") or None
    # torch, transformers and the runtime: imported once the options are checked (start-up time)
    from ..quality.evaluate import EvalSettings, plot_sweep, sweep

    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        json_file = json_file or output / "sweep.json"
        plot = plot or output / "sweep.png"
    settings = EvalSettings(chunk_len=chunk_len, max_examples=max_examples)
    with stage_progress(_STAGES) as report:
        r = sweep(
            models,
            files,
            fractions,
            base,
            calibration_files,
            method or None,
            settings,
            output,
            {"calibrated": {"representative": "best"}, "deltas": {"representative": "best"}},
            report,
        )
    Console(width=max(Console().width, 140)).print(sweep_table(r))
    if json_file:
        json_file.write_text(json.dumps(r.to_dict(), indent=2, allow_nan=False) + "\n")
    if plot:
        plot_sweep(r, plot)
