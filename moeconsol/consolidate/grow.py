"""Adding a variant to a lossless artifact without re-merging the others (`moeconsol add`).

Only the new checkpoint is read: each of its experts is hashed (BLAKE3, as merge hashes them)
and matched against the digests the manifest records for the bank; a bit-identical bank entry
serves it, and the distinct ones are appended to the bank. Each non-expert tensor is hashed
and matched against the stored versions' digests; a new version is stored as a lossless
delta (xor-zstd) against the stored whole version of its name when that takes at most
`nonexpert.MAX_DELTA_RATIO` of its bytes: only then is that version read from the artifact
(`AddResult.references_read` names them). An artifact whose manifest records no digests
(written before they were) has the missing ones computed from its own tensors, once.

The new files (`bank-gNNNN-*`, `tensors-gNNNN-*`, models/<name>/) and the new manifest are
written beside the old files, which are never rewritten (`artifact.switch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..artifact import nonexpert_codec as codec
from ..artifact.builder import input_bytes, source_index, source_shards
from ..artifact.manifest import BankEntry, Encoding, FileEntry, LayerEntry, Manifest, ModelEntry, TensorEntry
from ..artifact.reader import Artifact, Progress
from ..artifact.switch import changed_artifact, generation_prefix
from ..errors import IncompatibleModelsError, SettingsError
from ..io.checkpoint import Checkpoint, check_config, expert_nbytes, natural_key, open_checkpoint
from ..io.digest import range_digest, tensor_digest
from ..io.safetensors_file import TensorInfo, read_tensor
from ..io.writer import FileRecord, ShardedWriter, TensorSpec, check_destination, check_free_space, copy_file
from .edit import recount_bytes
from .nonexpert import MAX_DELTA_RATIO, tensor_digest_of, tensor_head
from .planners.grouped import scanned_digest
from .settings import DEFAULT_SHARD_SIZE, Mode

SPILL = ".encoded-non-experts"
"""The file the new variant's encoded non-expert versions wait in before they are copied."""


@dataclass
class AddResult:
    path: Path
    name: str
    generation: int
    new_bank: dict[str, int]
    """MoE layer -> bank entries appended for the new variant."""
    slots: int
    """The new variant's expert slots (layers x experts)."""
    non_expert_new: int
    """Non-expert versions stored for it (the rest were already stored)."""
    non_expert_encoded: int
    """Of those, how many are stored as lossless deltas."""
    references_read: list[str] = field(default_factory=list)
    """Stored keys read from the artifact as delta references."""
    bank_hashed: int = 0
    """Bank entries hashed from the artifact (its manifest had no digest for them)."""
    bytes_written: int = 0
    """New files and the manifest."""

    @property
    def shared_slots(self) -> int:
        return self.slots - sum(self.new_bank.values())


def check_lossless(spec: Manifest, command: str) -> None:
    """Refuse an artifact whose bank is not lossless (what `command` cannot yet change)."""
    mode = spec.consolidation.get("mode")
    if mode != Mode.LOSSLESS.value:
        raise SettingsError(
            f"{command}: this artifact was merged with mode {mode!r}; adding a variant is supported for lossless "
            "artifacts only (placing experts within a budget needs a re-merge: moeconsol merge ... --mode "
            f"{mode})"
        )


def check_fits(spec: Manifest, ckpt: Checkpoint) -> None:
    """Refuse a checkpoint that cannot join the artifact's variants, naming the difference."""
    what = f"{ckpt.name!r} vs the artifact"
    if ckpt.layout.architecture != spec.architecture:
        raise IncompatibleModelsError(f"mixed architectures: {what}: {ckpt.layout.architecture} vs {spec.architecture}")
    if ckpt.num_experts != spec.experts_per_layer:
        raise IncompatibleModelsError(f"expert count mismatch: {what}: {ckpt.num_experts} vs {spec.experts_per_layer}")
    if ckpt.moe_layers != [entry.layer for entry in spec.layers]:
        raise IncompatibleModelsError(
            f"MoE layer mismatch: {what}: {len(ckpt.moe_layers)} vs {len(spec.layers)} layers"
        )
    for part in spec.parts:
        if tuple(ckpt.expert_shape(part)) != spec.part_shapes[part]:
            raise IncompatibleModelsError(
                f"shape mismatch: {what}: expert part {part} is {list(ckpt.expert_shape(part))} vs {list(spec.part_shapes[part])}"
            )
    if ckpt.dtype != spec.dtype:
        raise IncompatibleModelsError(f"dtype mismatch: {what}: experts are {ckpt.dtype} vs {spec.dtype}")
    want = {name: _decoded(spec, key) for name, key in spec.models[0].tensors.items()}
    have = {ckpt.layout.canonical_name(n): ckpt.tensors[n] for n in ckpt.non_expert_names}
    for name in sorted(set(want) | set(have), key=natural_key):
        if name not in have or name not in want:
            where = ckpt.name if name not in have else "the artifact"
            raise IncompatibleModelsError(f"tensor mismatch: {what}: {name} is missing from {where}")
        if (have[name].dtype, tuple(have[name].shape)) != want[name]:
            raise IncompatibleModelsError(
                f"shape mismatch: {what}: {name} is {have[name].dtype} {list(have[name].shape)} vs "
                f"{want[name][0]} {list(want[name][1])}"
            )


def _decoded(spec: Manifest, key: str) -> tuple[str, tuple[int, ...]]:
    e = spec.encodings.get(key)
    return (spec.shapes[key].dtype, spec.shapes[key].shape) if e is None else (e.dtype, e.shape)


@dataclass
class _NewVersion:
    key: str
    name: str
    info: TensorInfo
    digest: str
    reference: str | None = None
    blob: TensorInfo | None = None


def add_variant(
    path: str | Path,
    model: str,
    out: str | Path | None = None,
    *,
    force: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    non_expert_codec: str = codec.XOR_ZSTD,
    revision: str | None = None,
    progress: Progress | None = None,
) -> AddResult:
    """Add checkpoint `model` (PATH or NAME=PATH) to the lossless artifact at `path`: in place,
    or as a new artifact at `out` (the old one untouched)."""
    path = Path(path).absolute()
    out = None if out is None else Path(out).absolute()
    art = Artifact.open(path, checksums=False)  # XOR deltas decode exactly even against damaged bytes
    spec = art.spec
    check_lossless(spec, "add")
    if non_expert_codec not in codec.CHOICES:
        raise SettingsError(f"non-expert codec {non_expert_codec!r}: choose one of {', '.join(codec.CHOICES)}")
    ckpt = open_checkpoint(model, revision)
    if ckpt.name in art.model_names:
        raise SettingsError(
            f"{path} already holds a model named {ckpt.name!r}: give another name (NAME=PATH), or remove it first"
        )
    check_config(ckpt)
    check_fits(spec, ckpt)
    if out is not None:
        check_destination(out, force, [path, ckpt.path])
    gen = spec.generation + 1
    result = AddResult(
        path if out is None else out, ckpt.name, gen, {}, len(spec.layers) * spec.experts_per_layer, 0, 0
    )

    layers, new_experts = _plan_bank(art, ckpt, gen, result, progress)
    tensors, versions = _plan_non_experts(art, ckpt, result, progress)
    one = expert_nbytes(ckpt)
    new_bytes = len(new_experts) * one + sum(v.info.nbytes for v in versions)
    check_free_space(out or path / "manifest.json", new_bytes + (1 << 20))

    with changed_artifact(path, out, force, progress) as (target, commit):
        created: list[Path] = []
        try:
            manifest = _write(
                art,
                ckpt,
                target,
                gen,
                layers,
                new_experts,
                tensors,
                versions,
                non_expert_codec,
                shard_size,
                result,
                created,
                progress,
            )
            result.bytes_written = sum(manifest.files[f].size for f in manifest.files if f not in spec.files)
            result.bytes_written += commit(manifest)
        except BaseException:
            if out is None:  # in place: nothing lists these files; take them away again
                for p in created:
                    p.unlink(missing_ok=True)
            raise
    return result


def _plan_bank(
    art: Artifact, ckpt: Checkpoint, gen: int, result: AddResult, progress: Progress | None
) -> tuple[list[LayerEntry], list[tuple[str, int, str]]]:
    """Each layer with the new variant (index len(models)) in it, and the bank entries to
    write: (layer, expert, stored key prefix)."""
    spec = art.spec
    m = len(spec.models)
    used = set(spec.weight_map)
    layers: list[LayerEntry] = []
    new: list[tuple[str, int, str]] = []
    for i, entry in enumerate(spec.layers):
        if progress:
            progress("plan", i, len(spec.layers))
        bank = [replace(b, members=list(b.members)) for b in entry.bank]
        by_digest: dict[str, int] = {}
        for k, b in enumerate(bank):
            digest = b.digest
            if digest is None:
                digest = _bank_digest(art, entry.layer, k)
                bank[k] = replace(b, digest=digest)
                result.bank_hashed += 1
            by_digest.setdefault(digest, k)
        slots = []
        for e in range(spec.experts_per_layer):
            digest = scanned_digest(ckpt, entry.layer, e)
            k = by_digest.get(digest)
            if k is None:
                k = len(bank)
                own = f"bank.{entry.layer}.{k}"
                key = None if not any(f"{own}.{p}" in used for p in spec.parts) else f"bank.g{gen}.{entry.layer}.{k}"
                bank.append(BankEntry([], (m, e), None, digest, key))
                by_digest[digest] = k
                new.append((entry.layer, e, key or own))
                result.new_bank[entry.layer] = result.new_bank.get(entry.layer, 0) + 1
            bank[k].members.append((m, e))
            slots.append(k)
        layers.append(replace(entry, bank=bank, slot_map={**entry.slot_map, ckpt.name: slots}))
    if progress:
        progress("plan", len(spec.layers), len(spec.layers))
    return layers, new


def _bank_digest(art: Artifact, layer: str, k: int) -> str:
    return range_digest({part: art.tensor_info(art.bank_part_key(layer, k, part)) for part in art.parts})


def _plan_non_experts(
    art: Artifact, ckpt: Checkpoint, result: AddResult, progress: Progress | None
) -> tuple[dict[str, str], list[_NewVersion]]:
    """The new variant's name -> stored key (an existing version where bit-identical), and
    the versions to store."""
    spec = art.spec
    stored: dict[str, dict[str, str]] = {}  # name -> digest -> key
    for key in sorted(spec.weight_map):
        if key.rsplit("@", 1)[0] in spec.models[0].tensors and "@" in key:
            stored.setdefault(key.rsplit("@", 1)[0], {})[_version_digest(art, key)] = key
    disk = {ckpt.layout.canonical_name(n): n for n in ckpt.non_expert_names}
    names = sorted(disk, key=natural_key)
    tensors: dict[str, str] = {}
    versions: list[_NewVersion] = []
    for i, name in enumerate(names):
        if progress:
            progress("non-expert", i, len(names))
        info = ckpt.tensors[disk[name]]
        digest = tensor_digest_of(info)
        known = stored.setdefault(name, {})
        if digest not in known:
            taken = {int(k.rsplit("@", 1)[1]) for k in known.values() if k.rsplit("@", 1)[1].isdigit()}
            key = f"{name}@{max(taken, default=-1) + 1}"
            known[digest] = key
            versions.append(_NewVersion(key, name, info, digest))
        tensors[name] = known[digest]
    if progress:
        progress("non-expert", len(names), len(names))
    result.non_expert_new = len(versions)
    return tensors, versions


def _version_digest(art: Artifact, key: str) -> str:
    """A stored non-expert version's digest: the manifest's, else computed from what it decodes to."""
    digest = art.spec.digests.get(key)
    if digest is not None:
        return digest
    dtype, shape = _decoded(art.spec, key)
    return tensor_digest({f"{dtype}{list(shape)}": art.read(key)})


def _reference(spec: Manifest, name: str) -> str | None:
    """The whole stored version of `name` new versions are encoded against: NAME@0, else the
    first whole one (none: stored whole)."""
    whole = [k for k in spec.weight_map if k.rsplit("@", 1)[0] == name and "@" in k and k not in spec.encodings]
    if f"{name}@0" in whole:
        return f"{name}@0"
    return min(whole, key=natural_key, default=None)


def _encode(
    art: Artifact, versions: list[_NewVersion], spill: Path, result: AddResult, progress: Progress | None
) -> None:
    """Encode each new version against its name's whole stored version where that takes at
    most MAX_DELTA_RATIO of its bytes (probing the first elements of large ones first)."""
    with open(spill, "wb") as f:
        for i, v in enumerate(versions):
            if progress:
                progress("encode", i, len(versions))
            ref = _reference(art.spec, v.name)
            if ref is None:
                continue
            ref_info = art.tensor_info(ref)
            n = math.prod(v.info.shape)
            if n > codec.PROBE_ELEMENTS:
                heads = [tensor_head(x, codec.PROBE_ELEMENTS) for x in (v.info, ref_info)]
                if codec.probe(*heads) > MAX_DELTA_RATIO:
                    continue
            blob = codec.encode(read_tensor(v.info), read_tensor(ref_info))
            result.references_read.append(ref)
            if len(blob) > MAX_DELTA_RATIO * v.info.nbytes:
                continue
            start = f.tell()
            f.write(blob)
            v.reference, v.blob = ref, TensorInfo(spill, "U8", (len(blob),), start, start + len(blob))
    if progress:
        progress("encode", len(versions), len(versions))
    result.non_expert_encoded = sum(v.blob is not None for v in versions)


def _write(
    art: Artifact,
    ckpt: Checkpoint,
    target: Path,
    gen: int,
    layers: list[LayerEntry],
    new_experts: list[tuple[str, int, str]],
    tensors: dict[str, str],
    versions: list[_NewVersion],
    non_expert_codec: str,
    shard_size: int,
    result: AddResult,
    created: list[Path],
    progress: Progress | None,
) -> Manifest:
    """Write the new variant's bank entries, non-expert versions and side files into
    `target`; return the manifest that lists them beside the old."""
    spec = art.spec
    files: dict[str, FileRecord] = {}
    weight_map: dict[str, str] = {}
    shapes: dict[str, TensorEntry] = {}
    total = len(new_experts) + len(versions)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("write", done, total)

    specs = [
        TensorSpec(f"{prefix}.{part}", spec.dtype, spec.part_shapes[part])
        for _, _, prefix in new_experts
        for part in spec.parts
    ]
    if specs:
        bank = ShardedWriter(target, generation_prefix("bank", gen), specs, shard_size)
        created += [target / f for f in bank.file_names]
        for layer, e, prefix in new_experts:
            for part in spec.parts:  # read once into memory: hashed (sha256) from there as written
                bank.write(f"{prefix}.{part}", ckpt.expert_part(layer, e, part))
            step()
        files.update(bank.close())
        weight_map.update(bank.weight_map)

    spill = target / SPILL
    created.append(spill)
    if non_expert_codec != codec.NONE:
        _encode(art, versions, spill, result, progress)
    if versions:
        tspecs = [
            TensorSpec(v.key, "U8", v.blob.shape) if v.blob else TensorSpec(v.key, v.info.dtype, tuple(v.info.shape))
            for v in versions
        ]
        writer = ShardedWriter(target, generation_prefix("tensors", gen), tspecs, shard_size)
        created += [target / f for f in writer.file_names]
        for v in versions:
            writer.copy(v.key, v.blob or v.info)
            step()
        files.update(writer.close())
        weight_map.update(writer.weight_map)
        shapes.update({s.name: TensorEntry(s.dtype, tuple(s.shape)) for s in tspecs})
    spill.unlink(missing_ok=True)
    shapes.update({s.name: TensorEntry(s.dtype, tuple(s.shape)) for s in specs})

    side_dir = target / "models" / ckpt.name
    if side_dir.exists():  # left by a removed model or an interrupted add: nothing lists it
        for p in side_dir.iterdir():
            p.unlink()
    side_dir.mkdir(parents=True, exist_ok=True)
    side = []
    for p in ckpt.side_files():
        created.append(side_dir / p.name)
        files[f"models/{ckpt.name}/{p.name}"] = copy_file(p, side_dir / p.name)
        side.append(p.name)

    model = ModelEntry(
        name=ckpt.name,
        source=ckpt.source,
        revision=ckpt.revision,
        layout=ckpt.layout.name,
        config=ckpt.config,
        files=side,
        tensors=tensors,
        source_shards=source_shards(ckpt),
        index=source_index(ckpt),
    )
    digests = dict(spec.digests)
    digests.update({v.key: v.digest for v in versions})
    manifest = replace(
        spec,
        models=[*spec.models, model],
        layers=layers,
        weight_map={**spec.weight_map, **weight_map},
        shapes={**spec.shapes, **shapes},
        files={**spec.files, **{n: FileEntry(r.size, r.sha256) for n, r in sorted(files.items())}},
        encodings={
            **spec.encodings,
            **{
                v.key: Encoding(codec.XOR_ZSTD, v.reference, v.info.dtype, tuple(v.info.shape))
                for v in versions
                if v.blob and v.reference
            },
        },
        digests=digests,
        generation=gen,
    )
    inputs = spec.bytes.get("inputs")
    return replace(manifest, bytes=recount_bytes(manifest, None if inputs is None else inputs + input_bytes([ckpt])))
