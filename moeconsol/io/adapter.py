"""LoRA adapters (peft) as variants: the variant is its base plus the adapter, W + s * B @ A.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (never
`adapter_model.bin`: nothing is unpickled). Its tensors are named after the modules of the
model in memory (`base_model.model.<module>.lora_A.weight`): an `nn.Linear` of attention or
of per-expert modules (`target_modules`), or a parameter such as transformers 5's fused expert
tensors `mlp.experts.gate_up_proj` (`target_parameters`, one `ParamWrapper` per parameter,
nested when one module has several). The products are computed as peft's `merge_and_unload`
computes them, operation for operation, so a variant is peft's merged model bit for bit.

`adapted_tensors` merges one base tensor at a time and writes only the tensors the adapter
changes into one scratch safetensors file (header first, then tensor after tensor; memory
holds one tensor and its product). The variant's index is the base's with those entries
pointing into the scratch file, so every reader of byte ranges (digests, the Gram matrix,
copies into the artifact) serves it like any checkpoint, and a tensor the adapter does not
touch is the base's own bytes (an adapter on attention only leaves every expert the base's,
bit for bit). The scratch directory is removed when the variant is.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..architectures.layouts import Architecture, Layout, split
from ..errors import CheckpointError
from .safetensors_file import ITEMSIZE, TensorInfo, read_header, read_tensor
from .safety import is_regular_file

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer"
_MAX_JSON = 10_000_000
# Options that change what a saved adapter means; each must be at its default to be merged here.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (use_dora) is not supported; merge it with peft's merge_and_unload first"),
    "lora_bias": (False, "lora_bias adapters are not supported"),
    "modules_to_save": (None, "adapters with modules_to_save are not supported"),
    "trainable_token_indices": (None, "adapters with trainable_token_indices are not supported"),
    "layer_replication": (None, "adapters with layer_replication are not supported"),
    "alpha_pattern": ({}, "adapters with an alpha_pattern are not supported"),
    "use_qalora": (False, "QA-LoRA adapters are not supported"),
    "use_bdlora": (None, "BD-LoRA adapters are not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
}


def is_adapter_dir(path: Path) -> bool:
    """A peft adapter directory: an adapter_config.json and no model weights beside it."""
    model = ("model.safetensors", "model.safetensors.index.json")
    return (path / CONFIG).is_file() and not any((path / f).exists() for f in model)


@dataclass(frozen=True)
class LoraConfig:
    """What of a peft `LoraConfig` the merge needs."""

    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    target_parameters: tuple[str, ...]
    base_model: str | None

    def scaling(self, r: int) -> float:
        """peft's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / math.sqrt(r) if self.use_rslora else self.lora_alpha / r


def read_config(path: Path) -> LoraConfig:
    """Parse adapter_config.json, refusing what this module does not merge."""
    file = path / CONFIG
    if not is_regular_file(file) or file.stat().st_size > _MAX_JSON:
        raise CheckpointError(f"{file}: not a regular JSON file of at most 10 MB")
    try:
        cfg = json.loads(file.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: an adapter config must be a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: a {cfg.get('peft_type')!r} adapter; only LoRA adapters are supported")
    for key, (default, message) in _UNSUPPORTED.items():
        value = cfg.get(key, default)
        if value not in (default, None, False, {}, []):
            raise CheckpointError(f"{path}: {message}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "eva", "astra")):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} adapters change the base weights; convert it to a plain LoRA "
            "with peft (path_initial_model_for_weight_conversion) first"
        )
    alpha, rslora, fifo = cfg.get("lora_alpha", 8), cfg.get("use_rslora", False), cfg.get("fan_in_fan_out", False)
    params = cfg.get("target_parameters") or []
    base = cfg.get("base_model_name_or_path")
    if (
        not isinstance(alpha, (int, float))
        or isinstance(alpha, bool)
        or not isinstance(rslora, bool)
        or not isinstance(fifo, bool)
        or not isinstance(params, list)
        or not all(isinstance(p, str) for p in params)
        or not (base is None or isinstance(base, str))
    ):
        raise CheckpointError(
            f"{file}: lora_alpha must be a number, use_rslora and fan_in_fan_out booleans, "
            "target_parameters a list of names, base_model_name_or_path a string"
        )
    return LoraConfig(float(alpha), rslora, fifo, tuple(params), base)


@dataclass(frozen=True)
class Target:
    """One parameter of the model in memory that the adapter changes, with its factors."""

    param: str
    """In-memory name (`model.layers.0.self_attn.q_proj.weight`, `...mlp.experts.gate_up_proj`)."""
    a: TensorInfo
    b: TensorInfo
    scaling: float
    experts: int
    """0: a Linear weight (B @ A); E: a 3-D parameter of E experts (peft's ParamWrapper)."""
    transposed: bool
    """Linear: fan_in_fan_out (the weight is stored [in, out]); 3-D: stored [E, in, out]."""
    wrapper: bool
    """A ParamWrapper (target_parameters): its product is cast to the weight's dtype before the add."""


def delta(t: Target, a: torch.Tensor, b: torch.Tensor, expert: int | None = None) -> torch.Tensor:
    """The product peft's `get_delta_weight` gives (same operations, same order) from the
    factors `a`, `b` as stored; of a 3-D parameter, only expert `expert`'s slice if given
    (peft's batched product restricted to that expert: the same values)."""
    import torch

    if t.experts == 0:
        dtype = b.dtype
        low = dtype in (torch.float16, torch.bfloat16)  # peft computes these in float32 on the CPU
        if low:
            a, b = a.float(), b.float()
        out = b @ a
        out = out.T if t.transposed else out
        out.mul_(t.scaling)
        return out.to(dtype) if low else out
    a3 = a.reshape(t.experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, t.experts)
    if expert is not None:
        a3, b3 = a3[expert : expert + 1], b3[:, :, expert : expert + 1]
    out = torch.einsum("o r e, e r i -> e i o" if t.transposed else "o r e, e r i -> e o i", b3, a3)
    out.mul_(t.scaling)
    return out if expert is None else out[0]


def add_into(weight: torch.Tensor, d: torch.Tensor, wrapper: bool) -> None:
    """`weight += d` as peft's merge does it (a ParamWrapper casts d to the weight's dtype first)."""
    weight += d.to(weight.dtype) if wrapper else d


class Adapter:
    """An adapter directory, read (config and header only) and resolved against the modules of
    its base (config.json as a dict, and its architecture): `targets` by in-memory parameter name."""

    def __init__(self, path: Path, base_config: dict, record: Architecture):
        self.path = path
        self.config = read_config(path)
        weights = path / WEIGHTS
        if not weights.exists():
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
            if found:
                raise CheckpointError(
                    f"{path}: only pickle weights ({', '.join(found)}); moeconsol reads safetensors only, never "
                    "unpickles: save the adapter with save_pretrained(safe_serialization=True)"
                )
            raise CheckpointError(f"{path}: no {WEIGHTS}")
        self.factors, _ = read_header(weights)
        self.targets = _resolve(path, self.config, self.factors, _meta_model(base_config, record))

    @staticmethod
    def base_name(path: Path) -> str | None:
        """The adapter's `base_model_name_or_path`, as peft saved it."""
        return read_config(path).base_model


def _meta_model(base_config: dict, record: Architecture):
    """The base's transformers model on the meta device (no memory): its modules and parameters."""
    import torch

    config_class, model_class = record.transformers_classes()
    config = config_class(
        **{k: v for k, v in base_config.items() if k not in ("architectures", "transformers_version")}
    )
    with torch.device("meta"):
        return model_class(config)


def _resolve(path: Path, cfg: LoraConfig, factors: dict[str, TensorInfo], model) -> dict[str, Target]:
    """Each lora_A/lora_B pair -> the in-memory parameter of `model` it changes (peft's nesting
    of ParamWrappers: the first of a module's targeted parameters is the innermost wrapper)."""
    import torch

    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for key, info in factors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise CheckpointError(
                f"{path}: adapter tensor {key!r} is not a LoRA factor (lora_A/lora_B); only plain LoRA is supported"
            )
        pairs.setdefault(m[1], {})[m[2]] = info
    targets: dict[str, Target] = {}
    for wrapped, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: {wrapped} has lora_{next(iter(ab))} without its pair")
        a, b = ab["A"], ab["B"]
        depth = wrapped.count(_BASE_LAYER)
        name = wrapped.replace(_BASE_LAYER, "")
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{path}: the adapter names module {name}, which the base model does not have")
        chosen = [p for p, _ in module.named_parameters(recurse=False) if _targeted(f"{name}.{p}", cfg)]
        if chosen:
            if depth >= len(chosen):
                raise CheckpointError(f"{path}: {wrapped}: more wrappers than targeted parameters of {name}")
            pname = chosen[len(chosen) - 1 - depth]
            shape = tuple(getattr(module, pname).shape)
            experts = shape[0] if len(shape) == 3 else 0
            transposed = bool(getattr(module, "is_transposed", False)) if experts else False
            wrapper = True
        elif isinstance(module, torch.nn.Linear) and depth == 0:
            pname, shape, experts, transposed, wrapper = (
                "weight",
                tuple(module.weight.shape),
                0,
                cfg.fan_in_fan_out,
                False,
            )
        else:
            raise CheckpointError(
                f"{path}: {name} is a {type(module).__name__}; LoRA is merged here on Linear modules and on "
                "parameters named in target_parameters"
            )
        _check_factors(path, name, a, b, shape, experts, transposed)
        r = a.shape[0] // max(experts, 1)
        targets[f"{name}.{pname}"] = Target(f"{name}.{pname}", a, b, cfg.scaling(r), experts, transposed, wrapper)
    if not targets:
        raise CheckpointError(f"{path}: the adapter has no LoRA factors")
    return targets


def _targeted(key: str, cfg: LoraConfig) -> bool:
    return any(key == t or key.endswith(f".{t}") for t in cfg.target_parameters)


def _check_factors(
    path: Path, name: str, a: TensorInfo, b: TensorInfo, shape: tuple, experts: int, transposed: bool
) -> None:
    if experts:
        out, inp = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
        rows = a.shape[0] if len(a.shape) == 2 else -1
        ok = len(b.shape) == 2 and rows > 0 and rows % experts == 0 and b.shape[1] == rows
    else:
        out, inp = (shape[1], shape[0]) if transposed else shape
        ok = len(a.shape) == 2 and len(b.shape) == 2 and a.shape[0] == b.shape[1] and a.shape[0] > 0
    if not ok or a.shape[1] != inp or b.shape[0] != out:
        raise CheckpointError(
            f"{path}: {name}: factors A {list(a.shape)} and B {list(b.shape)} do not fit the base's {list(shape)}"
        )
    for f in (a, b):
        if f.dtype not in ("F32", "F16", "BF16", "F64"):
            raise CheckpointError(f"{path}: {name}: LoRA factors of dtype {f.dtype}; expected floating point")


@dataclass(frozen=True)
class _Change:
    """What one target changes on disk: a base tensor, whole or one expert part of it."""

    target: str
    expert: int | None
    index: int
    """Part k of the target's expert slice (fused in memory) or 0."""


def adapted_tensors(base: Checkpoint, adapter: Adapter, owner: object) -> dict[str, TensorInfo]:
    """The base's tensors with every tensor the adapter changes merged and written to a
    scratch file (removed when `owner` is collected or the process exits)."""
    import torch

    plan = _plan(base, adapter)
    if not plan:
        return dict(base.tensors)
    scratch = Path(tempfile.mkdtemp(prefix="moeconsol-adapter-"))
    weakref.finalize(owner, shutil.rmtree, scratch, True)
    names = sorted(plan, key=lambda n: (base.tensors[n].file, base.tensors[n].start))
    file = scratch / "adapted.safetensors"
    _check_space(scratch, sum(base.tensors[n].nbytes for n in names))
    products = _Products(adapter, plan, names)
    with open(file, "wb") as f:
        f.write(_header([(n, base.tensors[n]) for n in names]))
        for position, name in enumerate(names):
            tensor = read_tensor(base.tensors[name]).clone()
            for change in plan[name]:
                _apply(base, adapter, tensor, change, products.get(change.target, change.expert))
            f.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del tensor
            products.done(position)
    spilled, _ = read_header(file)
    return {**base.tensors, **spilled}


def _plan(base: Checkpoint, adapter: Adapter) -> dict[str, list[_Change]]:
    """On-disk tensor name -> the changes the adapter makes to it."""
    record = base.layout.record
    memory = record.memory_layout
    by_info = {info: name for name, info in base.tensors.items()}
    canonical = {base.layout.canonical_name(n): n for n in base.non_expert_names}
    plan: dict[str, list[_Change]] = {}
    for param in adapter.targets:
        if param in canonical:
            plan.setdefault(canonical[param], []).append(_Change(param, None, 0))
            continue
        fused = memory.match_fused(param) if memory is not None else None
        if fused is not None:
            layer, kind = fused
            parts = memory.fused_parts[kind]
            for e in range(base.num_experts):
                for k, part in enumerate(parts):
                    name = by_info[base.expert_tensor(layer, e, part)]
                    plan.setdefault(name, []).append(_Change(param, e, k))
            continue
        single = next((hit for x in record.layouts if (hit := x.match_expert(param))), None)
        if single is not None:
            layer, e, part = single
            plan.setdefault(by_info[base.expert_tensor(layer, e, part)], []).append(_Change(param, None, 0))
            continue
        raise CheckpointError(f"{adapter.path}: the adapter changes {param}, which the base's weights do not hold")
    return plan


class _Products:
    """The products the tensors being merged need, in the order they are merged: each is
    computed once (of a 3-D parameter, one expert's slice at a time) and dropped after the
    last tensor that needs it, so memory holds the products in use, not the adapter's."""

    def __init__(self, adapter: Adapter, plan: dict[str, list[_Change]], names: list[str]):
        self.adapter = adapter
        last: dict[tuple, int] = {}
        for position, name in enumerate(names):
            for c in plan[name]:
                last[(c.target, c.expert)] = last[(c.target, "factors")] = position
        self.drop: dict[int, list[tuple]] = {}
        for key, position in last.items():
            self.drop.setdefault(position, []).append(key)
        self.cache: dict[tuple, Any] = {}

    def get(self, target: str, expert: int | None) -> torch.Tensor:
        if (target, expert) not in self.cache:
            t = self.adapter.targets[target]
            if (target, "factors") not in self.cache:
                self.cache[(target, "factors")] = (read_tensor(t.a), read_tensor(t.b))
            self.cache[(target, expert)] = delta(t, *self.cache[(target, "factors")], expert=expert)
        return self.cache[(target, expert)]

    def done(self, position: int) -> None:
        for key in self.drop.get(position, []):
            self.cache.pop(key, None)


def _apply(base: Checkpoint, adapter: Adapter, tensor: torch.Tensor, change: _Change, d: torch.Tensor) -> None:
    """Merge one change (its product `d`: whole, or the expert's slice) into `tensor`, the
    whole on-disk tensor it lands in, in place."""
    t = adapter.targets[change.target]
    if change.expert is None and tuple(d.shape) == tuple(tensor.shape):
        add_into(tensor, d, t.wrapper)
        return
    memory: Layout = base.layout.record.memory_layout
    if change.expert is None:  # a per-expert module in memory, stored inside a fused tensor on disk
        hit = next(hit for x in base.layout.record.layouts if (hit := x.match_expert(change.target)))
        layer, e, part = hit
        piece = d
    else:
        layer, kind = memory.match_fused(change.target)
        parts = memory.fused_parts[kind]
        e, part = change.expert, parts[change.index]
        piece = split(memory.fused_codec, d, len(parts))[change.index]
    add_into(base.part_view(tensor, layer, e, part), piece, t.wrapper)


def _header(entries: list[tuple[str, TensorInfo]]) -> bytes:
    """A safetensors header for these tensors, in this order."""
    header, pos = {}, 0
    for name, info in entries:
        n = math.prod(info.shape) * ITEMSIZE[info.dtype]
        header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _check_space(directory: Path, nbytes: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise CheckpointError(
            f"{directory}: {nbytes} bytes needed for the adapted tensors, {free} free; "
            "set TMPDIR to a directory on a larger disk"
        )


def apply_to_model(model, adapter: Adapter) -> None:
    """Merge the adapter into a loaded transformers model of its base, in place (as peft does)."""
    import torch

    with torch.no_grad():
        for param, t in adapter.targets.items():
            add_into(model.get_parameter(param).data, delta(t, read_tensor(t.a), read_tensor(t.b)), t.wrapper)
