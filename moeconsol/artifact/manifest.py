"""manifest.json as a validated type, shared by the writer (merge) and the reader (artifact).

`Manifest.from_json` turns parsed JSON into typed dataclasses or raises `ArtifactError`
naming the first field that is missing or of the wrong type; `to_json` gives back the JSON
of docs/artifact.md. Every path in a manifest is checked here (see `safety`): `files` keys
are relative paths inside the artifact, `weight_map` values and each model's `files` and
`source_shards` keys are plain file names, model names follow `safety.NAME_RULE`. So once a
manifest is parsed, joining any of its paths to a directory stays inside that directory.

Types, paths and the structure of delta entries are checked here; what the tensors the
entries refer to must be (stored, with the dtype and shape a bank part or a delta component
needs; slot maps in range) is `validate.problems`, which every reader goes through and
`verify` lists.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..architectures.layouts import all_layouts
from ..errors import ArtifactError, MoeconsolError
from ..io.quant import FORMATS as QUANT_FORMATS
from ..io.quant import Quantization
from ..io.safetensors_file import ITEMSIZE
from ..io.safety import NAME_RULE, is_regular_file, is_safe_name, relative_path_problem

FORMAT = "moeconsol-artifact"
FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)
"""Format versions this moeconsol reads: 2 added per-slot expert deltas (`LayerEntry.deltas`) and
`encodings` (non-expert tensors stored as lossless deltas); 3 bank entries stored under keys
other than their index's (`BankEntry.key`, after `moeconsol remove`) and quantized experts
(`quantization`, `part_dtypes`, `value_parts`). A manifest is written with the lowest version
that describes it (`Manifest.version`): 3 only when it has either, since a version-2 reader
would read another entry's tensors, or take codes for values, there."""
QUANTIZED_VERSION = 3
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
    digest: str | None = None
    """BLAKE3 of the stored parts (`digest.tensor_digest`), when recorded: what `add` hashes a
    new variant's experts against without reading the bank."""
    key: str | None = None
    """Where the parts are stored: `{key}.{part}` (format version 3); None: `bank.{layer}.{k}`."""
    values: bool = False
    """Stored as `Manifest.value_parts` rather than `parts` (format version 3: beside a
    quantized release, an unquantized fine-tune's own expert)."""


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
class HeldoutVariant:
    """What one variant keeps on its held-back calibration data under the plan written."""

    score: str
    """`retained_gain` (against its base) or `loss_ratio` (its own loss / the consolidated one)."""
    kept: float | None
    """The figure (1.0 = as its own model); null when the loss was not a finite number."""
    loss: float | None
    """Held-back loss of the consolidated variant (nats per token)."""
    own_loss: float
    """Held-back loss of the variant's own model."""
    base_loss: float | None
    """Held-back loss of its base (null: no base known)."""
    tokens: int
    """Held-back tokens scored."""


@dataclass(frozen=True)
class HeldoutCheck:
    """calibrated mode: candidate plans measured on held-back calibration data (optional;
    absent in artifacts of other modes, of `holdout 0`, and of older moeconsol versions)."""

    holdout: float
    """Share of each calibration file held back from planning (the last part)."""
    margin: float
    """The choice rule's margin (`consolidate.choice`)."""
    base: str | None
    """Where the base losses came from: a model of the artifact, a checkpoint, or null."""
    chosen: str
    """The candidate written (`raised` when variants below their base kept more of their own experts)."""
    variants: dict[str, HeldoutVariant]
    candidates: dict[str, dict[str, float | None]]
    """Candidate -> variant -> figure, in the order measured."""
    raised: list[str]
    """Variants below their base under every candidate that were given more of their own experts."""
    seconds: float
    """Wall-clock seconds of the check (building and measuring the candidates)."""


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
    digests: dict[str, str] = field(default_factory=dict)
    """Non-expert stored key -> BLAKE3 of the tensor it holds (decoded: its dtype, shape and
    bytes, as merge hashes them), when recorded."""
    generation: int = 0
    """How many times `add` or `remove` changed the artifact; new files carry it in their names."""

    heldout: HeldoutCheck | None = None
    """calibrated mode: what each variant kept on held-back data (absent: not measured)."""
    quantization: Quantization | None = None
    """How the bank's experts are quantized (format version 3): `parts` are then the stored
    codes and scales of the models' quantized layout (`io.quant`), not values."""
    part_dtypes: dict[str, str] = field(default_factory=dict)
    """Part -> dtype where the parts differ (a quantized release's codes and scales); absent:
    every part is `dtype`."""

    value_parts: dict[str, TensorEntry] = field(default_factory=dict)
    """Beside a quantized release, unquantized fine-tunes: the parts (dtype, shape) of a bank
    entry stored as values (`BankEntry.values`), the canonical parts of their layout."""

    def part_dtype(self, part: str) -> str:
        return self.part_dtypes.get(part, self.dtype)

    def entry_parts(self, entry: BankEntry) -> dict[str, TensorEntry]:
        """What a bank entry stores: each part's dtype and shape."""
        if entry.values:
            return dict(self.value_parts)
        return {p: TensorEntry(self.part_dtype(p), self.part_shapes[p]) for p in self.parts}

    def version(self) -> int:
        """The format version this manifest needs: 3 if a bank entry has a key of its own or
        the bank holds a quantized release's experts."""
        keyed = any(b.key is not None or b.values for entry in self.layers for b in entry.bank)
        return 3 if keyed or self.quantization is not None else 2

    # -- writing ------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.version(),
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
                            **({"digest": b.digest} if b.digest is not None else {}),
                            **({"key": b.key} if b.key is not None else {}),
                            **({"stored": "values"} if b.values else {}),
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
            **({"digests": dict(self.digests)} if self.digests else {}),
            **({"generation": self.generation} if self.generation else {}),
            **({"heldout": heldout_json(self.heldout)} if self.heldout is not None else {}),
            **({"part_dtypes": dict(self.part_dtypes)} if self.part_dtypes else {}),
            **(
                {"value_parts": {p: {"dtype": t.dtype, "shape": list(t.shape)} for p, t in self.value_parts.items()}}
                if self.value_parts
                else {}
            ),
            **(
                {
                    "quantization": {
                        "method": self.quantization.method,
                        "block": None if self.quantization.block is None else list(self.quantization.block),
                    }
                }
                if self.quantization is not None
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
        if version < QUANTIZED_VERSION and any(k in top for k in ("quantization", "part_dtypes", "value_parts")):
            raise r.fail(
                "quantization", f"appeared in format version {QUANTIZED_VERSION}; this manifest says {version}"
            )
        quantization = _quantization(r, top.get("quantization"))
        part_dtypes = {
            p: r.dtype(d, f"part_dtypes.{p}") for p, d in r.obj(top.get("part_dtypes", {}), "part_dtypes").items()
        }
        if part_dtypes and sorted(part_dtypes) != sorted(parts):
            raise r.fail("part_dtypes", f"has parts {sorted(part_dtypes)}, parts says {list(parts)}")
        if quantization is None and any(len(shape) != 2 for shape in part_shapes.values()):
            raise r.fail("part_shapes", "must give each expert part as a 2-D shape")
        value_parts = {
            r.text(p, "value_parts"): _tensor(r, t, f"value_parts[{p!r}]")
            for p, t in r.obj(top.get("value_parts", {}), "value_parts").items()
        }
        if value_parts and quantization is None:
            raise r.fail("value_parts", "appear without quantization (they are an unquantized fine-tune's beside it)")
        models = [_model(r, m, i) for i, m in enumerate(r.array(top["models"], "models"))]
        method = None if quantization is None else quantization.method
        for i, m in enumerate(models):
            x = layouts.get(m.layout)
            if value_parts and x is not None and x.quant is None and x.parts == tuple(value_parts):
                continue  # an unquantized fine-tune beside the release
            if m.layout not in layouts or layouts[m.layout].parts != parts or layouts[m.layout].quant != method:
                stored = f"stored as {method}" if method else "unquantized"
                raise r.fail(
                    f"models[{i}].layout",
                    f"is {m.layout!r}, which does not store {architecture} experts {stored} with parts {list(parts)}",
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
        if not value_parts and any(b.values for entry in layers for b in entry.bank):
            raise r.fail("layers", "hold a bank entry stored as values, but the manifest has no value_parts")
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
        _check_bank_keys(r, layers, version)
        heldout = None if top.get("heldout") is None else _heldout(r, top["heldout"], names)
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
            digests={
                r.text(k, "digests key"): r.text(v, f"digests[{k!r}]")
                for k, v in r.obj(top.get("digests", {}), "digests").items()
            },
            generation=r.integer(top.get("generation", 0), "generation"),
            heldout=heldout,
            quantization=quantization,
            part_dtypes=part_dtypes,
            value_parts=value_parts,
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


def _quantization(r: _Reader, v: object) -> Quantization | None:
    if v is None:
        return None
    d = r.obj(v, "quantization")
    method = r.text(d.get("method"), "quantization.method")
    if method not in QUANT_FORMATS:
        raise r.fail("quantization.method", f"is {method!r}, not one of {', '.join(QUANT_FORMATS)}")
    block = d.get("block")
    if block is None:
        return Quantization(method)
    dims = r.shape(block, "quantization.block")
    if len(dims) != 2 or 0 in dims:
        raise r.fail("quantization.block", "must be [rows, cols], both at least 1")
    return Quantization(method, (dims[0], dims[1]))


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
        digest, key = bd.get("digest"), bd.get("key")
        stored = bd.get("stored")
        if stored not in (None, "values"):
            raise r.fail(f"{fb}.stored", f'is {stored!r}; only "values" may be given')
        bank.append(
            BankEntry(
                members=[r.pair(x, f"{fb}.members") for x in r.array(bd.get("members"), f"{fb}.members")],
                representative=None if rep is None else r.pair(rep, f"{fb}.representative"),
                weights=None
                if weights is None
                else [r.number(w, f"{fb}.weights") for w in r.array(weights, f"{fb}.weights")],
                digest=None if digest is None else r.text(digest, f"{fb}.digest"),
                key=None if key is None else r.text(key, f"{fb}.key"),
                values=stored == "values",
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


def _check_bank_keys(r: _Reader, layers: list[LayerEntry], version: int) -> None:
    """Bank keys of their own only in version 3, and no two entries stored under one key."""
    seen: set[str] = set()
    for i, entry in enumerate(layers):
        for k, b in enumerate(entry.bank):
            if b.key is not None and version < 3:
                raise r.fail(
                    f"layers[{i}].bank[{k}].key", f"appears in a version-{version} manifest (it came with version 3)"
                )
            key = b.key if b.key is not None else f"bank.{entry.layer}.{k}"
            if key in seen:
                raise r.fail(f"layers[{i}].bank[{k}]", f"is stored under {key!r}, as another bank entry is")
            seen.add(key)


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
            problem = FORMATS[x.format].size_problem(x.size, list(part_shapes.values()))
            if problem:
                raise r.fail(f"{f}.size", f"is {x.size!r}: {problem}")
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


def _optional_number(r: _Reader, v: object, field: str) -> float | None:
    return None if v is None else r.number(v, field)


def _heldout(r: _Reader, v: object, names: list[str]) -> HeldoutCheck:
    """`heldout` (optional): every variant named is a model of the artifact."""
    d = r.obj(v, "heldout")
    variants = {}
    for n, x in r.obj(d.get("variants"), "heldout.variants").items():
        f = f"heldout.variants[{n!r}]"
        if n not in names:
            raise r.fail(f, f"names a model the artifact does not hold (its models are {sorted(names)})")
        x = r.obj(x, f)
        tokens = r.integer(x.get("tokens"), f"{f}.tokens")
        if tokens < 0:
            raise r.fail(f"{f}.tokens", "is negative")
        variants[n] = HeldoutVariant(
            score=r.text(x.get("score"), f"{f}.score"),
            kept=_optional_number(r, x.get("kept"), f"{f}.kept"),
            loss=_optional_number(r, x.get("loss"), f"{f}.loss"),
            own_loss=r.number(x.get("own_loss"), f"{f}.own_loss"),
            base_loss=_optional_number(r, x.get("base_loss"), f"{f}.base_loss"),
            tokens=tokens,
        )
    candidates = {
        r.text(c, "heldout.candidates"): {
            r.text(n, f"heldout.candidates[{c!r}]"): _optional_number(r, x, f"heldout.candidates[{c!r}][{n!r}]")
            for n, x in r.obj(figs, f"heldout.candidates[{c!r}]").items()
        }
        for c, figs in r.obj(d.get("candidates"), "heldout.candidates").items()
    }
    base = d.get("base")
    return HeldoutCheck(
        holdout=r.number(d.get("holdout"), "heldout.holdout"),
        margin=r.number(d.get("margin"), "heldout.margin"),
        base=None if base is None else r.text(base, "heldout.base"),
        chosen=r.text(d.get("chosen"), "heldout.chosen"),
        variants=variants,
        candidates=candidates,
        raised=r.strings(d.get("raised", []), "heldout.raised"),
        seconds=r.number(d.get("seconds"), "heldout.seconds"),
    )


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def heldout_json(h: HeldoutCheck) -> dict[str, Any]:
    """The `heldout` field as JSON (non-finite figures as null)."""
    return {
        "holdout": h.holdout,
        "margin": h.margin,
        "base": h.base,
        "chosen": h.chosen,
        "variants": {
            n: {
                "score": x.score,
                "kept": _finite_or_none(x.kept),
                "loss": _finite_or_none(x.loss),
                "own_loss": x.own_loss,
                "base_loss": _finite_or_none(x.base_loss),
                "tokens": x.tokens,
            }
            for n, x in h.variants.items()
        },
        "candidates": {c: {n: _finite_or_none(x) for n, x in f.items()} for c, f in h.candidates.items()},
        "raised": list(h.raised),
        "seconds": h.seconds,
    }
