"""Reading a consolidated artifact, checking it, and exporting a model back out of it.

The format is described in docs/artifact.md. `Artifact.open` reads only manifest.json;
tensors are read one at a time, on demand, from the safetensors files (headers are parsed
once per file and cached). `verify_artifact` checks every file's size and sha256 and every
tensor's dtype and shape. `export_model` writes one model back as a standard Hugging Face
checkpoint with the source's file names, shard contents, metadata and on-disk layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .errors import MoeconsolError
from .layouts import layout_by_name
from .safetensors_io import TensorInfo, read_header, read_tensor
from .writer import SafetensorsWriter, TensorSpec, atomic_directory, copy_file, sha256_file

FORMAT = "moeconsol-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_REQUIRED = ("architecture", "parts", "part_shapes", "dtype", "experts_per_layer", "consolidation", "models", "layers", "weight_map", "shapes", "files")

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as long work advances."""


def bank_key(layer: str, k: int, part: str) -> str:
    """Stored name of part `part` of bank expert `k` of `layer`."""
    return f"bank.{layer}.{k}.{part}"


class Artifact:
    """An opened artifact: its manifest, and tensors read on demand."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.architecture: str = manifest["architecture"]
        self.parts: tuple[str, ...] = tuple(manifest["parts"])
        self.layers: list[str] = [entry["layer"] for entry in manifest["layers"]]
        self.model_names: list[str] = [m["name"] for m in manifest["models"]]
        self.experts_per_layer: int = manifest["experts_per_layer"]
        self._models = {m["name"]: m for m in manifest["models"]}
        self._layers = {entry["layer"]: entry for entry in manifest["layers"]}
        self._headers: dict[str, dict[str, TensorInfo]] = {}

    @classmethod
    def open(cls, path: str | Path) -> Artifact:
        path = Path(path)
        if not path.exists():
            raise MoeconsolError(f"{path}: no such artifact directory")
        if not path.is_dir():
            raise MoeconsolError(f"{path}: not an artifact (expected a directory made by `moeconsol merge`)")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise MoeconsolError(f"{path}: not a moeconsol artifact (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise MoeconsolError(f"{manifest_path}: corrupt manifest (not valid JSON)") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise MoeconsolError(f"{manifest_path}: not a moeconsol artifact manifest")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise MoeconsolError(
                f"{manifest_path}: artifact format version {manifest.get('format_version')!r}; "
                f"this moeconsol reads version {FORMAT_VERSION}"
            )
        missing = [k for k in _REQUIRED if k not in manifest]
        if missing:
            raise MoeconsolError(f"{manifest_path}: corrupt manifest (missing {', '.join(missing)})")
        try:
            return cls(path, manifest)
        except (KeyError, TypeError):
            raise MoeconsolError(f"{manifest_path}: corrupt manifest (malformed models or layers)") from None

    # -- models -----------------------------------------------------------------------------
    def _model(self, name: str) -> dict:
        if name not in self._models:
            raise MoeconsolError(f"no model named {name!r} in {self.path}; it holds: {', '.join(self.model_names)}")
        return self._models[name]

    def model_dir(self, name: str) -> Path:
        """models/<name>/: the model's config.json, generation config and tokenizer files."""
        self._model(name)
        return self.path / "models" / name

    def config(self, name: str) -> dict:
        return self._model(name)["config"]

    def non_expert_keys(self, name: str) -> dict[str, str]:
        """In-memory transformers name -> stored key, for every non-expert tensor of `name`."""
        return dict(self._model(name)["tensors"])

    # -- bank -------------------------------------------------------------------------------
    def _layer(self, layer: str) -> dict:
        if layer not in self._layers:
            raise MoeconsolError(f"no MoE layer {layer!r} in {self.path}")
        return self._layers[layer]

    def slot_map(self, name: str, layer: str) -> list[int]:
        """Expert index -> bank index, for model `name` at `layer`."""
        self._model(name)
        return list(self._layer(layer)["slot_map"][name])

    def bank_size(self, layer: str) -> int:
        return len(self._layer(layer)["bank"])

    def bank_expert(self, layer: str, k: int) -> dict[str, torch.Tensor]:
        """Bank expert `k` of `layer`, as canonical parts (Layout.parts)."""
        if not 0 <= k < self.bank_size(layer):
            raise MoeconsolError(f"{layer}: bank index {k} out of range (bank has {self.bank_size(layer)})")
        return {part: self.read(bank_key(layer, k, part)) for part in self.parts}

    # -- tensors ----------------------------------------------------------------------------
    def tensor_info(self, key: str) -> TensorInfo:
        file = self.manifest["weight_map"].get(key)
        if file is None:
            raise MoeconsolError(f"{self.path}: no stored tensor {key!r}")
        if file not in self._headers:
            self._headers[file] = read_header(self.path / file)[0]
        info = self._headers[file].get(key)
        if info is None:
            raise MoeconsolError(f"{self.path / file}: tensor {key!r} is missing (damaged artifact; run moeconsol verify)")
        return info

    def read(self, key: str) -> torch.Tensor:
        """Any stored tensor by its key (bank or non-expert)."""
        return read_tensor(self.tensor_info(key))

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, {self.architecture}, models={self.model_names})"


def summary(art: Artifact) -> dict:
    """What `inspect` shows: models, bank per layer, bytes, settings."""
    manifest = art.manifest
    b = manifest.get("bytes", {})
    return {
        "path": str(art.path),
        "architecture": art.architecture,
        "dtype": manifest["dtype"],
        "models": [{"name": m["name"], "source": m["source"], "layout": m["layout"]} for m in manifest["models"]],
        "experts_per_layer": art.experts_per_layer,
        "consolidation": manifest["consolidation"],
        "bank": {layer: art.bank_size(layer) for layer in art.layers},
        "bytes": {
            "inputs": b.get("inputs"),
            "artifact": sum(f["size"] for f in manifest["files"].values()) + (art.path / MANIFEST).stat().st_size,
            "experts_in": b.get("experts_in"),
            "bank": b.get("bank"),
        },
        "files": len(manifest["files"]) + 1,
    }


# -- verification -------------------------------------------------------------------------


def check_files(art: Artifact, files: list[str] | None = None, checksums: bool = True, progress: Progress | None = None) -> list[str]:
    """Problems with the artifact's files (all, or those named): missing, wrong size, wrong
    sha256, unreadable safetensors header, tensors missing or of the wrong dtype or shape."""
    listed: dict[str, dict] = art.manifest["files"]
    names = list(listed) if files is None else files
    problems: list[str] = []
    stored: dict[str, list[str]] = {}
    for key, file in art.manifest["weight_map"].items():
        stored.setdefault(file, []).append(key)
    for i, name in enumerate(names):
        if progress:
            progress("verify", i, len(names))
        entry = listed.get(name)
        path = art.path / name
        if entry is None:
            problems.append(f"{name}: not listed in the manifest")
            continue
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name}: size {size} bytes, expected {entry['size']} (truncated or damaged)")
            continue
        if checksums and sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: sha256 mismatch (content damaged)")
            continue
        if name.endswith(".safetensors"):
            problems += _check_tensors(art, name, stored.get(name, []))
    if progress:
        progress("verify", len(names), len(names))
    return problems


def _check_tensors(art: Artifact, file: str, keys: list[str]) -> list[str]:
    try:
        header = read_header(art.path / file)[0]
    except MoeconsolError as e:
        return [str(e)]
    problems = []
    for key in keys:
        want = art.manifest["shapes"].get(key)
        got = header.get(key)
        if got is None:
            problems.append(f"{file}: tensor {key} is missing")
        elif want is None or got.dtype != want["dtype"] or list(got.shape) != want["shape"]:
            problems.append(f"{file}: tensor {key} is {got.dtype} {list(got.shape)}, manifest says {want}")
    return problems


def _check_references(art: Artifact) -> list[str]:
    """Every bank key and model tensor the manifest refers to is stored; slot maps in range."""
    problems = []
    wm = art.manifest["weight_map"]
    part_shapes = art.manifest["part_shapes"]
    for layer in art.layers:
        size = art.bank_size(layer)
        for k in range(size):
            for part in art.parts:
                key = bank_key(layer, k, part)
                if key not in wm:
                    problems.append(f"{layer}: bank expert {k} part {part} is not stored")
                elif art.manifest["shapes"].get(key, {}).get("shape") != part_shapes[part]:
                    problems.append(f"{key}: shape differs from part_shapes[{part}]")
        for name in art.model_names:
            slots = art.slot_map(name, layer)
            if len(slots) != art.experts_per_layer or not all(0 <= s < size for s in slots):
                problems.append(f"{layer}: slot map of {name!r} is out of range")
    for name in art.model_names:
        for tensor, key in art.non_expert_keys(name).items():
            if key not in wm:
                problems.append(f"{name}: tensor {tensor} (stored as {key}) is not stored")
    return problems


def verify_artifact(path: str | Path, progress: Progress | None = None) -> list[str]:
    """Everything wrong with an artifact (empty list: all is well). Raises MoeconsolError
    when `path` is not an artifact at all (missing, no manifest, unreadable manifest)."""
    art = Artifact.open(path)
    return _check_references(art) + check_files(art, progress=progress)


# -- export -------------------------------------------------------------------------------


def _source_specs(art: Artifact, model: dict, tensors: list[str]) -> list[tuple[TensorSpec, Callable[[], Iterator[torch.Tensor]]]]:
    """For each on-disk tensor of one source shard: its spec and a producer of its pieces."""
    layout = layout_by_name(model["layout"])
    keys = model["tensors"]
    part_shapes = art.manifest["part_shapes"]
    dtype = art.manifest["dtype"]
    out = []
    for name in tensors:
        if hit := layout.match_expert(name):
            layer, e, part = hit
            k = art.slot_map(model["name"], layer)[e]
            spec = TensorSpec(name, dtype, tuple(part_shapes[part]))
            out.append((spec, lambda key=bank_key(layer, k, part): iter([art.read(key)])))
        elif hit := layout.match_fused(name):
            layer, fused = hit
            parts = layout.fused_parts[fused]
            rows = sum(part_shapes[p][0] for p in parts)
            spec = TensorSpec(name, dtype, (art.experts_per_layer, rows, part_shapes[parts[0]][1]))
            slots = art.slot_map(model["name"], layer)

            def pieces(layer=layer, parts=parts, slots=slots) -> Iterator[torch.Tensor]:
                for k in slots:
                    for p in parts:
                        yield art.read(bank_key(layer, k, p))

            out.append((spec, pieces))
        else:
            key = keys[layout.canonical_name(name)]
            info = art.manifest["shapes"][key]
            out.append((TensorSpec(name, info["dtype"], tuple(info["shape"])), lambda key=key: iter([art.read(key)])))
    return out


def files_of_model(art: Artifact, name: str) -> list[str]:
    """The artifact files export reads for model `name`."""
    model = art._model(name)
    wm = art.manifest["weight_map"]
    files = {wm[k] for k in model["tensors"].values() if k in wm}
    files |= {wm[bank_key(layer, k, p)] for layer in art.layers for k in set(art.slot_map(name, layer)) for p in art.parts if bank_key(layer, k, p) in wm}
    files |= {f"models/{name}/{f}" for f in model["files"]}
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
    False); the checkpoint is built in a temporary directory and renamed into place.
    """
    art = Artifact.open(path)
    model = art._model(name)
    problems = _check_references(art) + check_files(art, files_of_model(art, name), checksums=checksums)
    if problems:
        raise MoeconsolError(f"{art.path}: damaged artifact: {problems[0]} (run `moeconsol verify` for the full list)")
    out = Path(out)
    shards: dict[str, dict] = model["source_shards"]
    total = sum(len(s["tensors"]) for s in shards.values())
    done = 0
    with atomic_directory(out, force=force) as tmp:
        for file in model["files"]:
            copy_file(art.model_dir(name) / file, tmp / file)
        for file, shard in shards.items():
            planned = _source_specs(art, model, shard["tensors"])
            writer = SafetensorsWriter(tmp / file, [spec for spec, _ in planned], shard["metadata"] or None)
            for spec, produce in planned:
                writer.write(spec.name, produce())
                done += 1
                if progress:
                    progress("export", done, total)
            writer.close()
        if model.get("index") is not None:
            index = dict(model["index"])
            index["weight_map"] = {t: file for file, shard in shards.items() for t in shard["tensors"]}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out
