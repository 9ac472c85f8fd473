"""What `inspect` shows, from the manifest alone: no tensor is read and torch is not imported
(an OLMoE-sized manifest is 1.9 MB; importing torch took longer than everything else).

`open_manifest` does `Artifact.open`'s checks (a directory, with a manifest, valid) and
nothing more; `summary` works on it or on an `Artifact`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from .manifest import MANIFEST, Manifest


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
    `OpenedManifest` or an `Artifact`: anything with `path` and `spec`)."""
    spec = art.spec
    b = spec.bytes
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
        },
        "delta_slots": {entry.layer: sum(len(x) for x in entry.deltas.values()) for entry in spec.layers},
        "files": len(spec.files) + 1,
    }
