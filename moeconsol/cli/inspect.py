"""`moeconsol inspect`: what an artifact holds, from its manifest alone. Imports neither torch
nor the pipeline (the command is a second's work at most, the imports were five)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..artifact.overview import open_manifest, summary
from ..io.sizes import format_bytes
from . import app


def print_summary(s: dict, title: str) -> None:
    console = Console()
    c = s["consolidation"]
    settings = ", ".join(f"{k}={v}" for k, v in c.items() if v is not None)
    console.print(
        f"[bold]{title}[/bold]  {s['architecture']}, {s['dtype']}, models: {', '.join(m['name'] for m in s['models'])}"
    )
    console.print(f"consolidation: {settings}")
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
