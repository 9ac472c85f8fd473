"""A variant's own model running what a plan serves it: every expert slot replaced by the bank
entry (and correction) that serves it, every other tensor the variant's own. That is the
consolidated variant as the runtime serves it, built with one model in memory; the held-back
check (`checking`) measures candidate plans with it.

Only slots whose served values differ from the model's own are written, and a slot written
for one plan is restored (read from the variant's checkpoint) when the next plan serves it
its own expert again.
"""

from __future__ import annotations

import torch

from ..architectures.layouts import BankKind, split
from ..io.checkpoint import Checkpoint
from ..io.safetensors_file import torch_dtypes
from .plan import LayerPlan, part_reader, served_part


def expert_views(ckpt: Checkpoint, model, layer: str) -> list[dict[str, torch.Tensor]]:
    """Every expert of `layer` in a loaded transformers model, as canonical parts that are views
    of the model's parameters (writing a view writes the model)."""
    record = ckpt.layout.record
    experts = model.get_submodule(f"{layer}.mlp.experts")
    if record.bank is BankKind.MODULES:
        w_in, w_out = record.part("in"), record.part("out")
        return [
            {w_in: experts[f"expert_{e}"].wi.weight, w_out: experts[f"expert_{e}"].wo.weight}
            for e in range(ckpt.num_experts)
        ]
    layout = record.memory_layout
    assert layout is not None
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(ckpt.num_experts)]
    for name, names in layout.fused_parts.items():
        for e, piece in enumerate(getattr(experts, name)):
            out[e].update(zip(names, split(layout.fused_codec, piece, len(names))))
    return out


class ServedVariant:
    """Variant `m` of `ckpts`, loaded (`model`), whose expert slots follow a plan (`serve`)."""

    def __init__(self, ckpts: list[Checkpoint], m: int, model, digests: list[list[str]]):
        self.ckpts, self.m, self.model, self.digests = ckpts, m, model, digests
        ref = ckpts[0]
        self.views = [expert_views(ckpts[m], model, layer) for layer in ref.moe_layers]
        self.foreign: set[tuple[int, int]] = set()
        """(layer position, expert) slots now holding values that are not the variant's own."""
        self.read_bytes = 0
        """Bytes of expert parts read from the checkpoints so far (the check's I/O)."""

    def serve(self, plans: list[LayerPlan]) -> int:
        """Write what `plans` serve this variant into its model; the number of slots that do
        not run the variant's own expert."""
        ref, m = self.ckpts[0], self.m
        E, dtype = ref.num_experts, torch_dtypes()[ref.dtype]
        with torch.no_grad():
            for li, p in enumerate(plans):
                deltas = {d.expert: d for d in p.deltas if d.model == m}
                for e in range(E):
                    i = m * E + e
                    d = deltas.get(e)
                    own = d is None and self._stores_own(p, li, i)
                    if own and (li, e) not in self.foreign:
                        continue
                    for part, view in self.views[li][e].items():
                        value = (
                            self._read(m, p.layer, e, part)
                            if own
                            else served_part(self._reader(p.layer, part), p, i, d, dtype)
                        )
                        view.copy_(value)
                    if own:
                        self.foreign.discard((li, e))
                    else:
                        self.foreign.add((li, e))
        return len(self.foreign)

    def _stores_own(self, p: LayerPlan, li: int, i: int) -> bool:
        """Whether slot i's bank entry stores bytes identical to its own expert's."""
        rep = p.representatives[p.bank_index(i)]
        return rep is not None and self.digests[li][rep] == self.digests[li][i]

    def _reader(self, layer: str, part: str):
        read = part_reader(self.ckpts, layer, part)

        def counted(i: int) -> torch.Tensor:
            t = read(i)
            self.read_bytes += t.numel() * t.element_size()
            return t

        return counted

    def _read(self, m: int, layer: str, e: int, part: str) -> torch.Tensor:
        t = self.ckpts[m].expert_part(layer, e, part)
        self.read_bytes += t.numel() * t.element_size()
        return t
