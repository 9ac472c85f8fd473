"""`moeconsol inspect`: what an artifact holds, from its manifest alone. Imports neither torch
nor the pipeline (the command is a second's work at most, the imports were five)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from ..artifact.overview import open_manifest, summary
from ..io.sizes import format_bytes
from . import app
from .settings_text import mapping_lines, settings_line


def _figure(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _print_heldout(h: dict) -> None:
    """What each variant kept on held-back data (calibrated mode), and the candidates' figures."""
    console = Console()
    against = f"against base {h['base']}" if h["base"] else "(no base known)"
    console.print(
        f"held-back check: last {h['holdout']:.0%} of each calibration file, {h['seconds']:.1f} s; "
        f"kept = retained gain {against} where the variant gained there, else its own loss / the "
        "consolidated loss (ratio)",
        soft_wrap=True,
        highlight=False,
    )
    table = Table(
        "variant", "by", "kept", *h["candidates"], title=f"written: {h['chosen']}", box=box.SIMPLE_HEAD, pad_edge=False
    )
    for name, v in h["variants"].items():
        table.add_row(
            name,
            "gain" if v["score"] == "retained_gain" else "ratio",
            _figure(v["kept"]),
            *(_figure(f.get(name)) for f in h["candidates"].values()),
        )
    console.print(table)
    if h["raised"]:
        print(raised_line(h))  # one line, never wrapped


def raised_line(h: dict) -> str:
    """The one line that says which variants were raised above their base, and to what."""
    kept = ", ".join(f"{n} {_figure(h['variants'][n]['kept'])}" for n in h["raised"])
    return (
        f"raised: {', '.join(h['raised'])} fell below its base on held-back data under every candidate; "
        f"it now keeps more of its own experts (kept: {kept})"
    )


def print_summary(s: dict, title: str) -> None:
    console = Console()
    c = s["consolidation"]
    console.print(
        f"[bold]{title}[/bold]  {s['architecture']}, {s['dtype']}, models: {', '.join(m['name'] for m in s['models'])}"
    )
    for line in [f"consolidation: {settings_line(c)}", *mapping_lines(c)]:
        console.print(line, markup=False, highlight=False)
    n_slots = len(s["models"]) * s["experts_per_layer"]
    table = Table("MoE layer", "bank", "slots", "shared")
    for layer, size in s["bank"].items():
        table.add_row(layer, str(size), str(n_slots), f"{1 - size / n_slots:.1%}")
    console.print(table)
    b = s["bytes"]
    if b.get("inputs"):
        console.print(
            f"inputs: {format_bytes(b['inputs'])}  artifact: {format_bytes(b['artifact'])}  ({b['artifact'] / b['inputs']:.1%} of the inputs)"
        )
    if b.get("experts_in") and b.get("deltas") is not None:
        kept = b["bank"] + b["deltas"]
        slots = sum(s.get("delta_slots", {}).values())
        console.print(
            f"experts: {format_bytes(b['experts_in'])} in, bank {format_bytes(b['bank'])} + deltas {format_bytes(b['deltas'])} "
            f"({slots} slots) = {format_bytes(kept)}: {kept / b['experts_in']:.1%} of the expert bytes, "
            f"{format_bytes(b['experts_in'] - kept)} saved"
        )
        if b.get("corrected_host"):
            console.print(
                f"served in swap mode, the corrected experts take {format_bytes(b['corrected_host'])} of host memory"
            )
    elif b.get("experts_in"):
        saved = b["experts_in"] - b["bank"]
        console.print(
            f"experts: {format_bytes(b['experts_in'])} in, bank {format_bytes(b['bank'])}: "
            f"{format_bytes(saved)} of expert memory saved ({saved / b['experts_in']:.1%})"
        )
    if b.get("non_expert_whole"):
        console.print(
            f"non-expert tensors: {format_bytes(b['non_expert'])} stored, {format_bytes(b['non_expert_whole'])} whole ({b['non_expert'] / b['non_expert_whole']:.1%})"
        )
    if s.get("heldout"):
        _print_heldout(s["heldout"])
    if q := s.get("quantization"):
        console.print(
            f"quantized: {q['method']} experts stored as {', '.join(sorted(set(q['stored_dtypes'].values())))}; "
            f"the runtime holds the bank {q['served_as']}: {format_bytes(q['bank_served'])} "
            f"(stored: {format_bytes(q['bank_stored'])})"
        )


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., metavar="OUT", help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Models, bank size per layer, bytes and consolidation settings of an artifact."""
    s = summary(open_manifest(artifact))
    if as_json:
        print(json.dumps(s, indent=2))
    else:
        print_summary(s, str(s["path"]))
