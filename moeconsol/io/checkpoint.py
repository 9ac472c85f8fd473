"""Opening fine-tuned MoE checkpoints: resolve, index, check compatibility, read lazily.

A `Checkpoint` is an index over a Hugging Face safetensors checkpoint (one file or shards
with `model.safetensors.index.json`), local or from the hub cache. It reads nothing but
headers until asked; then it reads one tensor (or one expert of a fused tensor) at a time.
Expert tensors are served in the canonical per-part form of `layouts.Layout`, whatever the
on-disk layout.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..architectures.layouts import (
    Layout,
    detect_layout,
    fused_shape,
    layout_by_name,
    part_shape,
    slice_ok,
    split,
    supported,
)
from ..errors import CheckpointError, IncompatibleModelsError, MoeconsolWarning, SettingsError, UnsafePathError
from . import quant
from .adapter import Adapter, adapted_tensors, apply_to_model, is_adapter_dir
from .digest import value_flags
from .safetensors_file import ITEMSIZE, TensorInfo, read_header, read_tensor
from .safety import NAME_RULE, check_relative, is_regular_file, is_safe_name

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files other than weights that make a checkpoint usable: carried into artifacts and exports.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_MODEL_FILES = ("config.json", "generation_config.json")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelRef:
    """A model as given on the command line: `PATH` or `NAME=PATH` (PATH may be a hub id)."""

    name: str
    source: str


def parse_model_ref(arg: str) -> ModelRef:
    """Split `NAME=PATH`; without a name, the directory (or repo) name is used. A name
    becomes a directory inside the artifact, so it must follow `safety.NAME_RULE`."""
    if "=" in arg and not Path(arg).exists():
        name, _, source = arg.partition("=")
        if not name or not source:
            raise SettingsError(f"bad model argument {arg!r}: expected PATH or NAME=PATH")
        if not is_safe_name(name):
            raise UnsafePathError(f"bad model name {name!r} in {arg!r}: a name must be {NAME_RULE}")
    else:
        source = arg
        name = Path(arg.rstrip("/")).name or arg
        if not is_safe_name(name):
            raise UnsafePathError(
                f"{arg}: the directory name {name!r} is not a usable model name (a name must be {NAME_RULE}); give one as NAME=PATH"
            )
    return ModelRef(name, source)


def resolve_checkpoint_dir(source: str, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id resolved through huggingface_hub (offline: cache)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: expected a checkpoint directory, got a file")
        return path
    if not _REPO_ID.match(source) or source.startswith((".", "/", "~")):
        raise CheckpointError(f"{source}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                source,
                revision=revision,
                allow_patterns=["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"],
            )
        )
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{source}: not a local directory and not in the Hugging Face cache "
            "(download it first with `hf download`, or check HF_HOME)"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{source}: cannot resolve on the Hugging Face hub: {first}") from e


def natural_key(name: str) -> tuple:
    """Sort key for tensor and layer names: numbers by value, encoder before decoder."""
    stack = 0 if name.startswith("encoder") else 1 if name.startswith("decoder") else 0
    return (stack, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


_MAX_JSON = 100_000_000
"""config.json and index.json larger than this (100 MB) are refused rather than parsed."""


def read_json_file(path: Path, what: str) -> object:
    """Parse a small JSON file of a checkpoint (config, index); never blocks on a FIFO."""
    if not is_regular_file(path):
        raise CheckpointError(f"{path}: not a regular file; the {what} must be a JSON file")
    try:
        if path.stat().st_size > _MAX_JSON:
            raise CheckpointError(f"{path}: larger than 100 MB; not a {what} file")
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e


def read_index(path: Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json: tensor name -> shard file name.
    Every shard must be a plain file name in the checkpoint directory (no `..`, no `/`)."""
    index = read_json_file(path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: corrupt index (no weight_map object)")
    for tname, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{path}: corrupt index: {tname!r} maps to {shard!r}, not a shard file name")
        check_relative(shard, f"{path}: weight_map[{tname!r}]", plain=True)
    return weight_map


class Checkpoint:
    """Index of one checkpoint; reads tensors on demand.

    With `base`, `path` is a LoRA adapter directory (`adapter.py`) and the checkpoint is the
    base with the adapter merged: the tensors the adapter changes are read from a scratch
    file written when it is opened, every other one from the base's files."""

    def __init__(self, name: str, source: str, path: Path, revision: str | None = None, base: Checkpoint | None = None):
        self.name, self.source, self.path, self.revision = name, source, path, revision
        self.base = base
        self.adapter: Adapter | None = None
        if base is None:
            self.config = self._read_config()
            self.tensors, self.weight_map, self.shard_metadata = self._index()
        else:
            self.adapter = Adapter(path, base.config, base.layout.record)
            self.config = base.config
            self.tensors = adapted_tensors(base, self.adapter, self)
            self.weight_map, self.shard_metadata = base.weight_map, base.shard_metadata
        model_type = self.config.get("model_type")
        self.quantization = quant.read_quantization(self.config, str(path / "config.json"))
        method = self.quantization.method if self.quantization else None
        layout = detect_layout(list(self.tensors), model_type, method)
        if method is None:
            self._refuse_unsaid_quantization(layout, model_type)
        if layout is None:
            how = f" stored as {method}" if method else ""
            raise CheckpointError(
                f"{path}: no MoE expert tensors{how} of a known layout (model_type {model_type!r}); supported: {supported()}"
            )
        self.layout: Layout = layout
        self._experts: dict[tuple[str, int, str], tuple[TensorInfo, int | None, int, int]] = {}
        self._routers: dict[str, str] = {}
        self.expert_tensor_names: list[str] = []
        counts: dict[str, set[int]] = {}
        for tname, info in self.tensors.items():
            if hit := layout.match_expert(tname):
                layer, e, part = hit
                if len(info.shape) != 2:
                    raise CheckpointError(
                        f"{path}: expert tensor {tname} has shape {list(info.shape)}; an expert part must be a 2-D matrix"
                    )
                self._experts[(layer, e, part)] = (info, None, 0, 1)
                counts.setdefault(layer, set()).add(e)
                self.expert_tensor_names.append(tname)
            elif hit := layout.match_fused(tname):
                layer, fused = hit
                parts = layout.fused_parts[fused]
                if not slice_ok(layout.fused_codec, info.shape, len(parts)):
                    raise CheckpointError(
                        f"{path}: fused expert tensor {tname} has shape {list(info.shape)}; expected experts first, "
                        f"then {len(parts)} equal parts ({layout.fused_codec.value})"
                    )
                for e in range(info.shape[0]):
                    for k, part in enumerate(parts):
                        self._experts[(layer, e, part)] = (info, e, k, len(parts))
                    counts.setdefault(layer, set()).add(e)
                self.expert_tensor_names.append(tname)
            elif (layer := layout.match_router(tname)) is not None:
                self._routers[layer] = tname
        self.moe_layers: list[str] = sorted(counts, key=natural_key)
        sizes = {len(v) for v in counts.values()}
        if len(sizes) != 1:
            raise CheckpointError(f"{path}: MoE layers have different expert counts {sorted(sizes)}")
        self.num_experts: int = sizes.pop()
        for layer, experts in counts.items():
            if experts != set(range(self.num_experts)):
                raise CheckpointError(
                    f"{path}: layer {layer} has expert indices {sorted(experts)}, expected 0..{self.num_experts - 1}"
                )
            for e in experts:
                for part in layout.parts:
                    if (layer, e, part) not in self._experts:
                        raise CheckpointError(f"{path}: layer {layer} expert {e} lacks part {part}")
            if layer not in self._routers:
                raise CheckpointError(f"{path}: layer {layer} has experts but no router tensor")
        expert_names = set(self.expert_tensor_names)
        self.non_expert_names: list[str] = [n for n in self.tensors if n not in expert_names]
        self._check_stored()

    def _refuse_unsaid_quantization(self, layout: Layout | None, model_type: str | None) -> None:
        """Expert tensors only a quantized layout names (`_blocks`, `weight_scale_inv`) in a
        checkpoint whose config says nothing of quantization: their codes are no values."""
        for method in quant.FORMATS:
            stored = detect_layout(list(self.tensors), model_type, method)
            if stored is None:
                continue
            for n in self.tensors:
                theirs = stored.match_expert(n) or stored.match_fused(n)
                if theirs and not (layout and (layout.match_expert(n) or layout.match_fused(n))):
                    raise CheckpointError(
                        f"{self.path}: expert tensor {n} is stored as {method} but config.json has no "
                        "quantization_config saying how to read it; add the one it was released with"
                    )

    def _check_stored(self) -> None:
        """Refuse weights whose stored form is not what the config says: quantized codes or
        scales in a checkpoint without a quantization_config (their raw codes are no values),
        or codes and scales that disagree in dtype or shape."""
        q, where = self.quantization, str(self.path)
        if q is None:
            for (layer, e, part), (info, *_) in self._experts.items():
                if info.dtype not in ("F32", "F16", "BF16", "F64"):
                    raise CheckpointError(
                        f"{where}: expert tensor {layer} expert {e} part {part} is {info.dtype} but config.json has no "
                        "quantization_config saying how to read it; add the one it was released with"
                    )
            return
        for layer in self.moe_layers:
            for e in range(self.num_experts):
                infos = self.expert_infos(layer, e)
                for unit, parts in self.units.items():
                    if len(parts) == 1:
                        continue
                    pair = tuple((infos[p].dtype, tuple(infos[p].shape)) for p in parts)
                    if q.method == quant.fp8.NAME:
                        assert q.block is not None
                        quant.fp8.check_pair(f"{layer} expert {e} {parts[0]}", pair[0], pair[1], q.block, where)
                    elif problem := quant.mxfp4.check_pair(pair[0], pair[1]):
                        raise CheckpointError(f"{where}: {layer} expert {e} {unit}: {problem}")
        if q.method == quant.fp8.NAME:
            assert q.block is not None
            for name in self.non_expert_names:
                info = self.tensors[name]
                if info.dtype == quant.fp8.CODE_DTYPE:
                    scale = self.tensors.get(name.removesuffix(quant.fp8.WEIGHT) + quant.fp8.SCALE)
                    if scale is None:
                        raise CheckpointError(f"{where}: {name} is {info.dtype} without its weight_scale_inv")
                    quant.fp8.check_pair(name, (info.dtype, info.shape), (scale.dtype, scale.shape), q.block, where)

    @property
    def units(self) -> dict[str, tuple[str, ...]]:
        """Each unit of an expert (`io.quant`) and the stored parts it is made of; unquantized:
        every part on its own."""
        if self.quantization is None:
            return {p: (p,) for p in self.layout.parts}
        return quant.units(self.quantization, self.layout.parts)

    @property
    def value_layout(self) -> Layout:
        """The layout whose parts are this checkpoint's expert values: its own, or for a
        quantized release the unquantized layout its stored parts dequantize to."""
        return layout_by_name(self.layout.base) if self.layout.base else self.layout

    # -- construction helpers -------------------------------------------------------------
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if is_adapter_dir(self.path):
            raise CheckpointError(
                f"{self.path}: a LoRA adapter; give its base model in the same command (see docs/merge.md)"
            )
        if not cfg.exists():
            if any(self.path.glob("*.safetensors")) or any(self.path.glob("*.bin")):
                raise CheckpointError(f"{self.path}: no config.json; not a Hugging Face checkpoint directory")
            raise CheckpointError(f"{self.path}: not a checkpoint (no config.json, no *.safetensors)")
        config = read_json_file(cfg, "config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg}: a config must be a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise CheckpointError(f"{cfg}: model_type must be a string, got {model_type!r}")
        return config

    def _index(self) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, dict[str, str]]]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            weight_map = read_index(index)
            shards = sorted(set(weight_map.values()))
        elif single.exists():
            shards, weight_map = ["model.safetensors"], None
        else:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise CheckpointError(
                    f"{self.path}: only pickle weights ({', '.join(sorted(pickles))}); moeconsol reads safetensors only, "
                    "never unpickles: convert with transformers' save_pretrained(safe_serialization=True)"
                )
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, dict[str, str]] = {}
        found: dict[str, str] = {}
        for shard in shards:
            shard_path = self.path / shard
            if not shard_path.exists():
                raise CheckpointError(f"{self.path}: shard {shard} named in the index is missing")
            if not is_regular_file(shard_path):
                raise CheckpointError(
                    f"{shard_path}: not a regular file (a FIFO or device?); a shard must be a safetensors file"
                )
            infos, meta = read_header(shard_path)
            metadata[shard] = meta
            for tname, info in infos.items():
                tensors[tname] = info
                found[tname] = shard
        if weight_map is not None:
            for tname, shard in weight_map.items():
                if found.get(tname) != shard:
                    raise CheckpointError(f"{self.path}: index names {tname!r} in {shard} but it is not there")
        return tensors, found, metadata

    # -- reading ----------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """Safetensors dtype name of the expert tensors (e.g. "BF16"; a quantized release's
        codes: "F8_E4M3", "U8")."""
        return self.part_dtype(self.layout.parts[0])

    def part_dtype(self, part: str) -> str:
        """Safetensors dtype of one stored expert part (parts of a quantized release differ)."""
        return self._experts[(self.moe_layers[0], 0, part)][0].dtype

    def value_shape(self, part: str) -> tuple[int, ...]:
        """Shape of one canonical part of the experts' values (`value_layout.parts`)."""
        if self.quantization is None:
            return self.expert_shape(part)
        base = self.value_layout
        shapes = {p: tuple(self.expert_shape(p)) for p in self.layout.parts}
        if not base.fused_parts:
            unit = part
        else:
            unit = next(f for f, ps in base.fused_parts.items() if part in ps)
        shape = quant.unit_shape(self.quantization, shapes, unit, self.units[unit])
        if not base.fused_parts:
            return shape
        return part_shape(base.fused_codec, shape, len(base.fused_parts[unit]))

    def values(self, layer: str, expert: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """One expert's canonical parts of `value_layout` as values: `expert()` itself when the
        checkpoint is not quantized (dtype None keeps the stored one), else dequantized (to
        float32 unless `dtype` says otherwise)."""
        stored = self.expert(layer, expert)
        if self.quantization is None:
            return stored if dtype is None else {p: t.to(dtype) for p, t in stored.items()}
        import torch  # here: a checkpoint is opened without torch; values are tensors

        return quant.values(self.quantization, self.layout.parts, self.value_layout, stored, dtype or torch.float32)

    def expert_shape(self, part: str) -> tuple[int, ...]:
        info, e, k, n = self._experts[(self.moe_layers[0], 0, part)]
        return info.shape if e is None else part_shape(self.layout.fused_codec, info.shape[1:], n)

    def _slice(self, info: TensorInfo, e: int) -> TensorInfo:
        """Expert e's slice of a fused tensor: one contiguous byte range."""
        size = math.prod(info.shape[1:]) * ITEMSIZE[info.dtype]
        start = info.start + e * size
        return TensorInfo(info.file, info.dtype, info.shape[1:], start, start + size)

    def part_info(self, layer: str, expert: int, part: str) -> TensorInfo:
        """Where one canonical expert part lives on disk, for a `layout.contiguous` layout: one
        contiguous byte range (a whole per-expert tensor, or part k of expert e's slice of a
        fused tensor)."""
        info, e, k, n = self._experts[(layer, expert, part)]
        if e is None:
            return info
        if not self.layout.contiguous:
            raise ValueError(f"{self.layout.name}: expert parts are not byte ranges; read them with expert()")
        piece = self._slice(info, e)
        size = (piece.end - piece.start) // n
        shape = part_shape(self.layout.fused_codec, piece.shape, n)
        return TensorInfo(info.file, info.dtype, shape, piece.start + k * size, piece.start + (k + 1) * size)

    def expert_infos(self, layer: str, expert: int) -> dict[str, TensorInfo]:
        """Every canonical part of one expert, as byte ranges (nothing is read)."""
        return {part: self.part_info(layer, expert, part) for part in self.layout.parts}

    def expert_part(self, layer: str, expert: int, part: str) -> torch.Tensor:
        """One canonical 2-D expert matrix, read from disk now."""
        if not self.layout.contiguous:
            return self.expert(layer, expert)[part]
        return read_tensor(self.part_info(layer, expert, part))

    def expert(self, layer: str, expert: int) -> dict[str, torch.Tensor]:
        """All canonical parts of one expert, read from disk now (only their bytes: a
        fused tensor is never read whole)."""
        if self.layout.contiguous:
            return {part: read_tensor(info) for part, info in self.expert_infos(layer, expert).items()}
        out: dict[str, torch.Tensor] = {}
        for part in self.layout.parts:
            if part in out:
                continue
            info, e, _, n = self._experts[(layer, expert, part)]
            fused = next(ps for ps in self.layout.fused_parts.values() if part in ps)
            pieces = split(self.layout.fused_codec, read_tensor(self._slice(info, e)), n)
            out.update({p: t.contiguous() for p, t in zip(fused, pieces)})
        return {part: out[part] for part in self.layout.parts}

    def expert_tensor(self, layer: str, expert: int, part: str) -> TensorInfo:
        """The on-disk tensor that holds a canonical expert part (a per-expert or a fused tensor)."""
        return self._experts[(layer, expert, part)][0]

    def part_view(self, tensor: torch.Tensor, layer: str, expert: int, part: str) -> torch.Tensor:
        """The canonical part (layer, expert, part) as a view into `tensor`, the whole
        on-disk tensor holding it as read (`expert_tensor`): writing the view writes it."""
        _, e, k, n = self._experts[(layer, expert, part)]
        return tensor if e is None else split(self.layout.fused_codec, tensor[e], n)[k]

    def router_name(self, layer: str) -> str:
        return self._routers[layer]

    def read(self, name: str) -> torch.Tensor:
        """Any tensor by its on-disk name."""
        return read_tensor(self.tensors[name])

    def side_files(self) -> list[Path]:
        """config, generation config and tokenizer files present beside the weights (an
        adapter's: the base's, with the tokenizer files saved with the adapter if any)."""
        if self.base is None:
            return [self.path / f for f in SIDE_FILES if (self.path / f).is_file()]
        model = [p for p in self.base.side_files() if p.name in _MODEL_FILES]
        tokenizer = self.tokenizer_dir
        return model + [tokenizer / f for f in SIDE_FILES if f not in _MODEL_FILES and (tokenizer / f).is_file()]

    @property
    def weights_dir(self) -> Path:
        """The directory of the safetensors files `weight_map` names (an adapter's: its base's)."""
        return self.path if self.base is None else self.base.weights_dir

    @property
    def tokenizer_dir(self) -> Path:
        """Where the tokenizer is: beside the weights, or an adapter's own if saved with it."""
        if self.base is None or (self.path / "tokenizer_config.json").is_file():
            return self.path
        return self.base.tokenizer_dir

    def shard_order(self, file: str) -> list[str]:
        """The tensors of one of `weight_map`'s files, in file order (on-disk names)."""
        if self.base is not None:
            return self.base.shard_order(file)
        return sorted((n for n, f in self.weight_map.items() if f == file), key=lambda n: self.tensors[n].start)

    def load_model(self, model_class, **kwargs):
        """The whole transformers model (`model_class.from_pretrained`); an adapter's is its
        base's with the adapter merged, as peft's merge_and_unload makes it."""
        if self.base is None:
            return model_class.from_pretrained(str(self.path), **kwargs)
        model = self.base.load_model(model_class, **kwargs)
        assert self.adapter is not None
        apply_to_model(model, self.adapter)
        return model

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {self.layout.name}, {len(self.moe_layers)} MoE layers x {self.num_experts} experts)"


def expert_nbytes(ckpt: Checkpoint) -> int:
    """Bytes of one expert (all its parts)."""
    return sum(math.prod(ckpt.expert_shape(p)) * ITEMSIZE[ckpt.part_dtype(p)] for p in ckpt.layout.parts)


def open_checkpoint(arg: str, revision: str | None = None) -> Checkpoint:
    ref = parse_model_ref(arg)
    path = resolve_checkpoint_dir(ref.source, revision)
    return Checkpoint(ref.name, ref.source, path, revision)


def open_checkpoints(args: list[str], revision: str | None = None) -> list[Checkpoint]:
    """Open every model, then check they can be consolidated together. A LoRA adapter
    directory is a variant on the base among the models (`adapter_base`)."""
    if not args:
        raise SettingsError("no models given")
    refs = [parse_model_ref(a) for a in args]
    paths = [resolve_checkpoint_dir(r.source, revision) for r in refs]
    full = {
        i: Checkpoint(r.name, r.source, p, revision)
        for i, (r, p) in enumerate(zip(refs, paths))
        if not is_adapter_dir(p)
    }
    ckpts = [
        full[i] if i in full else Checkpoint(r.name, r.source, p, revision, adapter_base(p, list(full.values())))
        for i, (r, p) in enumerate(zip(refs, paths))
    ]
    names = [c.name for c in ckpts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise SettingsError(f"two models are both named {dup!r}: give names with NAME=PATH")
    check_compatible(ckpts)
    return ckpts


def adapter_base(path: Path, models: list[Checkpoint]) -> Checkpoint:
    """The base of the adapter at `path` among the full checkpoints of the command: the one
    its `base_model_name_or_path` names (by NAME, source or directory), else the only one."""
    wanted = Adapter.base_name(path)
    if wanted is not None:
        named = [
            c
            for c in models
            if wanted in (c.name, c.source)
            or (Path(wanted).expanduser().exists() and Path(wanted).resolve() == c.path.resolve())
        ]
        if named:
            return named[0]
    if len(models) == 1:
        return models[0]
    if not models:
        raise SettingsError(f"{path}: a LoRA adapter needs its base model among the models of the command")
    raise SettingsError(
        f"{path}: a LoRA adapter and {len(models)} full checkpoints: its base_model_name_or_path ({wanted!r}) names "
        "none of them; set it to the base's NAME in adapter_config.json"
    )


def check_compatible(ckpts: list[Checkpoint]) -> None:
    """Raise naming the first difference that prevents consolidating these models."""
    ref = ckpts[0]
    ref_tensors = {ref.layout.canonical_name(n): ref.tensors[n].shape for n in ref.non_expert_names}
    for c in ckpts[1:]:
        pair = f"{c.name!r} vs {ref.name!r}"
        if c.layout.architecture != ref.layout.architecture:
            raise IncompatibleModelsError(
                f"mixed architectures: {pair}: {c.layout.architecture} vs {ref.layout.architecture}"
            )
        if c.num_experts != ref.num_experts:
            raise IncompatibleModelsError(f"expert count mismatch: {pair}: {c.num_experts} vs {ref.num_experts}")
        if c.moe_layers != ref.moe_layers:
            raise IncompatibleModelsError(
                f"MoE layer mismatch: {pair}: {len(c.moe_layers)} vs {len(ref.moe_layers)} layers"
            )
        if c.quantization != ref.quantization:
            check_mixed(c, ref, pair)
            plain = next(x for x in ckpts if x.quantization is None)
            _check_parts(c, ref, pair, c.value_layout.parts, Checkpoint.value_shape)
            _check_parts(c, plain, f"{c.name!r} vs {plain.name!r}", c.layout.parts, Checkpoint.expert_shape)
        else:
            _check_parts(c, ref, pair, ref.layout.parts, Checkpoint.expert_shape)
        tensors = {c.layout.canonical_name(n): c.tensors[n].shape for n in c.non_expert_names}
        for name in sorted(set(tensors) | set(ref_tensors), key=natural_key):
            if name not in tensors or name not in ref_tensors:
                where = c.name if name not in tensors else ref.name
                raise IncompatibleModelsError(f"tensor mismatch: {pair}: {name} is missing from {where!r}")
            if tensors[name] != ref_tensors[name]:
                raise IncompatibleModelsError(
                    f"shape mismatch: {pair}: {name} is {list(tensors[name])} vs {list(ref_tensors[name])}"
                )


def _check_parts(c: Checkpoint, ref: Checkpoint, pair: str, parts: tuple[str, ...], shape) -> None:
    """Expert parts of equal shapes (stored, or values: `shape`) and, stored alike, dtypes."""
    for part in parts:
        if shape(c, part) != shape(ref, part):
            raise IncompatibleModelsError(
                f"shape mismatch: {pair}: expert part {part} is {list(shape(c, part))} vs {list(shape(ref, part))}"
            )
    if c.quantization != ref.quantization:
        return
    for part in parts:
        if c.part_dtype(part) != ref.part_dtype(part):
            which = f" (part {part})" if ref.quantization else ""
            raise IncompatibleModelsError(
                f"dtype mismatch: {pair}: experts are {c.part_dtype(part)} vs {ref.part_dtype(part)}{which}"
            )


MIXED_METHODS = ("mxfp4",)
"""Quantization methods whose releases consolidate with unquantized fine-tunes: those whose
non-expert tensors are stored unquantized (gpt-oss), so fine-tunes have the same tensors."""


def check_mixed(c: Checkpoint, ref: Checkpoint, pair: str) -> None:
    """Refuse a mix of storages other than an MXFP4 release first, then unquantized fine-tunes
    of it (their experts shared with the release's where their values are the release's
    dequantized: docs/merge.md)."""
    how = {id(x): x.quantization.method if x.quantization else "unquantized" for x in (c, ref)}
    what = f"mixed storage: {pair}: experts are {how[id(c)]} ({c.layout.name}) vs {how[id(ref)]} ({ref.layout.name})"
    if ref.quantization is None:
        raise IncompatibleModelsError(f"{what}; list the quantized release first, its unquantized fine-tunes after it")
    if c.quantization is not None:
        raise IncompatibleModelsError(f"{what}; consolidate releases quantized the same way")
    if ref.quantization.method not in MIXED_METHODS:
        raise IncompatibleModelsError(
            f"{what}; a {ref.quantization.method} release consolidates with releases quantized the same way only "
            "(its non-expert weights are quantized too): quantize the fine-tune as the release is, or dequantize "
            "the release (see docs/merge.md, quantized releases)"
        )


def check_config(ckpt: Checkpoint) -> None:
    """Refuse a config.json that disagrees with the checkpoint's tensors (layer count, expert
    count, sizes): the model transformers builds from the config, on the meta device (no
    memory), must have exactly the checkpoint's tensors with the same shapes. Otherwise an
    artifact would be written that no runtime can load."""
    import torch
    import transformers

    record = ckpt.layout.record
    config_class, model_class = getattr(transformers, record.config_class), getattr(transformers, record.model_class)
    try:
        config = config_class(
            **{k: v for k, v in ckpt.config.items() if k not in ("architectures", "transformers_version")}
        )
        with torch.device("meta"):
            model = model_class(config)
    except Exception as e:  # transformers raises many kinds of errors for bad config values
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{ckpt.path / 'config.json'}: transformers cannot build a model from it: {first}") from e
    layouts = record.layouts
    have = {ckpt.layout.canonical_name(n): ckpt.tensors[n].shape for n in ckpt.non_expert_names}
    if ckpt.quantization is not None:  # a block FP8 weight's scales are no tensor of the unquantized model
        have = {n: shape for n, shape in have.items() if not n.endswith(quant.fp8.SCALE)}
    groups: dict[int, list[str]] = {}
    problems: list[str] = []
    moe_layers: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        shape = tuple(tensor.shape)
        fused = next((hit for x in layouts if (hit := x.match_fused(name))), None)
        expert = next((hit for x in layouts if (hit := x.match_expert(name))), None)
        if fused is not None:
            layer, kind = fused
            fused_layout = next(x for x in layouts if kind in x.fused_parts)
            parts = fused_layout.fused_parts[kind]
            want = fused_shape(fused_layout.fused_codec, [ckpt.value_shape(p) for p in parts], ckpt.num_experts)
            moe_layers.add(layer)
        elif expert is not None:
            layer, e, part = expert
            want = ckpt.value_shape(part)
            moe_layers.add(layer)
            if e >= ckpt.num_experts:
                problems.append(f"it has {e + 1} or more experts per layer, the weights {ckpt.num_experts}")
        else:
            groups.setdefault(id(tensor), []).append(name)
            if name in have and have[name] != shape:
                problems.append(f"{name} is {list(have[name])} in the weights, {list(shape)} by the config")
            continue
        if want != shape:
            problems.append(f"{name} is {list(want)} in the weights, {list(shape)} by the config")
    if moe_layers != set(ckpt.moe_layers):
        problems.append(f"it has MoE layers {sorted(moe_layers, key=natural_key)}, the weights {ckpt.moe_layers}")
    known = {n for group in groups.values() for n in group}
    problems += [f"it has no tensor {n}" for n in sorted(set(have) - known, key=natural_key)]
    problems += [f"the weights lack {group[0]}" for group in groups.values() if not any(n in have for n in group)]
    if problems:
        raise CheckpointError(
            f"{ckpt.path / 'config.json'} disagrees with the weights: {problems[0]}; fix the config or the weights"
        )


def warn_unusual_values(model: str, layer: str, expert: int, part: str, tensor: torch.Tensor) -> None:
    """Warn (MoeconsolWarning) about an expert part holding NaN or infinite values, or only
    zeros: usable, but almost certainly not what was fine-tuned."""
    warn_unusual(model, layer, expert, part, *value_flags(tensor))


def warn_unusual(model: str, layer: str, expert: int, part: str, finite: bool, nonzero: bool) -> None:
    """`warn_unusual_values` from flags already computed (`digest.value_flags`)."""
    where = f"model {model!r}: {layer} expert {expert} part {part}"
    if not finite:
        warnings.warn(f"{where} holds NaN or infinite values; check the checkpoint", MoeconsolWarning, stacklevel=3)
    elif not nonzero:
        warnings.warn(f"{where} is all zero; check the checkpoint", MoeconsolWarning, stacklevel=3)
