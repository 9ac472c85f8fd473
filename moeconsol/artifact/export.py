"""`export_model`: one variant of an artifact written back as a standard Hugging Face checkpoint,
with the source's file names, shard contents, metadata and on-disk layout (bit-exact for
lossless artifacts)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..architectures.layouts import Layout, fused_shape, join, layout_by_name
from ..errors import ArtifactError, DamagedArtifactError
from ..io.safetensors_file import TensorInfo, torch_dtypes
from ..io.safety import inside
from ..io.writer import SafetensorsWriter, TensorSpec, atomic_directory, copy_file
from .manifest import ModelEntry
from .reader import Artifact, Progress, _slot, check_files

Source = Callable[[], "Iterator[torch.Tensor] | list[TensorInfo] | torch.Tensor"]


def _source_specs(art: Artifact, model: ModelEntry, tensors: list[str]) -> list[tuple[TensorSpec, Source]]:
    """For each on-disk tensor of one source shard: its spec and a producer of its bytes:
    byte ranges of the artifact's files, which the writer copies with the kernel, wherever the
    tensor is stored unchanged or is a concatenation of stored tensors (every layout whose
    parts are contiguous); else the pieces as tensors (gpt-oss's interleaved fused experts),
    or the tensor itself, decoded in memory (a non-expert tensor stored encoded)."""
    layout = layout_by_name(model.layout)
    if layout.quant is None and art.spec.quantization is not None:
        return _values_specs(art, model, layout, tensors)
    part_shapes = art.spec.part_shapes
    out: list[tuple[TensorSpec, Source]] = []
    for name in tensors:
        if hit := layout.match_expert(name):
            layer, e, part = hit
            k = _slot(art, model.name, layer, e)
            spec = TensorSpec(name, art.spec.part_dtype(part), tuple(part_shapes[part]))
            if _has_delta(art, model.name, layer, e):  # bank + delta, computed
                out.append(
                    (spec, lambda layer=layer, e=e, part=part: iter([art.served_part(model.name, layer, e, part)]))
                )
                continue
            out.append((spec, lambda key=art.bank_part_key(layer, k, part): [art.tensor_info(key)]))
        elif hit := layout.match_fused(name):
            layer, fused = hit
            parts = layout.fused_parts[fused]
            shape = fused_shape(layout.fused_codec, [tuple(part_shapes[p]) for p in parts], art.experts_per_layer)
            spec = TensorSpec(name, art.spec.part_dtype(parts[0]), shape)
            slots = art.slot_map(model.name, layer)
            if art.deltas(model.name, layer):  # some experts are bank + delta: computed, one expert at a time

                def served(layer=layer, parts=parts, codec=layout.fused_codec) -> Iterator[torch.Tensor]:
                    for e in range(art.experts_per_layer):
                        yield join(codec, [art.served_part(model.name, layer, e, p) for p in parts])

                out.append((spec, served))
                continue
            if layout.contiguous:  # expert k's slice is its parts' bytes one after the other
                out.append(
                    (
                        spec,
                        lambda layer=layer, parts=parts, slots=slots: [
                            art.tensor_info(art.bank_part_key(layer, k, p)) for k in slots for p in parts
                        ],
                    )
                )
                continue

            def pieces(layer=layer, parts=parts, slots=slots, codec=layout.fused_codec) -> Iterator[torch.Tensor]:
                for k in slots:
                    yield join(codec, [art.read(art.bank_part_key(layer, k, p)) for p in parts])

            out.append((spec, pieces))
        else:
            out.append(_non_expert_spec(art, model, layout, name))
    return out


def _values_specs(
    art: Artifact, model: ModelEntry, layout: Layout, tensors: list[str]
) -> list[tuple[TensorSpec, Source]]:
    """`_source_specs` of an unquantized fine-tune beside a quantized release: each expert is its
    bank entry's values, stored (its own expert: the bytes copied) or dequantized to its dtype
    (the release's expert it left alone, which dequantizes to exactly its bytes)."""
    parts = art.spec.value_parts
    dtype = torch_dtypes()[next(iter(parts.values())).dtype]
    out: list[tuple[TensorSpec, Source]] = []
    for name in tensors:
        if hit := layout.match_expert(name):
            layer, e, part = hit
            k = _slot(art, model.name, layer, e)
            spec = TensorSpec(name, parts[part].dtype, tuple(parts[part].shape))
            if art.stored_as_values(layer, k):
                out.append((spec, lambda key=art.bank_part_key(layer, k, part): [art.tensor_info(key)]))
            else:
                out.append((spec, lambda layer=layer, k=k, part=part: iter([art.bank_values(layer, k, dtype)[part]])))
        elif hit := layout.match_fused(name):
            layer, fused = hit
            names = layout.fused_parts[fused]
            shape = fused_shape(layout.fused_codec, [tuple(parts[p].shape) for p in names], art.experts_per_layer)

            def pieces(layer=layer, names=names, codec=layout.fused_codec) -> Iterator[torch.Tensor]:
                for k in art.slot_map(model.name, layer):
                    values = art.bank_values(layer, k, dtype)
                    yield join(codec, [values[p] for p in names])

            out.append((TensorSpec(name, parts[names[0]].dtype, shape), pieces))
        else:
            out.append(_non_expert_spec(art, model, layout, name))
    return out


def _non_expert_spec(art: Artifact, model: ModelEntry, layout: Layout, name: str) -> tuple[TensorSpec, Source]:
    """A non-expert tensor's spec and source: its stored bytes, or decoded in memory."""
    key = model.tensors.get(layout.canonical_name(name))
    info = art.spec.shapes.get(key) if key is not None else None
    if info is None:
        raise ArtifactError(f"{art.path}: model {model.name!r}: source tensor {name} is not stored in the artifact")
    if (encoding := art.spec.encodings.get(key)) is not None:  # decoded in memory, then written
        return TensorSpec(name, encoding.dtype, tuple(encoding.shape)), lambda key=key: art.read(key)
    return TensorSpec(name, info.dtype, tuple(info.shape)), lambda key=key: [art.tensor_info(key)]


def _has_delta(art: Artifact, name: str, layer: str, e: int) -> bool:
    return any(x.expert == e for x in art.deltas(name, layer))


def files_of_model(art: Artifact, name: str) -> list[str]:
    """The artifact files export reads for model `name`."""
    model = art._model(name)
    wm = art.spec.weight_map
    keys = set(model.tensors.values())
    keys |= {art.spec.encodings[k].reference for k in keys if k in art.spec.encodings}
    files = {wm[k] for k in keys if k in wm}
    files |= {
        wm[art.bank_part_key(layer, k, p)]
        for layer in art.layers
        for k in set(art.slot_map(name, layer))
        if 0 <= k < art.bank_size(layer)
        for p in art.bank_parts(layer, k)
        if art.bank_part_key(layer, k, p) in wm
    }
    files |= {
        wm[k]
        for layer in art.layers
        for x in art.deltas(name, layer)
        for c in x.keys.values()
        for k in c.values()
        if k in wm
    }
    files |= {f"models/{name}/{f}" for f in model.files}
    return sorted(files)


def export_model(
    path: str | Path,
    name: str,
    out: str | Path,
    force: bool = False,
    checksums: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Write model `name` of the artifact at `path` as a Hugging Face checkpoint in `out`.

    The files it reads are checked first (size, header, and sha256 unless `checksums` is
    False); the checkpoint is built in a temporary directory and renamed into place. `out`
    may not be the artifact, lie inside it or contain it, even with `force`.
    """
    art = Artifact.open(path, checksums=checksums)
    model = art._model(name)
    problems = check_files(art, files_of_model(art, name), checksums=checksums)
    if problems:
        raise DamagedArtifactError(
            f"{art.path}: damaged artifact: {problems[0]} (run `moeconsol verify` for the full list)"
        )
    art._checked.update(files_of_model(art, name))
    out = Path(out)
    shards = model.source_shards
    total = sum(len(s.tensors) for s in shards.values())
    done = 0
    with atomic_directory(out, force=force, inputs=[art.path]) as tmp:
        for file in model.files:
            copy_file(inside(art.path, f"models/{name}/{file}", "files"), tmp / file)
        for file, shard in shards.items():
            planned = _source_specs(art, model, shard.tensors)
            writer = SafetensorsWriter(tmp / file, [spec for spec, _ in planned], shard.metadata or None)
            for spec, produce in planned:
                source = produce()
                if isinstance(source, list):
                    writer.copy(spec.name, source)
                else:
                    writer.write(spec.name, source)
                done += 1
                if progress:
                    progress("export", done, total)
            writer.close()
        if model.index is not None:
            index = dict(model.index)
            index["weight_map"] = {t: file for file, shard in shards.items() for t in shard.tensors}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
