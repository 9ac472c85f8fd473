"""The manifest of a newly written artifact, from each MoE layer's bank as planned and the
files written (`build_manifest`). Merge calls it last, before it writes manifest.json.

A layer's bank comes in as flat expert indices (`model * E + expert`, as merge plans them)
and goes out as the manifest's (model, expert) pairs, slot maps and delta entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import __version__
from ..io.checkpoint import Checkpoint, expert_nbytes, read_json_file
from ..io.writer import FileRecord, TensorSpec
from .corrections import FORMATS, delta_key
from .manifest import (
    BankEntry,
    DeltaEntry,
    Encoding,
    FileEntry,
    HeldoutCheck,
    LayerEntry,
    Manifest,
    ModelEntry,
    SourceShard,
    TensorEntry,
)


class SlotCorrection(Protocol):
    """A slot (model, expert) whose bank entry is corrected by a delta of `format` at `size`."""

    @property
    def model(self) -> int: ...
    @property
    def expert(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def size(self) -> int | None: ...


class LayerBank(Protocol):
    """One MoE layer's bank as planned (`consolidate.plan.LayerPlan`)."""

    @property
    def layer(self) -> str: ...
    @property
    def clusters(self) -> list[list[int]]: ...
    @property
    def representatives(self) -> list[int | None]: ...
    @property
    def weights(self) -> list[list[float] | None] | None: ...
    @property
    def deltas(self) -> Sequence[SlotCorrection]: ...
    @property
    def digests(self) -> list[str | None]: ...
    def bank_index(self, flat_index: int) -> int: ...


@dataclass
class Written:
    """What merge wrote into the artifact's directory, besides the manifest."""

    files: dict[str, FileRecord]
    """Every file (path relative to the artifact) with its size and sha256."""
    weight_map: dict[str, str]
    """Stored key -> its shard."""
    bank: list[TensorSpec]
    deltas: list[TensorSpec]
    non_experts: list[TensorSpec]
    """As stored: an encoded version is its U8 blob."""
    non_experts_whole: list[TensorSpec]
    """The same keys as they decode."""
    encodings: dict[str, Encoding]
    digests: dict[str, str]
    """Non-expert stored key -> the digest of the tensor it holds (where hashed)."""
    side_files: dict[str, list[str]]
    """Model name -> the side files copied to models/<name>/ (config, tokenizer, ...)."""


def build_manifest(
    ckpts: list[Checkpoint],
    consolidation: dict[str, Any],
    layers: Sequence[LayerBank],
    tensors: list[dict[str, str]],
    written: Written,
    heldout: HeldoutCheck | None = None,
) -> Manifest:
    """The manifest of the artifact merged from `ckpts`: `consolidation` is the record of the
    settings, `layers` each MoE layer's bank, `tensors` each model's in-memory non-expert
    name -> stored key, `heldout` what the held-back check measured (calibrated mode)."""
    ref = ckpts[0]
    E = ref.num_experts
    plain = next((c for c in ckpts if c.quantization is None), None) if ref.quantization else None
    return Manifest(
        moeconsol_version=__version__,
        architecture=ref.layout.architecture,
        parts=tuple(ref.layout.parts),
        part_shapes={p: tuple(ref.expert_shape(p)) for p in ref.layout.parts},
        dtype=ref.dtype,
        quantization=ref.quantization,
        part_dtypes={p: ref.part_dtype(p) for p in ref.layout.parts} if ref.quantization else {},
        value_parts={}
        if plain is None
        else {p: TensorEntry(plain.part_dtype(p), tuple(plain.expert_shape(p))) for p in plain.layout.parts},
        experts_per_layer=E,
        consolidation=consolidation,
        models=[
            ModelEntry(
                name=c.name,
                source=c.source,
                revision=c.revision,
                layout=c.layout.name,
                config=c.config,
                files=written.side_files[c.name],
                tensors=tensors[m],
                source_shards=source_shards(c),
                index=source_index(c),
            )
            for m, c in enumerate(ckpts)
        ],
        layers=[layer_entry(ckpts, p) for p in layers],
        bytes={
            "inputs": input_bytes(ckpts),
            "experts_in": sum(len(layers) * E * expert_nbytes(c) for c in ckpts),
            "bank": sum(expert_nbytes(ref if r is None else ckpts[r // E]) for p in layers for r in p.representatives),
            **({"deltas": sum(x.nbytes for x in written.deltas)} if consolidation.get("deltas") else {}),
            "non_expert": sum(x.nbytes for x in written.non_experts),
            "non_expert_whole": sum(x.nbytes for x in written.non_experts_whole),
        },
        weight_map=written.weight_map,
        shapes={
            x.name: TensorEntry(x.dtype, tuple(x.shape)) for x in written.bank + written.deltas + written.non_experts
        },
        files={name: FileEntry(r.size, r.sha256) for name, r in sorted(written.files.items())},
        encodings=written.encodings,
        digests=written.digests,
        heldout=heldout,
    )


def layer_entry(ckpts: list[Checkpoint], p: LayerBank) -> LayerEntry:
    """A layer's bank entries ((model, expert) members), slot maps and delta slots."""
    E = ckpts[0].num_experts
    return LayerEntry(
        layer=p.layer,
        bank=[
            BankEntry(
                [(i // E, i % E) for i in members],
                None if rep is None else (rep // E, rep % E),
                w,
                digest,
                values=rep is not None and ckpts[rep // E].quantization != ckpts[0].quantization,
            )
            for members, rep, w, digest in zip(
                p.clusters, p.representatives, p.weights or [None] * len(p.clusters), p.digests
            )
        ],
        slot_map={c.name: sm for c, sm in zip(ckpts, slot_maps(p.clusters, len(ckpts), E))},
        deltas=delta_entries(ckpts, p),
    )


def slot_maps(clusters: list[list[int]], num_models: int, num_experts: int) -> list[list[int]]:
    """For each model, expert index -> bank index."""
    maps = [[-1] * num_experts for _ in range(num_models)]
    for k, cluster in enumerate(clusters):
        for i in cluster:
            maps[i // num_experts][i % num_experts] = k
    assert all(k >= 0 for m in maps for k in m)
    return maps


def delta_entries(ckpts: list[Checkpoint], p: LayerBank) -> dict[str, list[DeltaEntry]]:
    """Model name -> its delta slots in the layer, each with the stored keys of its components."""
    E = ckpts[0].num_experts
    parts = ckpts[0].layout.parts
    out: dict[str, list[DeltaEntry]] = {}
    for d in p.deltas:
        name = ckpts[d.model].name
        keys = {
            part: {c: delta_key(p.layer, name, d.expert, part, c) for c in FORMATS[d.format].component_names()}
            for part in parts
        }
        out.setdefault(name, []).append(
            DeltaEntry(d.expert, p.bank_index(d.model * E + d.expert), d.format, d.size, keys)
        )
    return out


def source_shards(ckpt: Checkpoint) -> dict[str, SourceShard]:
    """Each source file: its __metadata__ and its tensors in file order (on-disk names)."""
    out = {}
    for file, meta in ckpt.shard_metadata.items():
        out[file] = SourceShard(meta, ckpt.shard_order(file))
    return out


def source_index(ckpt: Checkpoint) -> dict | None:
    """The source's index file without its weight map (export writes it back), if it has one."""
    index = ckpt.weights_dir / "model.safetensors.index.json"
    if not index.exists():
        return None
    data = read_json_file(index, "index")
    assert isinstance(data, dict)  # Checkpoint._index checked it
    return {k: v for k, v in data.items() if k != "weight_map"}


def input_bytes(ckpts: list[Checkpoint]) -> int:
    """Bytes of the N inputs: their safetensors files and the side files merge carries."""
    total = 0
    for c in ckpts:
        total += sum((c.weights_dir / f).stat().st_size for f in c.shard_metadata)
        total += sum(p.stat().st_size for p in c.side_files())
    return total
