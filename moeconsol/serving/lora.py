"""LoRA adapters served without merging: the base variant's weights stay as they are, and an
adapter's factors are applied in the forward of the Linear modules it targets, as peft's own
(unmerged) forward does: `y = W x + scaling * B (A x)`. Like vLLM's multi-LoRA, an adapter
variant costs its factors, not a copy of the tensors it changes, and activating it after its
base copies nothing.

`add_adapters` adds each adapter to a `VariantSet` as a variant of its own: its base's
config, slot maps and stored keys (so it shares the base's host buffers: no swap between
them), with `lora` set. `LoraForward` holds every adapter's factors on the device and hooks
the targeted modules; `activate(name)` chooses whose factors the forward adds (none for a
variant without an adapter). Adapters on experts are refused here (they are merged into the
artifact by `moeconsol merge`); so is cross-variant batching, which mixes variants in one
forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SettingsError
from ..io.adapter import Adapter, is_adapter_dir
from ..io.safetensors_file import read_tensor
from ..io.safety import NAME_RULE, is_safe_name
from .variants import VariantSet

_TOKENIZER = "tokenizer_config.json"


@dataclass(frozen=True)
class LoraFactors:
    """One targeted Linear module's factors: A [r, in], B [out, r], and the scaling."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def add_adapters(variant_set: VariantSet, adapters: dict[str, Path], sources: dict[str, str]) -> VariantSet:
    """`variant_set` with each adapter (name -> directory) as a variant on its base: the
    variant its `base_model_name_or_path` names (by name or by the source it was merged
    from, `sources`), else the only variant."""
    variants = dict(variant_set.variants)
    for name, path in adapters.items():
        if not is_safe_name(name):
            raise SettingsError(f"bad adapter name {name!r}: a name must be {NAME_RULE}")
        if name in variants:
            raise SettingsError(f"adapter name {name!r} is already a model of the artifact; give another")
        path = Path(path)
        if not is_adapter_dir(path):
            raise SettingsError(f"{path}: not a LoRA adapter directory (no adapter_config.json)")
        base = variants[_base_variant(path, variant_set, sources)]
        adapter = Adapter(path, base.config, variant_set.record)
        variants[name] = dataclasses.replace(
            base,
            name=name,
            lora=_factors(adapter, variant_set),
            model_dir=path if (path / _TOKENIZER).is_file() else base.model_dir,
            tokenizer=None if (path / _TOKENIZER).is_file() else base.tokenizer,
        )
    return dataclasses.replace(variant_set, variants=variants)


def _base_variant(path: Path, variant_set: VariantSet, sources: dict[str, str]) -> str:
    wanted = Adapter.base_name(path)
    names = [n for n in variant_set.variants if wanted in (n, sources.get(n))]
    if names:
        return names[0]
    if len(variant_set.variants) == 1:
        return next(iter(variant_set.variants))
    raise SettingsError(
        f"{path}: its base_model_name_or_path ({wanted!r}) names none of the artifact's models "
        f"({', '.join(variant_set.variants)}); set it to the base's name in adapter_config.json"
    )


def _factors(adapter: Adapter, variant_set: VariantSet) -> dict[str, LoraFactors]:
    """Module name -> factors; refuses what the forward does not apply."""
    layouts = variant_set.record.layouts
    memory = variant_set.record.memory_layout
    out = {}
    for param, t in adapter.targets.items():
        on_experts = any(x.match_expert(param) for x in layouts) or (memory is not None and memory.match_fused(param))
        if on_experts or t.experts:
            raise SettingsError(
                f"{adapter.path}: the adapter changes experts ({param}); adapters on experts are served merged: "
                "give it to `moeconsol merge` as NAME=DIR"
            )
        if t.wrapper or t.transposed or not param.endswith(".weight"):
            raise SettingsError(
                f"{adapter.path}: {param}: only LoRA on Linear modules (target_modules, no fan_in_fan_out) is "
                "served unmerged; merge it with `moeconsol merge`"
            )
        out[param.removesuffix(".weight")] = LoraFactors(read_tensor(t.a), read_tensor(t.b), t.scaling)
    return out


class LoraForward:
    """Every adapter's factors on the device, and a forward hook on each module any adapter
    targets adding the active adapter's `scaling * B (A x)` to the module's output."""

    def __init__(self, model: nn.Module, variant_set: VariantSet, device: torch.device):
        self._factors: dict[str, dict[str, LoraFactors]] = {}
        self._active: dict[str, LoraFactors] = {}
        for name, variant in variant_set.variants.items():
            lora = getattr(variant, "lora", None) or {}
            if not lora:
                continue
            placed = {}
            for module_name, f in lora.items():
                weight = model.get_submodule(module_name).weight
                # peft moves the factors to the base layer's device and dtype when it loads them
                placed[module_name] = LoraFactors(f.a.to(device, weight.dtype), f.b.to(device, weight.dtype), f.scaling)
            self._factors[name] = placed
        self._hooks = [
            model.get_submodule(m).register_forward_hook(self._hook(m))
            for m in sorted({m for lora in self._factors.values() for m in lora})
        ]

    @property
    def any(self) -> bool:
        return bool(self._factors)

    def _hook(self, module_name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            f = self._active.get(module_name)
            if f is None:
                return None
            x = args[0].to(f.a.dtype)
            return (output + nn.functional.linear(nn.functional.linear(x, f.a), f.b) * f.scaling).to(output.dtype)

        return hook

    def activate(self, name: str) -> None:
        """The forward adds `name`'s adapter from now on (nothing for a variant without one)."""
        self._active = self._factors.get(name, {})

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for lora in self._factors.values() for f in lora.values() for t in (f.a, f.b)
        )
