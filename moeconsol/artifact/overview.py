"""What `inspect` shows, from the manifest alone: no tensor is read and torch is not imported
(an OLMoE-sized manifest is 1.9 MB; importing torch took longer than everything else).

`open_manifest` does `Artifact.open`'s checks (a directory, with a manifest, valid) and
nothing more; `summary` works on it or on an `Artifact`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..architectures.layouts import layout_by_name
from ..errors import ArtifactError
from ..io import quant
from ..io.safetensors_file import ITEMSIZE
from .manifest import MANIFEST, Manifest, heldout_json


@dataclass(frozen=True)
class OpenedManifest:
    """An artifact directory and its validated manifest (typed, and as JSON)."""

    path: Path
    spec: Manifest
    manifest: dict[str, Any]


def open_manifest(path: str | Path) -> OpenedManifest:
    """Read and validate `path`/manifest.json; ArtifactError if `path` is not an artifact."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact directory")
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact (expected a directory made by `moeconsol merge`)")
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise ArtifactError(f"{path}: not a moeconsol artifact (no {MANIFEST})")
    spec, data = Manifest.read(manifest_path)
    return OpenedManifest(path, spec, data)


def summary(art: OpenedManifest) -> dict:
    """What `inspect` shows: models, bank per layer, bytes, settings (`art`: an
    `OpenedManifest` or an `Artifact`: anything with `path` and `spec`). `corrected_host`: the
    host memory a swap-mode runtime keeps every variant's corrected experts decoded in (one
    expert per delta slot; docs/runtime.md)."""
    spec = art.spec
    b = spec.bytes
    delta_slots = {entry.layer: sum(len(x) for x in entry.deltas.values()) for entry in spec.layers}
    slots = sum(delta_slots.values())
    return {
        "path": str(art.path),
        "architecture": spec.architecture,
        "dtype": spec.dtype,
        "models": [{"name": m.name, "source": m.source, "layout": m.layout} for m in spec.models],
        "experts_per_layer": spec.experts_per_layer,
        "consolidation": spec.consolidation,
        "bank": {entry.layer: len(entry.bank) for entry in spec.layers},
        "bytes": {
            "inputs": b.get("inputs"),
            "artifact": sum(f.size for f in spec.files.values()) + (art.path / MANIFEST).stat().st_size,
            "experts_in": b.get("experts_in"),
            "bank": b.get("bank"),
            "deltas": b.get("deltas"),
            "non_expert": b.get("non_expert"),
            "non_expert_whole": b.get("non_expert_whole"),
            "corrected_host": slots * expert_nbytes(spec) if slots else None,
        },
        "delta_slots": delta_slots,
        "files": len(spec.files) + 1,
        **({"heldout": heldout_json(spec.heldout)} if spec.heldout is not None else {}),
        **({"quantization": quantization_summary(spec)} if spec.quantization is not None else {}),
    }


def expert_nbytes(spec: Manifest) -> int:
    """Bytes of one expert, every part, in the artifact's dtype."""
    return sum(math.prod(shape) for shape in spec.part_shapes.values()) * ITEMSIZE[spec.dtype]


def quantization_summary(spec: Manifest, serving_bytes: int = 2) -> dict:
    """A quantized bank as stored, and what the runtime holds: every bank expert dequantized
    to the serving dtype at load (`serving_bytes` per value: 2 for bf16, the default)."""
    assert spec.quantization is not None
    layout = layout_by_name(spec.models[0].layout)
    base = layout_by_name(layout.base) if layout.base else layout
    values = 0
    for unit, parts in quant.units(spec.quantization, spec.parts).items():
        values += math.prod(quant.unit_shape(spec.quantization, spec.part_shapes, unit, parts))
    entries = sum(len(entry.bank) for entry in spec.layers)
    return {
        "method": spec.quantization.method,
        "block": None if spec.quantization.block is None else list(spec.quantization.block),
        "stored_dtypes": dict(spec.part_dtypes),
        "bank_stored": spec.bytes.get("bank"),
        "bank_served": entries * values * serving_bytes,
        "served_as": f"dequantized at load to the serving dtype ({base.name} parts, {serving_bytes} bytes per value)",
    }
