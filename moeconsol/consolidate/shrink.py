"""Removing a variant from an artifact (`moeconsol remove`), and compacting it.

The manifest stops naming the model, its delta slots, the bank entries no other variant uses
and the non-expert versions no other variant uses (a reference of another's encoded version
stays). Bank entries after a dropped one move down an index; their tensors stay where they
are, under their old keys (`BankEntry.key`, format version 3). No file is rewritten: the
bytes no longer used stay on disk until `compact`, which copies every used tensor into new
files of the next generation (bank entries under merge's keys again: format version 2), switches
the manifest, then deletes every file the new manifest does not list.

A bank entry another variant still uses but that stores the removed variant's expert (or a
mean computed with it) keeps serving the others exactly as before; in a lossless artifact its
bytes are every member's, so its `representative` becomes the first remaining member. In the
other modes such an entry cannot be described without the removed model: refused.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..artifact.manifest import MANIFEST, BankEntry, FileEntry, LayerEntry, Manifest, TensorEntry
from ..artifact.reader import Artifact, Progress
from ..artifact.switch import changed_artifact, delete_unlisted, generation_prefix
from ..errors import SettingsError
from ..io.writer import ShardedWriter, TensorSpec, check_destination
from .edit import bank_part_key, delta_keys, recount_bytes, used_keys
from .settings import DEFAULT_SHARD_SIZE, Mode


@dataclass
class RemoveResult:
    path: Path
    name: str
    generation: int
    dropped_bank: dict[str, int]
    """MoE layer -> bank entries no other variant used (dropped)."""
    dropped_non_expert: int
    compacted: bool = False
    bytes_written: int = 0
    deleted: list[str] = field(default_factory=list)
    """Files deleted (compact, in place)."""


def remove_variant(
    path: str | Path,
    name: str,
    out: str | Path | None = None,
    *,
    force: bool = False,
    compact: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    progress: Progress | None = None,
) -> RemoveResult:
    """Remove model `name` from the artifact at `path` (in place, or as a new artifact at `out`)."""
    path = Path(path).absolute()
    out = None if out is None else Path(out).absolute()
    art = Artifact.open(path)
    spec = art.spec
    art.config(name)  # UnknownModelError naming the models it holds
    if len(spec.models) == 1:
        raise SettingsError(
            f"{name!r} is the only model of {path}: an artifact holds at least one; delete the directory"
        )
    if spec.quantization is not None:
        raise SettingsError(
            f"remove: {path} banks a {spec.quantization.method} release's experts as stored, which remove does not "
            "change yet: re-merge without the variant (moeconsol merge)"
        )
    if out is not None:
        check_destination(out, force, [path])
    gen = spec.generation + 1
    manifest, dropped_bank = _without(spec, name, gen)
    dropped_ne = len(
        {k for m in spec.models for k in m.tensors.values()} - {k for m in manifest.models for k in m.tensors.values()}
    )
    result = RemoveResult(path if out is None else out, name, gen, dropped_bank, dropped_ne, compacted=compact)
    with changed_artifact(path, out, force, progress) as (target, commit):
        if compact:
            created: list[Path] = []
            try:
                manifest = _compacted(art, manifest, target, gen, shard_size, created, progress)
                result.bytes_written = sum(manifest.files[f].size for f in manifest.files if f not in spec.files)
                result.bytes_written += commit(manifest)
            except BaseException:
                if out is None:
                    for p in created:
                        p.unlink(missing_ok=True)
                raise
        else:
            result.bytes_written = commit(manifest)
    if compact and out is None:
        result.deleted = delete_unlisted(path, spec, manifest) + _delete_strays(path, manifest)
    return result


def _without(spec: Manifest, name: str, gen: int) -> tuple[Manifest, dict[str, int]]:
    """The manifest without model `name`, and each layer's count of dropped bank entries."""
    r = next(i for i, m in enumerate(spec.models) if m.name == name)
    lossless = spec.consolidation.get("mode") == Mode.LOSSLESS.value

    def renumber(member: tuple[int, int]) -> tuple[int, int]:
        return (member[0] - (member[0] > r), member[1])

    layers: list[LayerEntry] = []
    dropped: dict[str, int] = {}
    for entry in spec.layers:
        bank: list[BankEntry] = []
        moved: dict[int, int] = {}
        for k, b in enumerate(entry.bank):
            members = [renumber(x) for x in b.members if x[0] != r]
            if not members:
                dropped[entry.layer] = dropped.get(entry.layer, 0) + 1
                continue
            rep = b.representative
            if len(members) < len(b.members) and (rep is None or rep[0] == r):
                if not lossless:
                    what = "a mean computed with" if rep is None else "the expert of"
                    raise SettingsError(
                        f"{entry.layer}: bank entry {k} stores {what} {name!r} and serves other variants too; "
                        f"removing a variant from a {spec.consolidation.get('mode')} artifact works only where no "
                        "other variant shares its stored experts: re-merge without it"
                    )
                rep = members[0]
            elif rep is not None:
                rep = renumber(rep)
            weights = None if b.weights is None else [w for x, w in zip(b.members, b.weights) if x[0] != r]
            key = b.key if b.key is not None or len(bank) == k else f"bank.{entry.layer}.{k}"
            moved[k] = len(bank)
            bank.append(replace(b, members=members, representative=rep, weights=weights, key=key))
        slot_map = {n: [moved[k] for k in sm] for n, sm in entry.slot_map.items() if n != name}
        deltas = {n: [replace(d, bank=moved[d.bank]) for d in ds] for n, ds in entry.deltas.items() if n != name}
        layers.append(LayerEntry(entry.layer, bank, slot_map, deltas))
    models = [m for m in spec.models if m.name != name]
    draft = replace(spec, models=models, layers=layers, generation=gen)
    used = used_keys(draft)
    weight_map = {k: f for k, f in spec.weight_map.items() if k in used}
    side = {f"models/{m.name}/{f}" for m in models for f in m.files}
    listed = set(weight_map.values()) | side
    manifest = replace(
        draft,
        weight_map=weight_map,
        shapes={k: v for k, v in spec.shapes.items() if k in used},
        files={f: e for f, e in spec.files.items() if f in listed},
        encodings={k: v for k, v in spec.encodings.items() if k in used},
        digests={k: v for k, v in spec.digests.items() if k in used},
    )
    return replace(manifest, bytes=recount_bytes(manifest, None)), dropped


def _compacted(
    art: Artifact,
    manifest: Manifest,
    target: Path,
    gen: int,
    shard_size: int,
    created: list[Path],
    progress: Progress | None,
) -> Manifest:
    """Copy every tensor `manifest` uses into new files in `target` (bank entries under
    merge's keys); the manifest that lists only those and the side files."""
    renamed = {
        bank_part_key(entry.layer, k, b.key, part): bank_part_key(entry.layer, k, None, part)
        for entry in manifest.layers
        for k, b in enumerate(entry.bank)
        for part in manifest.parts
    }
    dkeys = delta_keys(manifest)
    groups: dict[str, list[str]] = {"bank": [], "deltas": [], "tensors": []}
    for key in manifest.weight_map:
        groups["bank" if key in renamed else "deltas" if key in dkeys else "tensors"].append(key)
    total = len(manifest.weight_map)
    done = 0
    files: dict[str, FileEntry] = {}
    weight_map: dict[str, str] = {}
    shapes: dict[str, TensorEntry] = {}
    for kind, keys in groups.items():
        if not keys:
            continue
        specs = [TensorSpec(renamed.get(k, k), manifest.shapes[k].dtype, manifest.shapes[k].shape) for k in keys]
        writer = ShardedWriter(target, generation_prefix(kind, gen), specs, shard_size)
        created += [target / f for f in writer.file_names]
        for k in keys:
            writer.copy(renamed.get(k, k), art.tensor_info(k))
            done += 1
            if progress:
                progress("write", done, total)
        files.update({f: FileEntry(r.size, r.sha256) for f, r in writer.close().items()})
        weight_map.update(writer.weight_map)
        shapes.update({s.name: TensorEntry(s.dtype, tuple(s.shape)) for s in specs})
    side = {f: e for f, e in manifest.files.items() if f.startswith("models/")}
    return replace(
        manifest,
        layers=[replace(x, bank=[replace(b, key=None) for b in x.bank]) for x in manifest.layers],
        weight_map=weight_map,
        shapes=shapes,
        files={**side, **dict(sorted(files.items()))},
        digests={renamed.get(k, k): v for k, v in manifest.digests.items()},
    )


def _delete_strays(path: Path, manifest: Manifest) -> list[str]:
    """Compact in place: also delete what earlier changes left unlisted (safetensors files at
    the top, models/<name>/ of models no longer held)."""
    gone = []
    for p in sorted(path.glob("*.safetensors")):
        if p.name not in manifest.files and p.name != MANIFEST:
            p.unlink(missing_ok=True)
            gone.append(p.name)
    held = {m.name for m in manifest.models}
    models = path / "models"
    if models.is_dir():
        for d in sorted(models.iterdir()):
            if d.is_dir() and d.name not in held:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(f"models/{d.name}/")
    return gone
