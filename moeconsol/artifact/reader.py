"""Reading a consolidated artifact.

The format is described in docs/artifact.md; `manifest.Manifest` is its validated type.
`Artifact.open` reads and validates manifest.json only (types, and every path in it: see
docs/security.md). Tensors are read one at a time, on demand. Before any tensor, slot map or
delta is handed out, the tensors the manifest refers to are validated once (`validate`: bank
parts, slot maps, delta components against their format). The first time a file is read
from, it is checked against its manifest entry: size, sha256 (unless the artifact was opened
with `checksums=False`) and, for safetensors, every tensor's dtype and shape; a damaged file
raises `DamagedArtifactError` before any of its tensors is returned. So serve-local, eval and
export, which read through `Artifact`, never run or write a damaged bank or correction.
`verify.verify_artifact` checks every file and lists every problem; `export.export_model`
writes one model back as a standard Hugging Face checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..architectures.layouts import layout_by_name
from ..errors import ArtifactError, DamagedArtifactError, MoeconsolError, UnknownModelError, UnsafePathError
from ..io import quant
from ..io.safetensors_file import TensorInfo, read_header, read_tensor
from ..io.safety import inside, is_regular_file
from ..io.writer import sha256_file
from . import nonexpert_codec as codec
from .corrections import corrected
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, DeltaEntry, Manifest, ModelEntry
from .overview import open_manifest, summary
from .validate import bank_key, bank_part_key, problems

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "Artifact",
    "bank_key",
    "summary",
]

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as long work advances."""


class Artifact:
    """An opened artifact: its validated manifest, and tensors read on demand, each file
    checked against the manifest the first time it is read."""

    def __init__(self, path: Path, spec: Manifest, manifest: dict | None = None, checksums: bool = True):
        self.path = path
        self.spec = spec
        self.manifest: dict = manifest if manifest is not None else spec.to_json()
        """The manifest as JSON (validated: `spec` is the same, typed)."""
        self.checksums = checksums
        self.architecture: str = spec.architecture
        self.parts: tuple[str, ...] = spec.parts
        self.layers: list[str] = [entry.layer for entry in spec.layers]
        self.model_names: list[str] = [m.name for m in spec.models]
        self.experts_per_layer: int = spec.experts_per_layer
        self._models = {m.name: m for m in spec.models}
        self._layers = {entry.layer: entry for entry in spec.layers}
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        self._checked: set[str] = set()
        self._valid = False

    @classmethod
    def open(cls, path: str | Path, checksums: bool = True) -> Artifact:
        """Open and validate the manifest. `checksums=False`: files are still checked for
        size and headers when first read, but not hashed (`verify` is then the check)."""
        opened = open_manifest(path)
        return cls(opened.path, opened.spec, opened.manifest, checksums)

    # -- models -----------------------------------------------------------------------------
    def _model(self, name: str) -> ModelEntry:
        if name not in self._models:
            raise UnknownModelError(f"no model named {name!r} in {self.path}; it holds: {', '.join(self.model_names)}")
        return self._models[name]

    def model_dir(self, name: str) -> Path:
        """models/<name>/: the model's config.json, generation config and tokenizer files,
        each checked against the manifest (size, sha256) first."""
        model = self._model(name)
        self._check([f"models/{name}/{f}" for f in model.files])
        return self.path / "models" / name

    def config(self, name: str) -> dict:
        return self._model(name).config

    def non_expert_keys(self, name: str) -> dict[str, str]:
        """In-memory transformers name -> stored key, for every non-expert tensor of `name`."""
        model = self._model(name)
        self.validate()
        return dict(model.tensors)

    # -- bank -------------------------------------------------------------------------------
    def _layer(self, layer: str):
        if layer not in self._layers:
            raise ArtifactError(f"no MoE layer {layer!r} in {self.path}")
        return self._layers[layer]

    def slot_map(self, name: str, layer: str) -> list[int]:
        """Expert index -> bank index, for model `name` at `layer`."""
        self._model(name)
        self.validate()
        return list(self._layer(layer).slot_map[name])

    def bank_size(self, layer: str) -> int:
        return len(self._layer(layer).bank)

    def bank_part_key(self, layer: str, k: int, part: str) -> str:
        """The stored key of part `part` of bank entry `k` of `layer`."""
        bank = self._layer(layer).bank
        if not 0 <= k < len(bank):
            raise ArtifactError(f"{layer}: bank index {k} out of range (bank has {len(bank)})")
        return bank_part_key(layer, k, bank[k].key, part)

    def bank_expert(self, layer: str, k: int) -> dict[str, torch.Tensor]:
        """Bank expert `k` of `layer`, as its stored parts (`bank_parts`: Layout.parts, or
        the values of an unquantized fine-tune beside a quantized release)."""
        return {part: self.read(self.bank_part_key(layer, k, part)) for part in self.bank_parts(layer, k)}

    def bank_parts(self, layer: str, k: int) -> tuple[str, ...]:
        """The parts bank expert `k` of `layer` stores (`Manifest.entry_parts`)."""
        if not 0 <= k < self.bank_size(layer):
            raise ArtifactError(f"{layer}: bank index {k} out of range (bank has {self.bank_size(layer)})")
        return tuple(self.spec.entry_parts(self._layer(layer).bank[k]))

    def bank_values(self, layer: str, k: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Bank expert `k` of `layer` as values, the canonical parts of the unquantized layout:
        a quantized release's entry dequantized to `dtype` (`io.quant.values`), any other as
        stored."""
        stored = self.bank_expert(layer, k)
        q = self.spec.quantization
        if q is None or self.stored_as_values(layer, k):
            return stored
        layout = next(x for m in self.spec.models if (x := layout_by_name(m.layout)).quant is not None)
        return quant.values(q, self.parts, layout_by_name(layout.base or ""), stored, dtype)

    def stored_as_values(self, layer: str, k: int) -> bool:
        """Whether bank expert `k` of `layer` holds values beside a quantized release's entries."""
        return self._layer(layer).bank[k].values

    # -- deltas (format version 2) -------------------------------------------------------------
    def deltas(self, name: str, layer: str) -> list[DeltaEntry]:
        """Model `name`'s delta slots in `layer` (empty: every slot is its bank entry as stored)."""
        self._model(name)
        self.validate()
        return list(self._layer(layer).deltas.get(name, []))

    def delta_components(self, entry: DeltaEntry, part: str) -> dict[str, torch.Tensor]:
        """The stored components of one part of a delta."""
        return {c: self.read(key) for c, key in entry.keys[part].items()}

    def served_part(self, name: str, layer: str, e: int, part: str) -> torch.Tensor:
        """What model `name` runs for part `part` of expert `e` of `layer`: its bank entry's,
        corrected by its delta if it has one (`deltas.corrected`)."""
        bank = self.read(self.bank_part_key(layer, _slot(self, name, layer, e), part))
        entry = next((x for x in self.deltas(name, layer) if x.expert == e), None)
        if entry is None:
            return bank
        return corrected(bank, self.delta_components(entry, part), entry.format, entry.size)

    def served_expert(self, name: str, layer: str, e: int) -> dict[str, torch.Tensor]:
        """`served_part` of every canonical part."""
        return {p: self.served_part(name, layer, e, p) for p in self.parts}

    # -- tensors ----------------------------------------------------------------------------
    def tensor_info(self, key: str) -> TensorInfo:
        file = self.spec.weight_map.get(key)
        if file is None:
            raise ArtifactError(f"{self.path}: no stored tensor {key!r}")
        self._check([file])
        return self._headers[file][key]

    def read(self, key: str) -> torch.Tensor:
        """Any stored tensor by its key (bank or non-expert); an encoded one decoded."""
        if key not in self.spec.encodings:
            return read_tensor(self.tensor_info(key))
        blob, reference = self._encoded(key)
        try:
            return self._decode(key, blob, reference)
        except DamagedArtifactError as e:
            raise DamagedArtifactError(
                f"{self.path}: damaged artifact: tensor {key}: {e} (run `moeconsol verify` for the full list)"
            ) from e

    def _encoded(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An encoded key's blob and its reference, read (their files checked first)."""
        return read_tensor(self.tensor_info(key)), read_tensor(self.tensor_info(self.spec.encodings[key].reference))

    def _decode(self, key: str, blob: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        encoding = self.spec.encodings[key]
        return codec.decode(blob, reference, encoding.dtype, encoding.shape)

    def validate(self) -> None:
        """The tensors the manifest refers to, checked once against what they must be
        (`validate.problems`: bank experts, slot maps, delta components by their format, model
        tensors, encodings); DamagedArtifactError naming the first problem. Every accessor that
        hands out tensors, slot maps or deltas calls it first."""
        if self._valid:
            return
        found = problems(self.spec)
        if found:
            raise DamagedArtifactError(
                f"{self.path}: damaged artifact: {found[0]} (run `moeconsol verify` for the full list)"
            )
        self._valid = True

    def _check(self, files: list[str]) -> None:
        """Check files not yet checked (size, sha256 unless disabled, tensors); raise
        DamagedArtifactError naming the first problem."""
        self.validate()
        todo = [f for f in files if f not in self._checked]
        if not todo:
            return
        problems = check_files(self, todo, checksums=self.checksums)
        if problems:
            raise DamagedArtifactError(
                f"{self.path}: damaged artifact: {problems[0]} (run `moeconsol verify` for the full list)"
            )
        self._checked.update(todo)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, {self.architecture}, models={self.model_names})"


# -- verification -------------------------------------------------------------------------


def check_files(
    art: Artifact, files: list[str] | None = None, checksums: bool = True, progress: Progress | None = None
) -> list[str]:
    """Problems with the artifact's files (all, or those named): missing, not a regular
    file, outside the artifact, wrong size, wrong sha256, unreadable safetensors header,
    tensors missing or of the wrong dtype or shape."""
    listed = art.spec.files
    names = list(listed) if files is None else files
    problems: list[str] = []
    stored: dict[str, list[str]] = {}
    for key, file in art.spec.weight_map.items():
        stored.setdefault(file, []).append(key)
    for i, name in enumerate(names):
        if progress:
            progress("verify", i, len(names))
        entry = listed.get(name)
        if entry is None:
            problems.append(f"{name}: not listed in the manifest")
            continue
        try:
            path = inside(art.path, name, "files")
        except UnsafePathError as e:
            problems.append(f"{name}: {e}")
            continue
        if not path.exists():
            problems.append(f"{name}: missing")
            continue
        if not is_regular_file(path):
            problems.append(f"{name}: not a regular file")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{name}: size {size} bytes, expected {entry.size} (truncated or damaged)")
            continue
        if checksums and sha256_file(path) != entry.sha256:
            problems.append(f"{name}: sha256 mismatch (content damaged)")
            continue
        if name.endswith(".safetensors") or name in stored:
            problems += _check_tensors(art, name, stored.get(name, []))
    if progress:
        progress("verify", len(names), len(names))
    return problems


def _check_tensors(art: Artifact, file: str, keys: list[str]) -> list[str]:
    """The file's header against the manifest's `shapes`; a good header is cached for reads."""
    try:
        header = read_header(art.path / file)[0]
    except MoeconsolError as e:
        return [str(e)]
    problems = []
    for key in keys:
        want = art.spec.shapes.get(key)
        got = header.get(key)
        if got is None:
            problems.append(f"{file}: tensor {key} is missing")
        elif want is None or got.dtype != want.dtype or tuple(got.shape) != want.shape:
            expected = "nothing" if want is None else f"{want.dtype} {list(want.shape)}"
            problems.append(f"{file}: tensor {key} is {got.dtype} {list(got.shape)}, manifest says {expected}")
    if not problems:
        art._headers[file] = header
    return problems


def _slot(art: Artifact, name: str, layer: str, e: int) -> int:
    slots = art.slot_map(name, layer)
    if not 0 <= e < len(slots):
        raise ArtifactError(f"{art.path}: model {name!r}: expert {e} of {layer} has no slot")
    return slots[e]
