"""`moeconsol add` and `remove`: change an artifact's variants without re-merging the others."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console

from ..errors import SettingsError
from ..io.sizes import format_bytes, parse_size
from . import app
from .options import parse_named_files
from .progress import stage_progress

_STAGES = {
    "plan": "hashing the new variant's experts",
    "non-expert": "hashing its non-expert tensors",
    "encode": "encoding non-expert tensors",
    "write": "writing",
    "switch": "switching the manifest",
}


def _target(output: Path | None, in_place: bool) -> Path | None:
    """Where the changed artifact goes: -o NEW, or None for --in-place (exactly one given)."""
    if (output is None) == (not in_place):
        raise SettingsError("give exactly one of -o NEW (a new artifact) and --in-place (change ART itself)")
    return output


def _result_json(result) -> str:
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}, indent=2)


@app.command()
def add(
    artifact: Path = typer.Argument(..., metavar="ART", help="Artifact directory (lossless)."),
    model: str = typer.Argument(..., metavar="NAME=PATH", help="The checkpoint to add, and its name."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the result as a new artifact here."),
    in_place: bool = typer.Option(False, "--in-place", help="Change ART itself (atomically)."),
    calibration: list[str] = typer.Option(
        [], help="NAME=FILE: calibration data of the new variant (calibrated artifacts: not supported, refused)."
    ),
    budget: str | None = typer.Option(
        None,
        help="Budget artifacts: bank bytes (40GB) or fraction of all experts with the new variant (default: ART's).",
    ),
    replan: bool = typer.Option(False, "--replan", help="Re-plan the other variants too (not supported: refused)."),
    shard_size: str = typer.Option("5GB", help="Maximum bytes per new safetensors shard (5GB, 500MB)."),
    non_expert_codec: str = typer.Option(
        "xor-zstd", help="xor-zstd | none: store new non-expert versions as lossless deltas where smaller, or whole."
    ),
    force: bool = typer.Option(False, "--force", help="With -o: replace NEW if it exists."),
    revision: str | None = typer.Option(None, help="Hub revision for a hub id."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Add one variant: hash its experts against the bank, append only the distinct ones."""
    out = _target(output, in_place)
    if calibration:
        parse_named_files(calibration, "--calibration", allow_unnamed=False)
        raise SettingsError(
            "--calibration applies to calibrated artifacts, which add does not extend (their bank depends on every "
            "variant's activations at once): re-merge with every variant's calibration data (moeconsol merge --mode "
            "calibrated)"
        )
    shard_bytes = parse_size(shard_size)
    from ..consolidate.grow import add_variant  # imports torch: after the options are checked, for start-up time

    with stage_progress(_STAGES) as report:
        r = add_variant(
            artifact,
            model,
            out,
            force=force,
            shard_size=shard_bytes,
            non_expert_codec=non_expert_codec,
            revision=revision,
            budget=budget,
            replan=replan,
            progress=report,
        )
    if as_json:
        print(_result_json(r))
        return
    new = sum(r.new_bank.values())
    console = Console()
    console.print(
        f"added {r.name!r} to {r.path}: {r.shared_slots} of its {r.slots} expert slots share bank entries, "
        f"{new} new; {r.non_expert_new} non-expert versions stored ({r.non_expert_encoded} as lossless deltas)"
    )
    if r.references_read:
        console.print(f"read {len(r.references_read)} stored non-expert tensors of the artifact as delta references")
    if r.bank_hashed:
        console.print(f"hashed {r.bank_hashed} bank entries whose digests the manifest did not record")
    if r.placement is not None:
        p = r.placement
        within = f" within {p.budget_experts} bank experts" if p.budget_experts is not None else ""
        console.print(f"placed by similarity ({p.mode}{within}); slots served by their own expert, before -> after:")
        for name, after in p.kept_after.items():
            before = p.kept_before.get(name)
            console.print(f"  {name}: {'-' if before is None else before} -> {after} of {p.slots}")
    console.print(f"wrote {format_bytes(r.bytes_written)} (generation {r.generation})")


@app.command()
def remove(
    artifact: Path = typer.Argument(..., metavar="ART", help="Artifact directory."),
    name: str = typer.Argument(..., metavar="NAME", help="The variant to remove."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the result as a new artifact here."),
    in_place: bool = typer.Option(False, "--in-place", help="Change ART itself (atomically)."),
    compact: bool = typer.Option(
        False, "--compact", help="Rewrite the files so that no unused byte stays (in place: delete the old ones)."
    ),
    shard_size: str = typer.Option("5GB", help="With --compact: maximum bytes per shard (5GB, 500MB)."),
    force: bool = typer.Option(False, "--force", help="With -o: replace NEW if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Remove one variant: drop the bank entries and tensors no other variant uses."""
    out = _target(output, in_place)
    shard_bytes = parse_size(shard_size)
    from ..consolidate.shrink import remove_variant  # imports torch: after the options are checked, for start-up time

    with stage_progress(_STAGES) as report:
        r = remove_variant(artifact, name, out, force=force, compact=compact, shard_size=shard_bytes, progress=report)
    if as_json:
        print(_result_json(r))
        return
    console = Console()
    console.print(
        f"removed {r.name!r} from {r.path}: {sum(r.dropped_bank.values())} bank entries and "
        f"{r.dropped_non_expert} non-expert versions no other variant used"
        + (f"; compacted, {len(r.deleted)} files deleted" if r.compacted else "; their bytes stay until --compact")
    )
