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
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoeconsolError
from .layouts import Layout, detect_layout
from .safetensors_io import DTYPES, TensorInfo, read_header, read_tensor

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
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelRef:
    """A model as given on the command line: `PATH` or `NAME=PATH` (PATH may be a hub id)."""

    name: str
    source: str


def parse_model_ref(arg: str) -> ModelRef:
    """Split `NAME=PATH`; without a name, the directory (or repo) name is used."""
    if "=" in arg and not Path(arg).exists():
        name, _, source = arg.partition("=")
        if not name or not source:
            raise MoeconsolError(f"bad model argument {arg!r}: expected PATH or NAME=PATH")
    else:
        source = arg
        name = Path(arg.rstrip("/")).name or arg
    return ModelRef(name, source)


def resolve_checkpoint_dir(source: str, revision: str | None = None) -> Path:
    """A local directory, or a hub repo id resolved through huggingface_hub (offline: cache)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MoeconsolError(f"{source}: expected a checkpoint directory, got a file")
        return path
    if not _REPO_ID.match(source) or source.startswith((".", "/", "~")):
        raise MoeconsolError(f"{source}: no such directory")
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
    except LocalEntryNotFoundError:
        raise MoeconsolError(
            f"{source}: not a local directory and not in the Hugging Face cache "
            "(download it first with `hf download`, or check HF_HOME)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeconsolError(f"{source}: cannot resolve on the Hugging Face hub: {first}") from None


def natural_key(name: str) -> tuple:
    """Sort key for tensor and layer names: numbers by value, encoder before decoder."""
    stack = 0 if name.startswith("encoder") else 1 if name.startswith("decoder") else 0
    return (stack, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


class Checkpoint:
    """Index of one checkpoint; reads tensors on demand."""

    def __init__(self, name: str, source: str, path: Path, revision: str | None = None):
        self.name, self.source, self.path, self.revision = name, source, path, revision
        self.config = self._read_config()
        self.tensors, self.weight_map, self.shard_metadata = self._index()
        model_type = self.config.get("model_type")
        layout = detect_layout(list(self.tensors), model_type)
        if layout is None:
            raise MoeconsolError(
                f"{path}: no MoE expert tensors of a known layout (model_type {model_type!r}); "
                "supported: Mixtral (per-expert or fused) and Switch Transformers"
            )
        self.layout: Layout = layout
        self._experts: dict[tuple[str, int, str], tuple[TensorInfo, int | None, int, int]] = {}
        self._routers: dict[str, str] = {}
        self.expert_tensor_names: list[str] = []
        counts: dict[str, set[int]] = {}
        for tname, info in self.tensors.items():
            if hit := layout.match_expert(tname):
                layer, e, part = hit
                self._experts[(layer, e, part)] = (info, None, 0, info.shape[0])
                counts.setdefault(layer, set()).add(e)
                self.expert_tensor_names.append(tname)
            elif hit := layout.match_fused(tname):
                layer, fused = hit
                parts = layout.fused_parts[fused]
                rows = info.shape[1] // len(parts)
                for e in range(info.shape[0]):
                    for k, part in enumerate(parts):
                        self._experts[(layer, e, part)] = (info, e, k * rows, (k + 1) * rows)
                    counts.setdefault(layer, set()).add(e)
                self.expert_tensor_names.append(tname)
            elif (layer := layout.match_router(tname)) is not None:
                self._routers[layer] = tname
        self.moe_layers: list[str] = sorted(counts, key=natural_key)
        sizes = {len(v) for v in counts.values()}
        if len(sizes) != 1:
            raise MoeconsolError(f"{path}: MoE layers have different expert counts {sorted(sizes)}")
        self.num_experts: int = sizes.pop()
        for layer, experts in counts.items():
            if experts != set(range(self.num_experts)):
                raise MoeconsolError(f"{path}: layer {layer} has expert indices {sorted(experts)}, expected 0..{self.num_experts - 1}")
            for e in experts:
                for part in layout.parts:
                    if (layer, e, part) not in self._experts:
                        raise MoeconsolError(f"{path}: layer {layer} expert {e} lacks part {part}")
            if layer not in self._routers:
                raise MoeconsolError(f"{path}: layer {layer} has experts but no router tensor")
        expert_names = set(self.expert_tensor_names)
        self.non_expert_names: list[str] = [n for n in self.tensors if n not in expert_names]

    # -- construction helpers -------------------------------------------------------------
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            if any(self.path.glob("*.safetensors")) or any(self.path.glob("*.bin")):
                raise MoeconsolError(f"{self.path}: no config.json; not a Hugging Face checkpoint directory")
            raise MoeconsolError(f"{self.path}: not a checkpoint (no config.json, no *.safetensors)")
        try:
            return json.loads(cfg.read_text())
        except (ValueError, UnicodeDecodeError):
            raise MoeconsolError(f"{cfg}: not valid JSON") from None

    def _index(self) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, dict[str, str]]]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, AssertionError, UnicodeDecodeError):
                raise MoeconsolError(f"{index}: corrupt index (no weight_map)") from None
            shards = sorted(set(weight_map.values()))
        elif single.exists():
            shards, weight_map = ["model.safetensors"], None
        else:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise MoeconsolError(
                    f"{self.path}: only pickle weights ({', '.join(sorted(pickles))}); moeconsol reads safetensors only, "
                    "never unpickles: convert with transformers' save_pretrained(safe_serialization=True)"
                )
            raise MoeconsolError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, dict[str, str]] = {}
        found: dict[str, str] = {}
        for shard in shards:
            shard_path = self.path / shard
            if not shard_path.exists():
                raise MoeconsolError(f"{self.path}: shard {shard} named in the index is missing")
            infos, meta = read_header(shard_path)
            metadata[shard] = meta
            for tname, info in infos.items():
                tensors[tname] = info
                found[tname] = shard
        if weight_map is not None:
            for tname, shard in weight_map.items():
                if found.get(tname) != shard:
                    raise MoeconsolError(f"{self.path}: index names {tname!r} in {shard} but it is not there")
        return tensors, found, metadata

    # -- reading ----------------------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """Safetensors dtype name of the expert tensors (e.g. "BF16")."""
        return next(iter(self._experts.values()))[0].dtype

    def expert_shape(self, part: str) -> tuple[int, ...]:
        info, e, lo, hi = self._experts[(self.moe_layers[0], 0, part)]
        inner = info.shape if e is None else info.shape[1:]
        return (hi - lo, *inner[1:])

    def part_info(self, layer: str, expert: int, part: str) -> TensorInfo:
        """Where one canonical expert part lives on disk: always one contiguous byte range
        (a whole per-expert tensor, or rows lo:hi of expert `e`'s slice of a fused tensor)."""
        info, e, lo, hi = self._experts[(layer, expert, part)]
        if e is None:
            return info
        row = math.prod(info.shape[2:]) * DTYPES[info.dtype].itemsize
        start = info.start + (e * info.shape[1] + lo) * row
        return TensorInfo(info.file, info.dtype, (hi - lo, *info.shape[2:]), start, start + (hi - lo) * row)

    def expert_infos(self, layer: str, expert: int) -> dict[str, TensorInfo]:
        """Every canonical part of one expert, as byte ranges (nothing is read)."""
        return {part: self.part_info(layer, expert, part) for part in self.layout.parts}

    def expert_part(self, layer: str, expert: int, part: str) -> torch.Tensor:
        """One canonical 2-D expert matrix, read from disk now."""
        return read_tensor(self.part_info(layer, expert, part))

    def expert(self, layer: str, expert: int) -> dict[str, torch.Tensor]:
        """All canonical parts of one expert, read from disk now (only their bytes: a
        fused tensor is never read whole)."""
        return {part: read_tensor(info) for part, info in self.expert_infos(layer, expert).items()}

    def router_name(self, layer: str) -> str:
        return self._routers[layer]

    def read(self, name: str) -> torch.Tensor:
        """Any tensor by its on-disk name."""
        return read_tensor(self.tensors[name])

    def side_files(self) -> list[Path]:
        """config, generation config and tokenizer files present beside the weights."""
        return [self.path / f for f in SIDE_FILES if (self.path / f).is_file()]

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {self.layout.name}, {len(self.moe_layers)} MoE layers x {self.num_experts} experts)"


def open_checkpoint(arg: str, revision: str | None = None) -> Checkpoint:
    ref = parse_model_ref(arg)
    path = resolve_checkpoint_dir(ref.source, revision)
    return Checkpoint(ref.name, ref.source, path, revision)


def open_checkpoints(args: list[str], revision: str | None = None) -> list[Checkpoint]:
    """Open every model, then check they can be consolidated together."""
    if not args:
        raise MoeconsolError("no models given")
    ckpts = [open_checkpoint(a, revision) for a in args]
    names = [c.name for c in ckpts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise MoeconsolError(f"two models are both named {dup!r}: give names with NAME=PATH")
    check_compatible(ckpts)
    return ckpts


def check_compatible(ckpts: list[Checkpoint]) -> None:
    """Raise naming the first difference that prevents consolidating these models."""
    ref = ckpts[0]
    ref_tensors = {ref.layout.canonical_name(n): ref.tensors[n].shape for n in ref.non_expert_names}
    for c in ckpts[1:]:
        pair = f"{c.name!r} vs {ref.name!r}"
        if c.layout.architecture != ref.layout.architecture:
            raise MoeconsolError(f"mixed architectures: {pair}: {c.layout.architecture} vs {ref.layout.architecture}")
        if c.num_experts != ref.num_experts:
            raise MoeconsolError(f"expert count mismatch: {pair}: {c.num_experts} vs {ref.num_experts}")
        if c.moe_layers != ref.moe_layers:
            raise MoeconsolError(f"MoE layer mismatch: {pair}: {len(c.moe_layers)} vs {len(ref.moe_layers)} layers")
        for part in ref.layout.parts:
            if c.expert_shape(part) != ref.expert_shape(part):
                raise MoeconsolError(
                    f"shape mismatch: {pair}: expert part {part} is {list(c.expert_shape(part))} vs {list(ref.expert_shape(part))}"
                )
        if c.dtype != ref.dtype:
            raise MoeconsolError(f"dtype mismatch: {pair}: experts are {c.dtype} vs {ref.dtype}")
        tensors = {c.layout.canonical_name(n): c.tensors[n].shape for n in c.non_expert_names}
        for name in sorted(set(tensors) | set(ref_tensors), key=natural_key):
            if name not in tensors or name not in ref_tensors:
                where = c.name if name not in tensors else ref.name
                raise MoeconsolError(f"tensor mismatch: {pair}: {name} is missing from {where!r}")
            if tensors[name] != ref_tensors[name]:
                raise MoeconsolError(f"shape mismatch: {pair}: {name} is {list(tensors[name])} vs {list(ref_tensors[name])}")
