"""`moeconsol merge`, `export`, `verify`: options in, library call, output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from ..consolidate.modes import check_mode
from ..io.checkpoint import open_checkpoints
from ..io.sizes import parse_size
from . import app
from .inspect import print_summary, raised_line
from .options import parse_named_files
from .progress import stage_progress

_STAGES = {
    "plan": "measuring experts",
    "calibrate": "capturing calibration activations",
    "deltas": "costing deltas",
    "non-expert": "hashing non-expert tensors",
    "write": "writing",
    "export": "exporting",
    "verify": "checking files",
    "encode": "encoding non-expert tensors",
    "decode": "decoding non-expert tensors",
    "check": "measuring plans on held-back data",
    "raise": "raising variants below their base",
}


@app.command()
def merge(
    models: list[str] = typer.Argument(
        ..., metavar="MODEL...", help="Checkpoints: PATH, NAME=PATH or hub ids (from the local cache)."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact directory to create."),
    mode: str = typer.Option(
        "lossless", help="lossless | threshold | budget | calibrated | reference | average | task-arithmetic | ties."
    ),
    metric: str | None = typer.Option(
        None, help="cosine | l2 | relative-l2 | cka (threshold, budget and calibrated modes; default cosine)."
    ),
    threshold: float | None = typer.Option(
        None, help="threshold mode: every member within this of its cluster (similarity >= t, or distance <= t)."
    ),
    budget: str | None = typer.Option(
        None,
        help="budget, calibrated and reference modes: expert memory as bank bytes (40GB) or a fraction of all "
        "experts (0.5); with --deltas, bank + delta bytes. (sweep takes a list: --budgets.)",
    ),
    representative: str = typer.Option(
        "medoid", help="medoid | first | mean | best (calibrated): what a shared bank expert holds."
    ),
    base: str | None = typer.Option(
        None,
        help="task-arithmetic and ties: the pre-trained checkpoint the models were fine-tuned from; calibrated: "
        "the base its held-back check scores retained gain against (default: the model named base, if any).",
    ),
    density: float = typer.Option(0.2, help="ties: fraction of each task vector kept (top-k by magnitude)."),
    scale: float = typer.Option(1.0, help="task-arithmetic and ties: factor lambda on the merged task vectors."),
    calibration: list[str] = typer.Option(
        [],
        help="calibrated mode: NAME=FILE (text, or JSONL for seq2seq) per model, or FILE for every model not named; repeat.",
    ),
    calibration_tokens: int = typer.Option(512, help="calibrated mode: routed inputs kept per (model, layer, expert)."),
    deltas: bool = typer.Option(
        False,
        "--deltas",
        help="calibrated mode: slots served by a bank expert not their own may carry a compressed correction; the budget counts bank + delta bytes.",
    ),
    delta_format: str | None = typer.Option(
        None, help="With --deltas: auto (default: every format) | lowrank | sign | int4 | mixed."
    ),
    holdout: float | None = typer.Option(
        None,
        help="calibrated mode: share of each calibration file held back to measure the candidate plans on "
        "(default 0.2: the last 20%); 0 skips the check and plans on all of it.",
    ),
    check_margin: float | None = typer.Option(
        None,
        help="calibrated mode: how far (retained gain) a variant may fall below its best candidate in the "
        "held-back check before that candidate is passed over (default 0.05).",
    ),
    shard_size: str = typer.Option("5GB", help="Maximum bytes per safetensors shard (5GB, 500MB)."),
    non_expert_codec: str = typer.Option(
        "xor-zstd",
        help="xor-zstd | none: store a non-expert tensor's versions after the first as lossless deltas against it (where smaller), or whole.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    revision: str | None = typer.Option(None, help="Hub revision for hub ids."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Cluster the experts of N models into one shared bank and write one artifact."""
    check_mode(mode)
    calibration_files = parse_named_files(calibration, "--calibration") or None
    shard_bytes = parse_size(shard_size)
    ckpts = open_checkpoints(models, revision)
    # torch and the pipeline: imported once the options and inputs are checked (start-up time)
    from ..artifact.reader import Artifact, summary
    from ..consolidate.pipeline import merge as run_merge
    from ..consolidate.settings import MergeSettings

    settings = MergeSettings(
        mode,
        metric,
        threshold,
        budget,
        representative,
        shard_bytes,
        base=base,
        density=density,
        scale=scale,
        calibration=calibration_files,
        calibration_tokens=calibration_tokens,
        deltas=deltas,
        delta_format=delta_format,
        holdout=holdout,
        check_margin=check_margin,
        non_expert_codec=non_expert_codec,
    )
    with stage_progress(_STAGES) as report:
        result = run_merge(ckpts, output, settings, force=force, progress=report)
    s = summary(Artifact.open(result.path))
    s["seconds"] = {"merge": result.seconds, "check": result.check_seconds}
    if as_json:
        print(json.dumps(s, indent=2))
        if s.get("heldout", {}).get("raised"):
            print(raised_line(s["heldout"]), file=sys.stderr)
    else:
        print_summary(s, f"wrote {result.path}")
        if result.check_seconds is not None:
            Console().print(f"held-back check: {result.check_seconds:.1f} s of the merge's {result.seconds:.1f} s")


@app.command()
def export(
    artifact: Path = typer.Argument(..., metavar="OUT", help="Artifact directory."),
    model: str = typer.Argument(..., metavar="MODEL", help="Name of the model to export."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    force: bool = typer.Option(False, "--force", help="Replace DIR if it exists."),
    checksums: bool = typer.Option(
        True, "--checksums/--no-checksums", help="Check the sha256 of the files read first."
    ),
) -> None:
    """Write one model of an artifact back as a standard Hugging Face checkpoint."""
    from ..artifact.export import export_model  # torch: imported once the options are parsed (start-up time)

    with stage_progress(_STAGES) as report:
        path = export_model(artifact, model, output, force=force, checksums=checksums, progress=report)
    Console().print(f"exported {model!r} to {path}")


@app.command()
def verify(
    artifact: Path = typer.Argument(..., metavar="OUT", help="Artifact directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check every file's size and sha256 and every tensor's shape. Exit 0 if all is well,
    1 if the artifact is damaged (each problem named), 2 if OUT is not an artifact."""
    # torch: imported once the options are parsed (start-up time)
    from ..artifact.reader import Artifact
    from ..artifact.verify import verify_artifact

    with stage_progress(_STAGES) as report:
        problems = verify_artifact(artifact, progress=report)
    if as_json:
        print(json.dumps({"ok": not problems, "problems": problems}, indent=2))
    elif problems:
        for p in problems:
            print(f"damaged: {p}")
    else:
        n = len(Artifact.open(artifact).spec.files)
        Console().print(f"ok: {artifact}: {n} files, sizes, sha256 and tensor shapes all as the manifest says")
    if problems:
        raise typer.Exit(1)
