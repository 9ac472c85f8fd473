"""`verify_artifact`: every file of an artifact checked against its manifest, every problem listed:
what its tensors must be (`validate.problems`, the validator every reader goes through: bank
experts, slot maps, delta components by their format, references between entries), sizes,
sha256, tensor headers, and every encoded tensor decoded."""

from __future__ import annotations

from pathlib import Path

from ..errors import DamagedArtifactError
from . import validate
from .reader import Artifact, Progress, check_files


def check_encodings(art: Artifact, progress: Progress | None = None) -> list[str]:
    """Every encoded tensor decodes (one at a time) to its recorded dtype and shape."""
    problems = []
    keys = list(art.spec.encodings)
    for i, key in enumerate(keys):
        if progress:
            progress("decode", i, len(keys))
        try:
            art._decode(key, *art._encoded(key))
        except DamagedArtifactError as e:
            problems.append(f"tensor {key}: {e}")
    if progress and keys:
        progress("decode", len(keys), len(keys))
    return problems


def verify_artifact(path: str | Path, progress: Progress | None = None) -> list[str]:
    """Everything wrong with an artifact (empty list: all is well). Raises ArtifactError
    when `path` is not an artifact at all (missing, no manifest, a manifest that is not
    valid JSON, lacks a field, has a field of the wrong type or an unsafe path)."""
    art = Artifact.open(path)
    problems = validate.problems(art.spec) + check_files(art, progress=progress)
    if not problems:  # every file is as written: then every encoded tensor must decode
        art._checked.update(art.spec.files)
        problems = check_encodings(art, progress)
    return problems
