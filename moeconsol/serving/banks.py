"""The bank modules: transformers' own experts classes holding the K bank experts of a layer
instead of its E experts, fed bank indices through a slot map (expert index -> bank index).

One generic class serves every experts class of transformers 5's experts interface
(`_fused_bank_class`), one Switch's per-expert modules (`_switch_bank_class`); `bank_class`
makes each once per (architecture, experts class). `canonical_experts` reads any experts
module back in canonical per-part form.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from ..architectures.layouts import Architecture, BankKind, architecture, join, split


class BankExperts:
    """Mixin of every bank module: an experts module of transformers' own class holding K
    bank experts instead of E, plus a `slot_map` buffer [E] (expert index -> bank index).
    `load_expert(k, parts)` writes entry k from canonical parts; `entries(k, n)` gives entries
    k..k+n-1 as contiguous tensors (what a copy of them must fill)."""

    slot_map: torch.Tensor


def _fused_bank_class(experts_class: type, record: Architecture) -> type:
    """A bank over any experts class of transformers 5's experts interface (Mixtral, Qwen2/3-MoE,
    OLMoE, DeepSeek-V2/V3, gpt-oss): its per-expert parameters (`gate_up_proj`, `down_proj`,
    gpt-oss' biases: first dim E) resized to K entries. The router's expert indices go through
    the slot map, then transformers' own experts implementation runs on the bank. Which
    canonical parts each parameter holds, and how, is the record's in-memory layout."""
    layout = record.memory_layout

    class FusedBankExperts(BankExperts, experts_class):
        def __init__(self, config, bank_size: int):
            super().__init__(config)
            experts = self.num_experts
            for name, p in list(self.named_parameters(recurse=False)):
                if p.shape[0] == experts:
                    setattr(self, name, nn.Parameter(p.new_empty(bank_size, *p.shape[1:])))
            self.num_experts = bank_size
            self.register_buffer("slot_map", torch.arange(experts), persistent=False)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return super().forward(hidden_states, self.slot_map[top_k_index], top_k_weights)

        @torch.no_grad()
        def load_expert(self, k: int, parts: dict[str, torch.Tensor]) -> None:
            for name, names in layout.fused_parts.items():
                getattr(self, name)[k].copy_(join(layout.fused_codec, [parts[p] for p in names]))

        def entries(self, k: int, n: int) -> list[torch.Tensor]:
            """Bank entries k..k+n-1 as contiguous tensors: one slice of each parameter."""
            return [getattr(self, name)[k : k + n] for name in layout.fused_parts] if n else []

    FusedBankExperts.__name__ = FusedBankExperts.__qualname__ = f"{experts_class.__name__}Bank"
    return FusedBankExperts


def _switch_bank_class(experts_class: type, record: Architecture) -> type:
    class SwitchBankExperts(BankExperts, experts_class):
        """SwitchTransformersExperts holding K bank experts (`expert_{k}`: wi, wo) plus a
        `slot_map` buffer [E]. The router's one-hot choice over E experts is folded onto the
        K bank entries (a token routed to expert e goes to bank entry slot_map[e])."""

        def __init__(self, config, bank_size: int):
            experts = config.num_experts
            super().__init__(_bank_config(config, "num_experts", bank_size))
            self.register_buffer("slot_map", torch.arange(experts), persistent=False)

        def forward(self, hidden_states, selected_experts, routing_weights):
            folded = selected_experts.new_zeros(*selected_experts.shape[:-1], self.num_experts)
            folded.index_add_(-1, self.slot_map, selected_experts)
            return super().forward(hidden_states, folded, routing_weights)

        @torch.no_grad()
        def load_expert(self, k: int, parts: dict[str, torch.Tensor]) -> None:
            self[f"expert_{k}"].wi.weight.copy_(parts["wi"])
            self[f"expert_{k}"].wo.weight.copy_(parts["wo"])

        def entries(self, k: int, n: int) -> list[torch.Tensor]:
            """Bank entries k..k+n-1 as contiguous tensors: each one's weights."""
            return [t for j in range(k, k + n) for t in (self[f"expert_{j}"].wi.weight, self[f"expert_{j}"].wo.weight)]

    return SwitchBankExperts


def _bank_config(config, attr: str, bank_size: int):
    cfg = copy.copy(config)
    setattr(cfg, attr, bank_size)
    return cfg


_BANK_CLASSES = {BankKind.FUSED: _fused_bank_class, BankKind.MODULES: _switch_bank_class}


@functools.cache
def bank_class(architecture_name: str, experts_class: type) -> type:
    """The bank module class for one experts class of one architecture (made once)."""
    record = architecture(architecture_name)
    return _BANK_CLASSES[record.bank](experts_class, record)


def canonical_experts(record: Architecture, experts: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Every expert of a transformers experts module in canonical per-part form (views)."""
    if record.bank is BankKind.MODULES:
        w_in, w_out = record.part("in"), record.part("out")
        return [
            {w_in: experts[f"expert_{e}"].wi.weight, w_out: experts[f"expert_{e}"].wo.weight}
            for e in range(len(experts))
        ]
    layout = record.memory_layout
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(experts.num_experts)]
    for name, names in layout.fused_parts.items():
        for e, slice_ in enumerate(getattr(experts, name)):
            out[e].update(zip(names, split(layout.fused_codec, slice_, len(names))))
    return [{p: parts[p] for p in layout.parts} for parts in out]
