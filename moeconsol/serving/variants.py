"""What the runtime serves, independent of the file format: a `VariantSet` (one bank per MoE
layer and the variants that share it), each `Variant` its config, slot maps and the stored keys
of its non-expert tensors.

`VariantSet.from_artifact` adapts a merged artifact (read lazily, tensor by tensor);
`VariantSet.from_models` consolidates in-memory transformers models losslessly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures.layouts import Architecture, architecture, supported
from ..artifact.in_place import read_in_place, storable
from ..artifact.manifest import DeltaEntry
from ..artifact.reader import Artifact
from ..errors import ArtifactError, SettingsError, UnknownModelError
from . import dequantized
from .banks import canonical_experts

# Config keys that may differ between variants without changing what the model computes.
_IGNORED_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "architectures",
    "torch_dtype",
    "dtype",
    "use_cache",
    "output_router_logits",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "_commit_hash",
    "id2label",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "quantization_config",  # how a release's weights are stored; the runtime holds values (dequantized.py)
}


def served_architecture(name: str) -> Architecture:
    """The record of an architecture the runtime serves; ArtifactError naming those it does."""
    try:
        return architecture(name)
    except KeyError:
        raise ArtifactError(f"the runtime serves {supported()}, not {name!r}") from None


@dataclass
class Variant:
    """One servable model: its config, its slot maps and where its non-expert tensors are."""

    name: str
    config: dict
    slot_maps: dict[str, list[int]]
    """MoE layer id -> bank index of each expert index"""
    tensors: dict[str, str]
    """transformers in-memory parameter name -> stored key (equal keys mean equal tensors)"""
    model_dir: Path | None = None
    """config, generation config and tokenizer files"""
    tokenizer: Any = None
    generation_config: Any = None
    deltas: dict[str, list[DeltaEntry]] = field(default_factory=dict)
    """MoE layer id -> the slots served by their bank entry plus a compressed correction
    (deltas.py); the components are read by stored key through `VariantSet.read`"""
    lora: dict[str, Any] = field(default_factory=dict)
    """Linear module name -> LoRA factors its forward adds (`lora.add_adapters`: an adapter
    served unmerged on this variant's weights); empty for every variant of an artifact"""


@dataclass
class VariantSet:
    """Everything the runtime needs: a bank per MoE layer and the variants that share it."""

    architecture: str
    layers: list[str]
    """MoE layer ids; f"{layer}.mlp" is the MoE block"""
    bank_sizes: dict[str, int]
    bank_expert: Callable[[str, int], dict[str, torch.Tensor]]
    """(layer, bank index) -> canonical expert parts, read now"""
    read: Callable[[str], torch.Tensor]
    """stored key -> tensor, read now"""
    variants: dict[str, Variant]
    dtype: torch.dtype
    """dtype the tensors are stored in"""
    artifact: Artifact | None = None
    """the artifact the tensors are stored in (None: in memory): lets the runtime read them
    straight into its buffers (`read_in_place`)"""

    @property
    def record(self) -> Architecture:
        """The architecture's record (ArtifactError if the runtime does not serve it)."""
        return served_architecture(self.architecture)

    def bank_key(self, layer: str, k: int, part: str) -> str | None:
        """The stored key of one part of a bank expert (None: not read from an artifact)."""
        return None if self.artifact is None else self.artifact.bank_part_key(layer, k, part)

    def can_read_in_place(self, key: str, target: torch.Tensor) -> bool:
        """Whether `key` can be read straight into `target` (`artifact.in_place.storable`)."""
        return self.artifact is not None and storable(self.artifact, key, target)

    def read_in_place(self, places: dict[str, list[torch.Tensor]], done: Callable[[str], None] | None = None) -> None:
        """Read each key straight into its tensors (each `can_read_in_place`), several files at
        once, each file checked as `read` checks it; `done(key)` as each key lands."""
        if places:
            assert self.artifact is not None, "read_in_place of a variant set held in memory"
            read_in_place(self.artifact, places, done)

    def check(self, name: str) -> None:
        """UnknownModelError unless `name` is one of the variants."""
        if name not in self.variants:
            raise UnknownModelError(f"unknown model {name!r}: this artifact serves {', '.join(self.variants)}")

    def check_configs(self) -> None:
        """ArtifactError naming the first config key two variants disagree on (keys that do not
        change what the model computes aside): one model serves variants of one configuration."""
        names = list(self.variants)
        ref = self.variants[names[0]].config
        for name in names[1:]:
            cfg = self.variants[name].config
            for key in sorted(set(ref) | set(cfg)):
                if key in _IGNORED_CONFIG_KEYS:
                    continue
                if ref.get(key) != cfg.get(key):
                    raise ArtifactError(
                        f"models {names[0]!r} and {name!r} differ in config key {key!r} "
                        f"({ref.get(key)!r} vs {cfg.get(key)!r}): one runtime serves variants of one configuration"
                    )

    def check_slot_maps(self, layer: str, experts_per_layer: int) -> None:
        """ArtifactError unless every variant maps each of the layer's experts into its bank."""
        for name, variant in self.variants.items():
            slots = variant.slot_maps.get(layer)
            if slots is None or len(slots) != experts_per_layer:
                raise ArtifactError(f"model {name!r}: layer {layer} needs a slot map of {experts_per_layer} entries")
            if not all(0 <= s < self.bank_sizes[layer] for s in slots):
                raise ArtifactError(
                    f"model {name!r}: layer {layer} slot map points outside its bank of {self.bank_sizes[layer]}"
                )

    @classmethod
    def from_artifact(cls, path: str | Path, checksums: bool = True) -> VariantSet:
        """Adapt a `moeconsol merge` artifact (read lazily, tensor by tensor; `checksums=False`:
        files checked for size and headers but not hashed, as `Artifact.open`). A quantized
        release's is served dequantized (`dequantized.py`), in bf16 unless asked otherwise,
        and so is not read in place."""
        art = Artifact.open(path, checksums=checksums)
        quantized = art.spec.quantization is not None
        variants = {
            name: Variant(
                name=name,
                config=art.config(name),
                slot_maps={layer: list(art.slot_map(name, layer)) for layer in art.layers},
                tensors=dequantized.value_keys(art.non_expert_keys(name)) if quantized else art.non_expert_keys(name),
                model_dir=art.model_dir(name),
                deltas={layer: art.deltas(name, layer) for layer in art.layers if art.deltas(name, layer)},
            )
            for name in art.model_names
        }
        return cls(
            architecture=art.architecture,
            layers=list(art.layers),
            bank_sizes={layer: art.bank_size(layer) for layer in art.layers},
            bank_expert=dequantized.bank_values(art) if quantized else art.bank_expert,
            read=dequantized.read_values(art) if quantized else art.read,
            variants=variants,
            dtype=dequantized.SERVING_DTYPE if quantized else _stored_dtype(art.manifest.get("dtype")),
            artifact=None if quantized else art,
        )

    @classmethod
    def from_models(cls, models: dict[str, nn.Module], tokenizers: dict[str, Any] | None = None) -> VariantSet:
        """Consolidate in-memory transformers models losslessly: bit-identical experts share
        one bank entry, bit-identical non-expert tensors share one key."""
        if not models:
            raise SettingsError("no models given")
        first = next(iter(models.values()))
        architecture = first.config.model_type
        record = served_architecture(architecture)
        layers = moe_layers(first)
        bank: dict[str, list[dict[str, torch.Tensor]]] = {layer: [] for layer in layers}
        stored: dict[str, torch.Tensor] = {}
        versions: dict[str, list[str]] = {}
        variants = {}
        for name, model in models.items():
            slot_maps = {}
            for layer in layers:
                experts = model.get_submodule(f"{layer}.mlp.experts")
                slots = []
                for parts in canonical_experts(record, experts):
                    parts = {p: t.detach() for p, t in parts.items()}
                    hit = next(
                        (k for k, b in enumerate(bank[layer]) if all(torch.equal(b[p], parts[p]) for p in parts)), None
                    )
                    if hit is None:
                        bank[layer].append(parts)
                        hit = len(bank[layer]) - 1
                    slots.append(hit)
                slot_maps[layer] = slots
            keys = {}
            for tname, tensor in model.state_dict().items():
                if any(tname.startswith(f"{layer}.mlp.experts.") for layer in layers):
                    continue
                seen = versions.setdefault(tname, [])
                key = next((k for k in seen if torch.equal(stored[k], tensor)), None)
                if key is None:
                    key = f"{tname}@{len(seen)}"
                    seen.append(key)
                    stored[key] = tensor.detach()
                keys[tname] = key
            variants[name] = Variant(
                name=name,
                config=model.config.to_dict(),
                slot_maps=slot_maps,
                tensors=keys,
                tokenizer=(tokenizers or {}).get(name),
                generation_config=copy.deepcopy(model.generation_config),
            )
        return cls(
            architecture=architecture,
            layers=layers,
            bank_sizes={layer: len(b) for layer, b in bank.items()},
            bank_expert=lambda layer, k: bank[layer][k],
            read=lambda key: stored[key],
            variants=variants,
            dtype=next(first.parameters()).dtype,
        )


Family = VariantSet
"""The name docs/runtime.md and users know `VariantSet` by."""


def _stored_dtype(name: str | None) -> torch.dtype:
    table = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    if name not in table:
        raise ArtifactError(f"artifact manifest has expert dtype {name!r}; the runtime serves F32, BF16 and F16")
    return table[name]


def moe_layers(model: nn.Module) -> list[str]:
    """MoE layer ids of a transformers model: the prefixes of its `mlp` blocks that route."""
    return [
        name[: -len(".mlp")] for name, m in model.named_modules() if name.endswith(".mlp") and hasattr(m, "experts")
    ]


def generation_config(variant: Variant, model_config):
    """The variant's generation config: its own file, else derived from the model config
    `model_config` (loaded once, then kept on the variant)."""
    if variant.generation_config is None:
        from transformers import GenerationConfig  # transformers: imported when a config is first needed

        path = variant.model_dir
        if path is not None and (path / "generation_config.json").is_file():
            variant.generation_config = GenerationConfig.from_pretrained(str(path))
        else:
            variant.generation_config = GenerationConfig.from_model_config(model_config)
    return variant.generation_config
