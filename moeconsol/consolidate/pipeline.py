"""The merge pipeline: N checkpoints in, one consolidated artifact out.

Two streaming passes, so memory never grows with the number of layers:

1. **Plan.** The mode's planner (`planners`) chooses each MoE layer's bank, holding one layer
   of all N models at a time and keeping only digests and small matrices; then every
   non-expert tensor is hashed, one at a time, so that a version bit-identical across models
   is stored once (`nonexpert`).
2. **Write.** Every stored tensor is now known by name, dtype and shape: the shards are
   streamed to disk one tensor at a time (`writing`), and the manifest is built from the
   plans and the files written (`artifact.builder`).

The artifact is built in a hidden temporary directory and renamed into place at the end;
see `writer.atomic_directory`. Its format is in docs/artifact.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..artifact.builder import build_manifest
from ..artifact.manifest import MANIFEST
from ..artifact.reader import Progress
from ..io.checkpoint import Checkpoint, check_compatible, check_config, open_checkpoint
from ..io.writer import atomic_directory, check_destination, check_free_space
from .planners import planner_for
from .settings import MergeSettings, check_quantized, check_settings
from .writing import estimated_bytes, write_artifact


@dataclass
class MergeResult:
    path: Path
    manifest: dict
    input_bytes: int
    artifact_bytes: int
    expert_bytes_in: int
    bank_bytes: int
    bank_sizes: dict[str, int] = field(default_factory=dict)
    delta_bytes: int = 0
    """Bytes of the stored delta tensors (calibrated + deltas; else 0)."""
    seconds: float = 0.0
    """Wall-clock seconds of the whole merge."""
    check_seconds: float | None = None
    """Of which the held-back check of calibrated mode (None: no check)."""

    @property
    def expert_bytes_saved(self) -> int:
        return self.expert_bytes_in - self.bank_bytes - self.delta_bytes


def merge(
    ckpts: list[Checkpoint],
    out: str | Path,
    settings: MergeSettings | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Consolidate `ckpts` (from `checkpoint.open_checkpoints`) into an artifact at `out`."""
    s = check_settings(settings or MergeSettings())
    planner = planner_for(s.mode)
    s = planner.check(s, ckpts)
    check_quantized(s, ckpts)
    out = Path(out).absolute()
    started = time.perf_counter()
    base = None
    if planner.needs_base or (planner.takes_base and s.base is not None):
        base = open_checkpoint(s.base)
        check_compatible([*ckpts, base])
    for c in [*ckpts, *([base] if base is not None else [])]:
        check_config(c)
    inputs = [*{p: None for c in ckpts for p in (c.path, c.weights_dir)}] + ([base.path] if base is not None else [])
    if planner.needs_calibration:
        inputs += [Path(f) for f in (s.calibration or {}).values()]
    check_destination(out, force, inputs)
    check_free_space(out, sum(info.nbytes for info in ckpts[0].tensors.values()))

    decision = planner.decide(ckpts, s, base, progress)
    plans = decision.plans
    non_experts = planner.plan_non_experts(ckpts, s, progress)
    check_free_space(out, estimated_bytes(ckpts, plans, non_experts, s.non_expert_codec))

    with atomic_directory(out, force=force, inputs=inputs) as tmp:
        written = write_artifact(tmp, ckpts, plans, non_experts, s, base, progress)
        manifest = build_manifest(
            ckpts, planner.record(s, ckpts, base), plans, non_experts.keys, written, decision.heldout
        )
        text = manifest.dumps().encode()
        (tmp / MANIFEST).write_bytes(text)
    b = manifest.bytes
    return MergeResult(
        path=out,
        manifest=manifest.to_json(),
        input_bytes=b["inputs"],
        artifact_bytes=sum(r.size for r in written.files.values()) + len(text),
        expert_bytes_in=b["experts_in"],
        bank_bytes=b["bank"],
        bank_sizes={p.layer: len(p.clusters) for p in plans},
        delta_bytes=sum(x.nbytes for x in written.deltas),
        seconds=time.perf_counter() - started,
        check_seconds=None if decision.heldout is None else decision.heldout.seconds,
    )
