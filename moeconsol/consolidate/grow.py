"""Adding a variant to a lossless artifact without re-merging the others (`moeconsol add`).

Only the new checkpoint is read, once: each of its experts is read into memory and hashed
(BLAKE3, as merge hashes them) against the digests the manifest records for the bank; a
bit-identical bank entry serves it, and a distinct one is kept to be appended to the bank.
Each non-expert tensor likewise, against the stored versions' digests; a new version is
stored as a lossless delta (xor-zstd) against the stored whole version of its name when
that takes at most `nonexpert.MAX_DELTA_RATIO` of its bytes: only then is that version read
from the artifact (`AddResult.references_read` names them; a large one is first probed from
its first elements). An artifact whose manifest records no digests (written before they
were) has the missing ones computed from its own tensors, once.

What is kept is written out, from memory, a file at a time (`_Files`): a file is written
when what it holds reaches `CHUNK_BYTES` (or the shard size, if smaller), so at most that
much is in memory, and no byte of the checkpoint is read twice. The new files
(`bank-gNNNN-k`, `tensors-gNNNN-k`, models/<name>/) and the new manifest are written beside
the old files, which are never rewritten (`artifact.switch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..artifact import nonexpert_codec as codec
from ..artifact.builder import input_bytes, source_index, source_shards
from ..artifact.manifest import BankEntry, Encoding, FileEntry, LayerEntry, Manifest, ModelEntry, TensorEntry
from ..artifact.reader import Artifact, Progress
from ..artifact.switch import changed_artifact, generation_prefix
from ..artifact.validate import bank_part_key
from ..errors import IncompatibleModelsError, SettingsError
from ..io.checkpoint import Checkpoint, check_config, natural_key, open_checkpoint
from ..io.digest import range_digest, tensor_digest
from ..io.safetensors_file import read_tensor
from ..io.writer import SafetensorsWriter, TensorSpec, check_destination, check_free_space, copy_file
from .edit import appended_key, recount_bytes
from .nonexpert import MAX_DELTA_RATIO, tensor_head
from .place import PlacementReport, own_slots, place
from .settings import DEFAULT_SHARD_SIZE, Mode

CHUNK_BYTES = 1 << 30
"""A new file is written when the tensors kept for it reach this (1 GiB; the shard size if
smaller): what `add` holds in memory at most, besides one expert or tensor being read."""


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
    placement: PlacementReport | None = None
    """Threshold and budget artifacts: what every variant keeps, before and after."""

    @property
    def shared_slots(self) -> int:
        return self.slots - sum(self.new_bank.values())


PLACED = (Mode.BUDGET.value, Mode.THRESHOLD.value)
"""Modes whose new variant's experts `add` places against the bank by similarity (`place`)."""


def check_growable(spec: Manifest, budget: str | None, replan: bool) -> None:
    """Refuse what `add` cannot do to this artifact, saying what to do instead."""
    mode = spec.consolidation.get("mode")
    if replan:
        raise SettingsError(
            "--replan (re-planning the other variants' experts with the new one) is not supported: re-merge every "
            f"variant (moeconsol merge ... --mode {mode})"
        )
    if mode not in (Mode.LOSSLESS.value, *PLACED):
        raise SettingsError(
            f"add: this artifact was merged with mode {mode!r}; add works on lossless, threshold and budget artifacts "
            f"(a {mode} bank depends on every variant at once): re-merge with the new variant"
        )
    if budget is not None and mode != Mode.BUDGET.value:
        raise SettingsError(f"--budget applies to budget artifacts; this one was merged with mode {mode!r}")
    if spec.quantization is not None:
        raise SettingsError(
            f"add: this artifact banks a {spec.quantization.method} release's experts as stored, which add does not "
            "extend yet: re-merge with the new variant (moeconsol merge)"
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


def add_variant(
    path: str | Path,
    model: str,
    out: str | Path | None = None,
    *,
    force: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    non_expert_codec: str = codec.XOR_ZSTD,
    revision: str | None = None,
    budget: str | None = None,
    replan: bool = False,
    progress: Progress | None = None,
) -> AddResult:
    """Add checkpoint `model` (PATH or NAME=PATH) to the artifact at `path`: in place, or as a
    new artifact at `out` (the old one untouched). Lossless: bit-identical experts shared.
    Threshold and budget: placed against the bank (`place`; `budget`: the budget with the new
    variant, by default the artifact's)."""
    path = Path(path).absolute()
    out = None if out is None else Path(out).absolute()
    art = Artifact.open(path, checksums=False)  # XOR deltas decode exactly even against damaged bytes
    spec = art.spec
    check_growable(spec, budget, replan)
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
    check_free_space(out or path / "manifest.json", sum(info.nbytes for info in ckpt.tensors.values()) + (1 << 20))

    with changed_artifact(path, out, force, progress) as (target, commit):
        created: list[Path] = []
        try:
            encode = non_expert_codec != codec.NONE
            chunk = min(shard_size, CHUNK_BYTES)
            placed = None
            if spec.consolidation.get("mode") in PLACED:
                placed = place(art, ckpt, budget, progress)
                result.placement = placed[2]
            manifest = _add(art, ckpt, target, gen, encode, chunk, result, created, progress, placed)
            result.bytes_written = sum(manifest.files[f].size for f in manifest.files if f not in spec.files)
            result.bytes_written += commit(manifest)
        except BaseException:
            if out is None:  # in place: nothing lists these files; take them away again
                for p in created:
                    p.unlink(missing_ok=True)
            raise
    return result


class _Files:
    """New tensors kept in memory, written out a safetensors file at a time
    (`{prefix}-{k:05d}.safetensors`) when they reach `limit` bytes, and at `flush`."""

    def __init__(self, target: Path, prefix: str, limit: int, created: list[Path], progress: Progress | None):
        self.target, self.prefix, self.limit, self.created, self.progress = target, prefix, limit, created, progress
        self.items: list[tuple[str, torch.Tensor]] = []
        self.size = 0
        self.files: dict[str, FileEntry] = {}
        self.weight_map: dict[str, str] = {}
        self.shapes: dict[str, TensorEntry] = {}
        self.written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.items.append((name, tensor))
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        name = f"{self.prefix}-{len(self.files) + 1:05d}.safetensors"
        specs = [TensorSpec.of(key, t) for key, t in self.items]
        self.created.append(self.target / name)
        writer = SafetensorsWriter(self.target / name, specs)
        try:
            for key, t in self.items:
                writer.write(key, t)
                self.written += 1
                if self.progress:
                    self.progress("write", self.written, self.written)
            record = writer.close()
        except BaseException:
            writer.abort()
            raise
        self.files[name] = FileEntry(record.size, record.sha256)
        self.weight_map.update({s.name: name for s in specs})
        self.shapes.update({s.name: TensorEntry(s.dtype, tuple(s.shape)) for s in specs})
        self.items, self.size = [], 0


def _add_bank(
    art: Artifact, ckpt: Checkpoint, files: _Files, result: AddResult, progress: Progress | None
) -> list[LayerEntry]:
    """Each layer with the new variant (model index len(models)) in it; its experts no bank
    entry holds go to `files`."""
    spec = art.spec
    m = len(spec.models)
    layers: list[LayerEntry] = []
    for i, entry in enumerate(spec.layers):
        if progress:
            progress("plan", i, len(spec.layers))
        bank = [replace(b, members=list(b.members)) for b in entry.bank]
        by_digest: dict[str, int] = {}
        for k, b in enumerate(bank):
            if b.digest is None:
                bank[k] = replace(b, digest=_bank_digest(art, entry.layer, k))
                result.bank_hashed += 1
            by_digest.setdefault(bank[k].digest, k)
        slots = []
        for e in range(spec.experts_per_layer):
            parts = ckpt.expert(entry.layer, e)  # read once: hashed, and kept if new
            digest = tensor_digest(parts)
            k = by_digest.get(digest)
            if k is None:
                k = by_digest[digest] = len(bank)
                key = appended_key(spec, entry.layer, k)
                bank.append(BankEntry([], (m, e), None, digest, key))
                for part in spec.parts:
                    files.add(bank_part_key(entry.layer, k, key, part), parts[part])
                result.new_bank[entry.layer] = result.new_bank.get(entry.layer, 0) + 1
            bank[k].members.append((m, e))
            slots.append(k)
        layers.append(replace(entry, bank=bank, slot_map={**entry.slot_map, ckpt.name: slots}))
    if progress:
        progress("plan", len(spec.layers), len(spec.layers))
    files.flush()
    return layers


def _bank_digest(art: Artifact, layer: str, k: int) -> str:
    return range_digest({part: art.tensor_info(art.bank_part_key(layer, k, part)) for part in art.parts})


def _add_non_experts(
    art: Artifact, ckpt: Checkpoint, encode: bool, files: _Files, result: AddResult, progress: Progress | None
) -> tuple[dict[str, str], dict[str, Encoding], dict[str, str]]:
    """The new variant's name -> stored key (an existing version where bit-identical); the
    versions it adds go to `files`, encoded where that pays. Returns also their encodings
    and digests."""
    spec = art.spec
    stored: dict[str, dict[str, str]] = {}  # name -> digest -> key
    for key in sorted(spec.weight_map):
        name = key.rsplit("@", 1)[0]
        if "@" in key and name in spec.models[0].tensors:
            stored.setdefault(name, {})[_version_digest(art, key)] = key
    disk = {ckpt.layout.canonical_name(n): n for n in ckpt.non_expert_names}
    names = sorted(disk, key=natural_key)
    tensors: dict[str, str] = {}
    encodings: dict[str, Encoding] = {}
    digests: dict[str, str] = {}
    for i, name in enumerate(names):
        if progress:
            progress("non-expert", i, len(names))
        info = ckpt.tensors[disk[name]]
        tensor = read_tensor(info)  # read once: hashed, and kept if new
        digest = tensor_digest({f"{info.dtype}{list(info.shape)}": tensor})
        known = stored.setdefault(name, {})
        if digest not in known:
            taken = {int(k.rsplit("@", 1)[1]) for k in known.values() if k.rsplit("@", 1)[1].isdigit()}
            key = known[digest] = f"{name}@{max(taken, default=-1) + 1}"
            digests[key] = digest
            blob = _encoded(art, name, tensor, result) if encode else None
            if blob is not None:
                encodings[key] = Encoding(codec.XOR_ZSTD, blob[0], info.dtype, tuple(info.shape))
            files.add(key, tensor if blob is None else blob[1])
            result.non_expert_new += 1
        tensors[name] = known[digest]
    if progress:
        progress("non-expert", len(names), len(names))
    files.flush()
    result.non_expert_encoded = len(encodings)
    return tensors, encodings, digests


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


def _encoded(art: Artifact, name: str, tensor: torch.Tensor, result: AddResult) -> tuple[str, torch.Tensor] | None:
    """(reference, blob as a U8 tensor) when encoding `tensor` against its name's whole
    stored version takes at most MAX_DELTA_RATIO of its bytes; else None. A large tensor is
    probed on its first elements first, so that its reference is read only when it may pay."""
    ref = _reference(art.spec, name)
    if ref is None:
        return None
    ref_info = art.tensor_info(ref)
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.numel() > codec.PROBE_ELEMENTS:
        head = tensor.reshape(-1)[: codec.PROBE_ELEMENTS]
        if codec.probe(head, tensor_head(ref_info, codec.PROBE_ELEMENTS)) > MAX_DELTA_RATIO:
            return None
    blob = codec.encode(tensor, read_tensor(ref_info))
    result.references_read.append(ref)
    if len(blob) > MAX_DELTA_RATIO * nbytes:
        return None
    return ref, torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _add(
    art: Artifact,
    ckpt: Checkpoint,
    target: Path,
    gen: int,
    encode: bool,
    chunk: int,
    result: AddResult,
    created: list[Path],
    progress: Progress | None,
    placed: tuple[list[LayerEntry], list[tuple[str, int, str]], PlacementReport] | None = None,
) -> Manifest:
    """Write the new variant's bank entries, non-expert versions and side files into
    `target`; return the manifest that lists them beside the old. `placed`: the layers and
    new entries `place` chose (else: lossless, `_add_bank`)."""
    spec = art.spec
    bank = _Files(target, generation_prefix("bank", gen), chunk, created, progress)
    if placed is None:
        layers = _add_bank(art, ckpt, bank, result, progress)
    else:
        layers, new, report = placed
        for layer, e, prefix in new:
            parts = ckpt.expert(layer, e)
            for part in spec.parts:
                bank.add(f"{prefix}.{part}", parts[part])
            result.new_bank[layer] = result.new_bank.get(layer, 0) + 1
        bank.flush()
    rest = _Files(target, generation_prefix("tensors", gen), chunk, created, progress)
    rest.written = bank.written
    tensors, encodings, digests = _add_non_experts(art, ckpt, encode, rest, result, progress)

    side_dir = target / "models" / ckpt.name
    if side_dir.exists():  # left by a removed model or an interrupted add: nothing lists it
        for p in side_dir.iterdir():
            p.unlink()
    side_dir.mkdir(parents=True, exist_ok=True)
    side_files: dict[str, FileEntry] = {}
    for p in ckpt.side_files():
        created.append(side_dir / p.name)
        r = copy_file(p, side_dir / p.name)
        side_files[f"models/{ckpt.name}/{p.name}"] = FileEntry(r.size, r.sha256)

    model = ModelEntry(
        name=ckpt.name,
        source=ckpt.source,
        revision=ckpt.revision,
        layout=ckpt.layout.name,
        config=ckpt.config,
        files=[p.name for p in ckpt.side_files()],
        tensors=tensors,
        source_shards=source_shards(ckpt),
        index=source_index(ckpt),
    )
    manifest = replace(
        spec,
        models=[*spec.models, model],
        layers=layers,
        weight_map={**spec.weight_map, **bank.weight_map, **rest.weight_map},
        shapes={**spec.shapes, **bank.shapes, **rest.shapes},
        files={**spec.files, **bank.files, **rest.files, **side_files},
        encodings={**spec.encodings, **encodings},
        digests={**spec.digests, **digests},
        generation=gen,
    )
    if placed is not None:
        report = placed[2]
        report.kept_after = own_slots(manifest)
        if report.budget_experts is not None:
            manifest = replace(
                manifest,
                consolidation={**spec.consolidation, "budget": report.budget, "budget_experts": report.budget_experts},
            )
    inputs = spec.bytes.get("inputs")
    return replace(manifest, bytes=recount_bytes(manifest, None if inputs is None else inputs + input_bytes([ckpt])))
