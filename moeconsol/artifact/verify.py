"""`verify_artifact`: every file of an artifact checked against its manifest, every problem listed
(sizes, sha256, tensor headers, references between manifest entries, encoded tensors, corrections)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DamagedArtifactError
from ..io.safetensors_file import dtype_names, torch_dtypes
from .corrections import FORMATS
from .manifest import DeltaEntry
from .reader import Artifact, Progress, bank_key, check_files


def check_references(art: Artifact) -> list[str]:
    """Every bank key and model tensor the manifest refers to is stored; slot maps in range."""
    problems = []
    spec = art.spec
    wm = spec.weight_map
    for entry in spec.layers:
        size = len(entry.bank)
        for k in range(size):
            for part, want in spec.entry_parts(entry.bank[k]).items():
                key = bank_key(entry.layer, k, part)
                stored = spec.shapes.get(key)
                field = "value_parts" if entry.bank[k].values else "part_shapes"
                if key not in wm:
                    problems.append(f"{entry.layer}: bank expert {k} part {part} is not stored")
                elif stored is None or stored.shape != want.shape:
                    problems.append(f"{key}: shape differs from {field}[{part}]")
                elif stored.dtype != want.dtype:
                    problems.append(
                        f"{key}: dtype {stored.dtype} differs from the manifest's expert dtype {want.dtype}"
                    )
        for name, slots in entry.slot_map.items():
            if len(slots) != art.experts_per_layer or not all(0 <= s < size for s in slots):
                problems.append(f"{entry.layer}: slot map of {name!r} is out of range")
        problems += _delta_problems(art, entry.layer, entry.deltas)
    for model in spec.models:
        for tensor, key in model.tensors.items():
            if key not in wm:
                problems.append(f"{model.name}: tensor {tensor} (stored as {key}) is not stored")
    for key, file in wm.items():
        if file not in spec.files:
            problems.append(f"{key}: stored in {file}, which the manifest does not list")
    for key, encoding in spec.encodings.items():
        if key not in wm:
            problems.append(f"{key}: encoded, but not stored")
        if encoding.reference not in wm:
            problems.append(f"{key}: its reference {encoding.reference} is not stored")
    return problems


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


def _delta_problems(art: Artifact, layer: str, deltas: dict[str, list[DeltaEntry]]) -> list[str]:
    """Every delta component stored with the dtype and shape its format gives for its part."""
    problems = []
    dtype, names = torch_dtypes()[art.spec.dtype], dtype_names()
    for name, items in deltas.items():
        for x in items:
            for part, comps in x.keys.items():
                want = FORMATS[x.format].components(art.spec.part_shapes[part], x.size, dtype)
                for c, key in comps.items():
                    stored = art.spec.shapes.get(key)
                    wdtype, wshape = want[c]
                    wdtype = names[wdtype]
                    if stored is None or stored.dtype != wdtype or stored.shape != tuple(wshape):
                        got = "nothing" if stored is None else f"{stored.dtype} {list(stored.shape)}"
                        problems.append(
                            f"{key}: {name!r} {layer} expert {x.expert}: {x.format} delta component {c} is {got}, expected {wdtype} {list(wshape)}"
                        )
    return problems


_check_references = check_references  # the name used before it was public


def verify_artifact(path: str | Path, progress: Progress | None = None) -> list[str]:
    """Everything wrong with an artifact (empty list: all is well). Raises ArtifactError
    when `path` is not an artifact at all (missing, no manifest, a manifest that is not
    valid JSON, lacks a field, has a field of the wrong type or an unsafe path)."""
    art = Artifact.open(path)
    problems = check_references(art) + check_files(art, progress=progress)
    if not problems:  # every file is as written: then every encoded tensor must decode
        art._checked.update(art.spec.files)
        problems = check_encodings(art, progress)
    return problems


# -- export -------------------------------------------------------------------------------
