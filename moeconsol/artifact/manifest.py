"""manifest.json as a validated type, shared by the writer (merge) and the reader (artifact).

`Manifest.from_json` turns parsed JSON into typed dataclasses or raises `ArtifactError`
naming the first field that is missing or of the wrong type; `to_json` gives back the JSON
of docs/artifact.md. Every path in a manifest is checked here (see `safety`): `files` keys
are relative paths inside the artifact, `weight_map` values and each model's `files` and
`source_shards` keys are plain file names, model names follow `safety.NAME_RULE`. So once a
manifest is parsed, joining any of its paths to a directory stays inside that directory.

Only types and paths are checked here; whether the keys refer to each other consistently
(slot maps in range, every referenced tensor stored) is `artifact.check_references`, which
`verify` reports as a list of problems.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..architectures.layouts import all_layouts
from ..errors import ArtifactError, MoeconsolError, SettingsError
from ..io.safetensors_file import ITEMSIZE, torch_dtypes
from ..io.safety import NAME_RULE, is_regular_file, is_safe_name, relative_path_problem

FORMAT = "moeconsol-artifact"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
"""Format versions this moeconsol reads: 2 added per-slot expert deltas (`LayerEntry.deltas`) and
`encodings` (non-expert tensors stored as lossless deltas)."""
MANIFEST = "manifest.json"
XOR_ZSTD = "xor-zstd"
CODECS = (XOR_ZSTD,)
"""Codecs an artifact may name in `encodings` (`nonexpert_codec` implements them)."""
_MAX_MANIFEST = 1 << 30
"""A manifest larger than this (1 GiB) is refused rather than parsed."""


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Encoding:
    """A stored key that holds an encoded tensor (a U8 blob): how to decode it."""

    codec: str
    reference: str
    """The stored key of the whole tensor it was encoded against."""
    dtype: str
    shape: tuple[int, ...]
    """What it decodes to."""


@dataclass(frozen=True)
class SourceShard:
    metadata: dict[str, str]
    tensors: list[str]
    """On-disk tensor names in file order."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str
    revision: str | None
    layout: str
    config: dict[str, Any]
    files: list[str]
    """Side files under models/<name>/ (plain file names)."""
    tensors: dict[str, str]
    """In-memory name -> stored key."""
    source_shards: dict[str, SourceShard]
    index: dict[str, Any] | None


@dataclass(frozen=True)
class BankEntry:
    members: list[tuple[int, int]]
    representative: tuple[int, int] | None
    weights: list[float] | None = None


@dataclass(frozen=True)
class DeltaEntry:
    """A slot served by bank entry `bank` plus a compressed correction (format version 2)."""

    expert: int
    bank: int
    format: str
    """A `deltas.FORMATS` name."""
    size: int | None
    keys: dict[str, dict[str, str]]
    """part -> component -> stored key"""


@dataclass(frozen=True)
class LayerEntry:
    layer: str
    bank: list[BankEntry]
    slot_map: dict[str, list[int]]
    deltas: dict[str, list[DeltaEntry]] = field(default_factory=dict)
    """model name -> its delta slots in this layer (absent: none)"""


@dataclass(frozen=True)
class Manifest:
    moeconsol_version: str
    architecture: str
    parts: tuple[str, ...]
    part_shapes: dict[str, tuple[int, ...]]
    dtype: str
    experts_per_layer: int
    consolidation: dict[str, Any]
    models: list[ModelEntry]
    layers: list[LayerEntry]
    bytes: dict[str, int | None]
    weight_map: dict[str, str]
    shapes: dict[str, TensorEntry]
    files: dict[str, FileEntry]
    encodings: dict[str, Encoding] = field(default_factory=dict)
    """Stored key -> its encoding, for keys stored encoded (absent: stored whole)."""

    # -- writing ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "moeconsol_version": self.moeconsol_version,
            "architecture": self.architecture,
            "parts": list(self.parts),
            "part_shapes": {p: list(s) for p, s in self.part_shapes.items()},
            "dtype": self.dtype,
            "experts_per_layer": self.experts_per_layer,
            "consolidation": self.consolidation,
            "models": [
                {
                    "name": m.name,
                    "source": m.source,
                    "revision": m.revision,
                    "layout": m.layout,
                    "config": m.config,
                    "files": list(m.files),
                    "tensors": dict(m.tensors),
                    "source_shards": {
                        f: {"metadata": s.metadata, "tensors": list(s.tensors)} for f, s in m.source_shards.items()
                    },
                    "index": m.index,
                }
                for m in self.models
            ],
            "layers": [
                {
                    "layer": entry.layer,
                    "bank": [
                        {
                            "members": [list(x) for x in b.members],
                            "representative": None if b.representative is None else list(b.representative),
                            **({"weights": list(b.weights)} if b.weights is not None else {}),
                        }
                        for b in entry.bank
                    ],
                    "slot_map": {n: list(s) for n, s in entry.slot_map.items()},
                    **({"deltas": _deltas_json(entry.deltas)} if entry.deltas else {}),
                }
                for entry in self.layers
            ],
            "bytes": dict(self.bytes),
            "weight_map": dict(self.weight_map),
            "shapes": {k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in self.shapes.items()},
            "files": {k: {"size": f.size, "sha256": f.sha256} for k, f in self.files.items()},
            **(
                {
                    "encodings": {
                        k: {"codec": e.codec, "reference": e.reference, "dtype": e.dtype, "shape": list(e.shape)}
                        for k, e in self.encodings.items()
                    }
                }
                if self.encodings
                else {}
            ),
        }

    def dumps(self) -> str:
        """Strict JSON (NaN and infinities refused: no reader can parse them)."""
        try:
            return json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n"
        except ValueError as e:
            raise MoeconsolError(
                f"the manifest would hold a NaN or infinite number ({e}); check the inputs for NaN weights"
            ) from e

    # -- reading ------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: object, where: str = MANIFEST) -> Manifest:
        """Validate parsed JSON; ArtifactError naming the first bad field."""
        r = _Reader(where)
        top = r.obj(data, "manifest")
        if top.get("format") != FORMAT:
            raise ArtifactError(f"{where}: not a moeconsol artifact manifest")
        version = top.get("format_version")
        if isinstance(version, bool) or version not in READ_VERSIONS:
            raise ArtifactError(
                f"{where}: artifact format version {version!r}; this moeconsol reads versions {', '.join(map(str, READ_VERSIONS))}"
            )
        missing = [k for k in _REQUIRED if k not in top]
        if missing:
            raise ArtifactError(f"{where}: corrupt manifest (missing {', '.join(missing)})")
        parts = tuple(r.strings(top["parts"], "parts"))
        part_shapes = {p: r.shape(s, f"part_shapes.{p}") for p, s in r.obj(top["part_shapes"], "part_shapes").items()}
        if sorted(part_shapes) != sorted(parts):
            raise r.fail("part_shapes", f"has parts {sorted(part_shapes)}, parts says {list(parts)}")
        experts = r.integer(top["experts_per_layer"], "experts_per_layer")
        if experts < 1:
            raise r.fail("experts_per_layer", "must be at least 1")
        architecture = r.text(top["architecture"], "architecture")
        layouts = {x.name: x for x in all_layouts() if x.architecture == architecture}
        if not layouts:
            raise r.fail(
                "architecture",
                f"is {architecture!r}, not one of {', '.join(sorted({x.architecture for x in all_layouts()}))}",
            )
        if any(len(shape) != 2 for shape in part_shapes.values()):
            raise r.fail("part_shapes", "must give each expert part as a 2-D shape")
        models = [_model(r, m, i) for i, m in enumerate(r.array(top["models"], "models"))]
        for i, m in enumerate(models):
            if m.layout not in layouts or layouts[m.layout].parts != parts:
                raise r.fail(
                    f"models[{i}].layout",
                    f"is {m.layout!r}, which does not store {architecture} experts with parts {list(parts)}",
                )
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise r.fail("models", "two models have the same name")
        files = {
            _path(r, k, "files", plain=False): _file(r, v, f"files[{k!r}]")
            for k, v in r.obj(top["files"], "files").items()
        }
        weight_map = {
            r.text(k, "weight_map key"): _path(r, v, f"weight_map[{k!r}]", plain=True)
            for k, v in r.obj(top["weight_map"], "weight_map").items()
        }
        layers = [_layer(r, x, i, names) for i, x in enumerate(r.array(top["layers"], "layers"))]
        for i, entry in enumerate(layers):
            if entry.deltas and version < 2:
                raise r.fail(f"layers[{i}].deltas", "appear in a version-1 manifest (deltas came with version 2)")
            _check_deltas(r, entry, i, part_shapes, experts, weight_map)
        shapes = {
            r.text(k, "shapes key"): _tensor(r, v, f"shapes[{k!r}]") for k, v in r.obj(top["shapes"], "shapes").items()
        }
        if version < 2 and "encodings" in top:
            raise r.fail("encodings", "appeared in format version 2; this manifest says version 1")
        encodings = _encodings(r, top.get("encodings", {}), shapes)
        return cls(
            moeconsol_version=str(top.get("moeconsol_version", "")),
            architecture=architecture,
            parts=parts,
            part_shapes=part_shapes,
            dtype=r.dtype(top["dtype"], "dtype"),
            experts_per_layer=experts,
            consolidation=r.obj(top["consolidation"], "consolidation"),
            models=models,
            layers=layers,
            bytes={k: r.optional_int(v, f"bytes.{k}") for k, v in r.obj(top.get("bytes", {}), "bytes").items()},
            weight_map=weight_map,
            shapes=shapes,
            files=files,
            encodings=encodings,
        )

    @classmethod
    def read(cls, path: Path) -> tuple[Manifest, dict[str, Any]]:
        """Parse and validate `path` (a manifest.json): (typed manifest, the JSON itself)."""

        if not is_regular_file(path):
            raise ArtifactError(f"{path}: not a regular file; expected the manifest written by `moeconsol merge`")
        try:
            if path.stat().st_size > _MAX_MANIFEST:
                raise ArtifactError(f"{path}: corrupt manifest (larger than 1 GiB)")
            data = json.loads(path.read_bytes(), parse_constant=_no_constants)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ArtifactError(f"{path}: corrupt manifest (not valid JSON: {e})") from e
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read the manifest: {e.strerror or e}") from e
        return cls.from_json(data, str(path)), data


_REQUIRED = (
    "architecture",
    "parts",
    "part_shapes",
    "dtype",
    "experts_per_layer",
    "consolidation",
    "models",
    "layers",
    "weight_map",
    "shapes",
    "files",
)


def _no_constants(token: str) -> None:
    raise ValueError(f"{token} is not a JSON number")


class _Reader:
    """Typed access to JSON values; every failure is an ArtifactError naming the field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, what: str) -> ArtifactError:
        return ArtifactError(f"{self.where}: corrupt manifest ({field} {what})")

    def obj(self, v: object, field: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.fail(field, f"is {_kind(v)}, expected an object")
        return v

    def array(self, v: object, field: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.fail(field, f"is {_kind(v)}, expected a list")
        return v

    def text(self, v: object, field: str) -> str:
        if not isinstance(v, str):
            raise self.fail(field, f"is {_kind(v)}, expected a string")
        return v

    def strings(self, v: object, field: str) -> list[str]:
        return [self.text(x, field) for x in self.array(v, field)]

    def integer(self, v: object, field: str) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(field, f"is {_kind(v)}, expected an integer")
        return v

    def optional_int(self, v: object, field: str) -> int | None:
        return None if v is None else self.integer(v, field)

    def number(self, v: object, field: str) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise self.fail(field, f"is {_kind(v)}, expected a finite number")
        return float(v)

    def shape(self, v: object, field: str) -> tuple[int, ...]:
        dims = tuple(self.integer(d, field) for d in self.array(v, field))
        if any(d < 0 for d in dims):
            raise self.fail(field, "has a negative dimension")
        return dims

    def dtype(self, v: object, field: str) -> str:
        if self.text(v, field) not in ITEMSIZE:
            raise self.fail(field, f"is {v!r}, not a safetensors dtype ({', '.join(ITEMSIZE)})")
        return v  # type: ignore[return-value]

    def pair(self, v: object, field: str) -> tuple[int, int]:
        items = self.array(v, field)
        if len(items) != 2:
            raise self.fail(field, "expected [model_index, expert_index]")
        return self.integer(items[0], field), self.integer(items[1], field)


def _kind(v: object) -> str:
    return "null" if v is None else f"a {type(v).__name__}" if not isinstance(v, (str, int, float)) else repr(v)[:40]


def _path(r: _Reader, v: object, field: str, plain: bool) -> str:
    problem = relative_path_problem(v, plain)
    if problem:
        raise ArtifactError(
            f"{r.where}: unsafe path in {field}: {problem}; refusing to read or write outside the directory"
        )
    return v  # type: ignore[return-value]


def _file(r: _Reader, v: object, field: str) -> FileEntry:
    d = r.obj(v, field)
    size, sha = r.integer(d.get("size"), f"{field}.size"), r.text(d.get("sha256"), f"{field}.sha256")
    if size < 0:
        raise r.fail(f"{field}.size", "is negative")
    return FileEntry(size, sha)


def _tensor(r: _Reader, v: object, field: str) -> TensorEntry:
    d = r.obj(v, field)
    return TensorEntry(r.dtype(d.get("dtype"), f"{field}.dtype"), r.shape(d.get("shape"), f"{field}.shape"))


def _encodings(r: _Reader, v: object, shapes: dict[str, TensorEntry]) -> dict[str, Encoding]:
    """`encodings`: each key stored as a U8 blob, decoding against a reference stored whole
    to a tensor of the reference's dtype and shape (so the decoded size is the reference's)."""
    out = {}
    for key, e in r.obj(v, "encodings").items():
        f = f"encodings[{key!r}]"
        d = r.obj(e, f)
        codec = r.text(d.get("codec"), f"{f}.codec")
        if codec not in CODECS:
            raise r.fail(f"{f}.codec", f"is {codec!r}, not one of {', '.join(CODECS)}")
        enc = Encoding(
            codec,
            r.text(d.get("reference"), f"{f}.reference"),
            r.dtype(d.get("dtype"), f"{f}.dtype"),
            r.shape(d.get("shape"), f"{f}.shape"),
        )
        blob, ref = shapes.get(key), shapes.get(enc.reference)
        if blob is None or blob.dtype != "U8" or len(blob.shape) != 1:
            raise r.fail(f, "names a key that is not stored as a U8 [bytes] blob in shapes")
        if ref is None:
            raise r.fail(f"{f}.reference", f"is {enc.reference!r}, which is not stored")
        if enc.reference in r.obj(v, "encodings"):
            raise r.fail(
                f"{f}.reference", f"is {enc.reference!r}, which is itself encoded; a reference must be stored whole"
            )
        if (ref.dtype, ref.shape) != (enc.dtype, enc.shape):
            raise r.fail(f, f"decodes to {enc.dtype} {list(enc.shape)}, its reference is {ref.dtype} {list(ref.shape)}")
        out[key] = enc
    return out


def _model(r: _Reader, v: object, i: int) -> ModelEntry:
    f = f"models[{i}]"
    d = r.obj(v, f)
    name = r.text(d.get("name"), f"{f}.name")
    if not is_safe_name(name):
        raise ArtifactError(f"{r.where}: unsafe model name {name!r} in {f}.name: a name must be {NAME_RULE}")
    layout = r.text(d.get("layout"), f"{f}.layout")
    if layout not in {x.name for x in all_layouts()}:
        raise r.fail(f"{f}.layout", f"is {layout!r}, not one of {', '.join(x.name for x in all_layouts())}")
    shards = {}
    for file, s in r.obj(d.get("source_shards"), f"{f}.source_shards").items():
        _path(r, file, f"{f}.source_shards", plain=True)
        sd = r.obj(s, f"{f}.source_shards[{file!r}]")
        meta = r.obj(sd.get("metadata"), f"{f}.source_shards[{file!r}].metadata")
        for k, val in meta.items():
            r.text(val, f"{f}.source_shards[{file!r}].metadata[{k!r}]")
        shards[file] = SourceShard(meta, r.strings(sd.get("tensors"), f"{f}.source_shards[{file!r}].tensors"))
    index = d.get("index")
    revision = d.get("revision")
    return ModelEntry(
        name=name,
        source=r.text(d.get("source"), f"{f}.source"),
        revision=None if revision is None else r.text(revision, f"{f}.revision"),
        layout=layout,
        config=r.obj(d.get("config"), f"{f}.config"),
        files=[_path(r, x, f"{f}.files", plain=True) for x in r.array(d.get("files"), f"{f}.files")],
        tensors={
            r.text(k, f"{f}.tensors"): r.text(val, f"{f}.tensors[{k!r}]")
            for k, val in r.obj(d.get("tensors"), f"{f}.tensors").items()
        },
        source_shards=shards,
        index=None if index is None else r.obj(index, f"{f}.index"),
    )


def _layer(r: _Reader, v: object, i: int, names: list[str]) -> LayerEntry:
    f = f"layers[{i}]"
    d = r.obj(v, f)
    bank = []
    for k, b in enumerate(r.array(d.get("bank"), f"{f}.bank")):
        fb = f"{f}.bank[{k}]"
        bd = r.obj(b, fb)
        rep = bd.get("representative")
        weights = bd.get("weights")
        bank.append(
            BankEntry(
                members=[r.pair(x, f"{fb}.members") for x in r.array(bd.get("members"), f"{fb}.members")],
                representative=None if rep is None else r.pair(rep, f"{fb}.representative"),
                weights=None
                if weights is None
                else [r.number(w, f"{fb}.weights") for w in r.array(weights, f"{fb}.weights")],
            )
        )
    slots = r.obj(d.get("slot_map"), f"{f}.slot_map")
    if sorted(slots) != sorted(names):
        raise r.fail(f"{f}.slot_map", f"names models {sorted(slots)}, the models are {sorted(names)}")
    deltas = {}
    for n, items in r.obj(d.get("deltas", {}), f"{f}.deltas").items():
        if n not in names:
            raise r.fail(f"{f}.deltas", f"names model {n!r}, the models are {sorted(names)}")
        deltas[n] = [
            _delta(r, x, f"{f}.deltas[{n!r}][{j}]") for j, x in enumerate(r.array(items, f"{f}.deltas[{n!r}]"))
        ]
    return LayerEntry(
        layer=r.text(d.get("layer"), f"{f}.layer"),
        bank=bank,
        slot_map={
            n: [r.integer(x, f"{f}.slot_map[{n!r}]") for x in r.array(s, f"{f}.slot_map[{n!r}]")]
            for n, s in slots.items()
        },
        deltas=deltas,
    )


def _delta(r: _Reader, v: object, f: str) -> DeltaEntry:
    from .corrections import FORMATS  # imports torch: only artifacts with deltas pay for it (inspect)

    d = r.obj(v, f)
    fmt = r.text(d.get("format"), f"{f}.format")
    if fmt not in FORMATS:
        raise r.fail(f"{f}.format", f"is {fmt!r}, not one of {', '.join(FORMATS)}")
    size = r.optional_int(d.get("size"), f"{f}.size")
    if size is not None and size < 1:
        raise r.fail(f"{f}.size", "must be at least 1")
    keys = {
        r.text(p, f"{f}.keys"): {
            r.text(c, f"{f}.keys[{p!r}]"): r.text(k, f"{f}.keys[{p!r}][{c!r}]")
            for c, k in r.obj(comps, f"{f}.keys[{p!r}]").items()
        }
        for p, comps in r.obj(d.get("keys"), f"{f}.keys").items()
    }
    return DeltaEntry(r.integer(d.get("expert"), f"{f}.expert"), r.integer(d.get("bank"), f"{f}.bank"), fmt, size, keys)


def _check_deltas(
    r: _Reader,
    entry: LayerEntry,
    i: int,
    part_shapes: dict[str, tuple[int, ...]],
    experts: int,
    weight_map: dict[str, str],
) -> None:
    """Delta slots in range, pointing where the slot map points, one per expert, a size the
    format takes, every part and component of the format stored."""
    if not entry.deltas:
        return
    from .corrections import FORMATS  # imports torch: only artifacts with deltas pay for it (inspect)

    parts = tuple(part_shapes)
    for name, items in entry.deltas.items():
        seen = set()
        for j, x in enumerate(items):
            f = f"layers[{i}].deltas[{name!r}][{j}]"
            if not 0 <= x.expert < experts:
                raise r.fail(f"{f}.expert", f"is {x.expert}, outside 0..{experts - 1}")
            if x.expert in seen:
                raise r.fail(f"{f}.expert", f"{x.expert} has two deltas")
            seen.add(x.expert)
            if not 0 <= x.bank < len(entry.bank):
                raise r.fail(f"{f}.bank", f"is {x.bank}, outside the layer's bank of {len(entry.bank)}")
            if entry.slot_map[name][x.expert] != x.bank:
                raise r.fail(
                    f"{f}.bank",
                    f"is {x.bank}, but the slot map serves expert {x.expert} by {entry.slot_map[name][x.expert]}",
                )
            if sorted(x.keys) != sorted(parts):
                raise r.fail(f"{f}.keys", f"has parts {sorted(x.keys)}, parts says {list(parts)}")
            try:
                for shape in part_shapes.values():
                    FORMATS[x.format].components(shape, x.size, torch_dtypes()["F32"])
            except SettingsError as e:
                raise r.fail(f"{f}.size", f"is {x.size!r}: {e}") from e
            wanted = FORMATS[x.format].component_names()
            for p, comps in x.keys.items():
                if sorted(comps) != wanted:
                    raise r.fail(
                        f"{f}.keys[{p!r}]", f"has components {sorted(comps)}, format {x.format} stores {wanted}"
                    )
                for c, key in comps.items():
                    if key not in weight_map:
                        raise r.fail(f"{f}.keys[{p!r}][{c!r}]", f"is {key!r}, which weight_map does not store")


def _deltas_json(deltas: dict[str, list[DeltaEntry]]) -> dict[str, list[dict[str, Any]]]:
    return {
        n: [
            {
                "expert": x.expert,
                "bank": x.bank,
                "format": x.format,
                "size": x.size,
                "keys": {p: dict(c) for p, c in x.keys.items()},
            }
            for x in items
        ]
        for n, items in deltas.items()
    }
