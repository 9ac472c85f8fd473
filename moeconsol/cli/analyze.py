"""`moeconsol analyze`: how alike the experts of N fine-tuned checkpoints are."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..analysis.report import (
    FULL_MATRIX_LIMIT,
    AnalysisReport,
    analyze_models,
    report_json,
    same_index_summary,
    write_heatmap,
)
from ..analysis.similarity import DEFAULT_PROBES, METRICS, check_metrics
from ..errors import MoeconsolError
from ..io.checkpoint import open_checkpoints
from . import app
from .progress import stage_progress


@app.command()
def analyze(
    models: Annotated[
        list[str],
        typer.Argument(metavar="MODEL...", help="Checkpoints as PATH or NAME=PATH (local dir or hub repo id)."),
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", "-m", help=f"Metric(s), repeatable or comma-separated: {', '.join(METRICS)}."),
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="Text file: CKA probes are the first model's hidden states on it.")
    ] = None,
    probes: Annotated[
        int, typer.Option(help="CKA probes per layer (Gaussian) or max tokens (calibration).")
    ] = DEFAULT_PROBES,
    seed: Annotated[int, typer.Option(help="Seed of the Gaussian CKA probes (layer k uses seed + k).")] = 0,
    revision: Annotated[str | None, typer.Option(help="Hub revision for models given as repo ids.")] = None,
    json_out: Annotated[
        str | None, typer.Option("--json", help="Write the full report as JSON to FILE ('-': stdout).")
    ] = None,
    heatmap: Annotated[
        Path | None, typer.Option(help="Write per-layer heatmaps of the first metric to FILE.png.")
    ] = None,
    full_matrices: Annotated[
        bool | None,
        typer.Option(
            "--full-matrices/--summary-only",
            help=f"Full (N*E)^2 matrices in the JSON and heatmap, or the per-layer same-index summary (default: full up to N*E = {FULL_MATRIX_LIMIT}).",
        ),
    ] = None,
) -> None:
    """Measure expert similarity across models, per MoE layer; print tables, write JSON/PNG."""
    metrics = check_metrics(
        [m.strip() for arg in (metric or ["cosine"]) for m in arg.split(",") if m.strip()] or ["cosine"]
    )
    if heatmap is not None and heatmap.suffix.lower() != ".png":
        raise MoeconsolError(f"{heatmap}: the heatmap is written as PNG; give a file name ending in .png")
    if json_out not in (None, "-") and not Path(json_out).parent.is_dir():
        raise MoeconsolError(f"{json_out}: directory {Path(json_out).parent} does not exist")
    ckpts = open_checkpoints(models, revision)

    err = Console(stderr=True)
    layers = len(ckpts[0].moe_layers)
    done = 0

    with stage_progress({"analyze": "measuring MoE layers"}) as progress:

        def on_layer(layer: str) -> None:
            nonlocal done
            done += 1
            progress("analyze", done, layers)

        report = analyze_models(ckpts, metrics, calibration, probes, seed, on_layer=on_layer)

    if json_out != "-":
        print_tables(report, Console())
    if json_out is not None:
        text = json.dumps(report_json(report, full_matrices), allow_nan=False)
        if json_out == "-":
            sys.stdout.write(text + "\n")
        else:
            try:
                Path(json_out).write_text(text + "\n")
            except OSError as e:
                raise MoeconsolError(f"{json_out}: cannot write: {e.strerror}") from None
            err.print(f"wrote {json_out}")
    if heatmap is not None:
        write_heatmap(report, heatmap, full=full_matrices)
        err.print(f"wrote {heatmap}")


def print_tables(report: AnalysisReport, console: Console) -> None:
    """One table per MoE layer: same-index pairs across models, and what could be shared."""
    n, e = len(report.models), report.experts_per_layer
    layouts = ", ".join(f"{m} ({lay})" for m, lay in zip(report.models, report.layouts))
    console.print(f"[bold]{report.architecture}[/]: {layouts}; {len(report.layers)} MoE layers x {e} experts")
    if report.probes is not None:
        p = report.probes
        how = f"seed {p.seed}" if p.kind == "gaussian" else f"from {p.file}"
        console.print(f"CKA probes: {p.count} {p.kind} per layer ({how})")
    if len(report.layers) > COMPACT_AFTER_LAYERS:
        print_compact_table(report, console)
        return
    for sim in report.layers:
        summary = same_index_summary(report, sim)
        table = Table(title=f"{sim.layer}: {summary['pairs']} same-index pairs across {n} models", title_justify="left")
        table.add_column("metric")
        for col in ("mean", "min", "max"):
            table.add_column(col, justify="right")
        table.add_column(f"could share (of {(n - 1) * e})", no_wrap=True)
        shared = {s["rule"]: s["experts"] for s in summary["shared"]}
        for m, stats in summary["metrics"].items():
            rules = " ".join(
                f"{rule.removeprefix(m + ' ').replace('>= ', '≥').replace('<= ', '≤')}: {count}"
                for rule, count in shared.items()
                if rule.startswith(m + " ")
            )
            table.add_row(
                m, *("-" if stats[k] is None else f"{stats[k]:.6g}" for k in ("mean", "min", "max")), rules or "-"
            )
        table.add_row("bit-identical", "-", "-", "-", f"{shared['identical']}  ({summary['identical_pairs']} pairs)")
        console.print(table)


COMPACT_AFTER_LAYERS = 8
"""More MoE layers than this: one table, a row per layer."""


def print_compact_table(report: AnalysisReport, console: Console) -> None:
    """One row per MoE layer: the same-index mean of each metric and what could be shared."""
    n, e = len(report.models), report.experts_per_layer
    summaries = [(sim.layer, same_index_summary(report, sim)) for sim in report.layers]
    rules = [r["rule"] for r in summaries[0][1]["shared"]]
    table = Table(
        title=f"same-index pairs across {n} models (mean); expert copies that could be shared, of {(n - 1) * e}",
        title_justify="left",
    )
    table.add_column("layer", no_wrap=True)
    for m in report.metrics:
        table.add_column(m, justify="right")
    for rule in rules:
        table.add_column(rule.replace(">= ", "≥").replace("<= ", "≤"), justify="right")
    for layer, summary in summaries:
        means = [summary["metrics"][m]["mean"] for m in report.metrics]
        shared = {r["rule"]: r["experts"] for r in summary["shared"]}
        table.add_row(layer, *("-" if v is None else f"{v:.4g}" for v in means), *(str(shared[r]) for r in rules))
    console.print(table)
