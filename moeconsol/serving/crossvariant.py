"""Cross-variant batching: one forward serves rows of different variants.

The bank is shared; only the non-expert tensors (attention, norms, embeddings, LM head,
routers) and the slot maps differ between variants. In `ServingMode.CROSS_VARIANT` the
runtime's residency is a `CrossVariantResidency`: every variant's differing tensors stay
resident, and:

- each module that owns a differing tensor becomes an instance of a subclass of its own
  class (`per_variant_class`, made once per class, as the bank classes are) whose forward
  runs once per variant group present in the batch, with its parameters pointed at views of
  that group's resident buffer (no copy), on the group's rows, and writes the rows back in
  order; parameter names, state_dict and the module tree stay transformers' own;
- a module whose differing tensor is indexed by positions, not rows (T5/Switch's
  `relative_attention_bias`, an Embedding of relative-position buckets shared by every
  sequence: `POSITION_BIASES`), stays as it is; its owner's bias method
  (`per_variant_bias_class`) computes the bias once per variant group present and gives each
  sequence its group's ([B, heads, q, k] instead of [1, heads, q, k]);
- each bank module looks an expert index up in its layer's table [V, E] at the row of the
  token's variant (`cross_bank_class`; Switch's one-hot choice is folded onto the bank per
  token through its variant's row: `cross_onehot_bank_class`), so the bank runs once for
  all tokens.

Which variant each row is comes from `VariantRows`, which the engine sets before each
forward (one entry per sequence) through `Runtime.variant_rows`. A module that sees
flattened tokens [B*T, H] (Mixtral's router) maps row r to sequence r // T.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import torch
from torch import nn

from ..architectures.layouts import BankKind
from ..errors import SettingsError
from .banks import BankExperts
from .flat import Flat, nbytes
from .variants import VariantSet


class ServingMode(str, Enum):
    """How the runtime holds its variants: the residency it runs with."""

    SWAP = "swap"
    """one variant resident at a time; a swap copies its non-expert tensors in (the default)"""
    CROSS_VARIANT = "cross-variant"
    """every variant's differing non-expert tensors resident; one forward serves any mix"""


class VariantRows:
    """Which variant each sequence of the next forward belongs to.

    Two indices per variant: its position among the runtime's variants (the row of the
    slot-map tables) and its non-expert tensor set (variants whose differing tensors are all
    equal share one set, so they run as one group). With no rows set, every row is the
    default variant (the runtime's active one)."""

    def __init__(self, device: torch.device, resident_set: int):
        self.device = device
        self.resident_set = resident_set
        """the tensor set the modules' own parameters hold between forwards"""
        self.default_variant, self.default_set = 0, resident_set
        self._variants: list[int] | None = None
        self._sets: list[int] = []
        self._groups: dict[int, list[tuple[int, torch.Tensor | None]]] = {}
        self._tokens: dict[int, torch.Tensor | int] = {}

    def set_default(self, variant: int, tensor_set: int) -> None:
        self.default_variant, self.default_set = variant, tensor_set

    def set(self, variants: list[int], sets: list[int]) -> None:
        self._variants, self._sets = list(variants), list(sets)
        self._groups, self._tokens = {}, {}
        self._one_set = sets[0] if len(set(sets)) == 1 else None
        self._one_variant = variants[0] if len(set(variants)) == 1 else None

    def clear(self) -> None:
        self._variants, self._sets, self._groups, self._tokens = None, [], {}, {}

    def _per_row(self, n: int, what: str) -> int:
        """Rows per sequence for a tensor of `n` rows (1: one row per sequence; T: flattened)."""
        b = len(self._sets)
        if n % b:
            raise RuntimeError(f"cross-variant batching: a module saw {n} rows for {b} sequences ({what})")
        return n // b

    def groups(self, n: int) -> list[tuple[int, slice | torch.Tensor | None]]:
        """(tensor set, its rows) for a tensor of `n` rows: one group with rows None when every
        row is of one set; slices when each set's sequences are consecutive (the engine keeps
        its batch so: no gather, no scatter); else row indices on the device."""
        if self._variants is None:
            return [(self.default_set, None)]
        if self._one_set is not None:
            return [(self._one_set, None)]
        if n not in self._groups:
            per = self._per_row(n, "grouping rows")
            runs = [i for i in range(len(self._sets)) if i == 0 or self._sets[i] != self._sets[i - 1]]
            out: list[tuple[int, slice | torch.Tensor | None]] = []
            if len(runs) == len(set(self._sets)):
                for start, stop in zip(runs, runs[1:] + [len(self._sets)]):
                    out.append((self._sets[start], slice(start * per, stop * per)))
            else:
                for s in dict.fromkeys(self._sets):
                    seqs = torch.tensor([i for i, x in enumerate(self._sets) if x == s], device=self.device)
                    rows = seqs if per == 1 else (seqs[:, None] * per + torch.arange(per, device=self.device)).flatten()
                    out.append((s, rows))
            self._groups[n] = out
        return self._groups[n]

    def sequence_groups(self) -> list[tuple[int, slice | torch.Tensor | None]]:
        """(tensor set, its sequences) for a tensor of one row per sequence (`groups`)."""
        return self.groups(len(self._sets))

    def sequences(self) -> int | None:
        """How many sequences the rows describe (None: no rows set)."""
        return None if self._variants is None else len(self._sets)

    def token_variants(self, n: int) -> torch.Tensor | int:
        """The variant of each of `n` tokens (a [n] tensor), or one int when all are one variant."""
        if self._variants is None:
            return self.default_variant
        if self._one_variant is not None:
            return self._one_variant
        if n not in self._tokens:
            per = self._per_row(n, "looking up slot maps")
            seq = torch.tensor(self._variants, device=self.device)
            self._tokens[n] = seq.repeat_interleave(per) if per > 1 else seq
        return self._tokens[n]


# -- modules that own a differing tensor ---------------------------------------------------------


def row_wise(module: nn.Module) -> bool:
    """True if `module`'s forward takes one required input whose first dim is rows (a Linear,
    an Embedding, a norm, a router): what a per-variant module can split by rows. An
    attention module that owns a tensor itself (gpt-oss' `sinks`) also takes the cache and
    the mask, which cannot be split that way."""
    params = inspect.signature(module.forward).parameters.values()
    required = [
        p
        for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) == 1


POSITION_BIASES: dict[str, tuple[str, str]] = {
    "SwitchTransformersAttention": ("relative_attention_bias", "compute_bias"),
}
"""Modules whose child owning a differing tensor is fed positions, not rows (an Embedding of
relative-position buckets): owner class name -> (the child's attribute, the owner's method
that returns the bias, [1, heads, q, k], for every sequence)."""


def position_bias_owner(model: nn.Module, name: str) -> tuple[nn.Module, str, str] | None:
    """(owner, child attribute, bias method) if the module `name` of `model` is one of
    `POSITION_BIASES`' children; else None."""
    parent, _, attr = name.rpartition(".")
    owner = model.get_submodule(parent)
    entry = POSITION_BIASES.get(type(owner).__name__)
    if entry is None or entry[0] != attr:
        return None
    return owner, attr, entry[1]


def _use(module: nn.Module, tensors: list[tuple[str, str, torch.Tensor]]) -> None:
    for table, attr, t in tensors:
        getattr(module, table)[attr] = t


@functools.cache
def per_variant_bias_class(cls: type, child: str, method: str) -> type:
    """A subclass of `cls` whose `method` (a position bias [1, heads, q, k] from its child
    `child`) runs once per variant group present, with the child holding that group's
    tensors, and returns [B, heads, q, k]: each sequence its own group's bias (one group: the
    bias as transformers computes it)."""
    compute = getattr(cls, method)

    def biased(self, *args, **kwargs):
        rows: VariantRows = self._xv_rows
        table = getattr(self, child)
        groups = rows.sequence_groups()
        try:
            if len(groups) == 1:
                _use(table, self._xv_bias[groups[0][0]])
                return compute(self, *args, **kwargs)
            parts = []
            for tensor_set, index in groups:
                _use(table, self._xv_bias[tensor_set])
                parts.append((index, compute(self, *args, **kwargs)))
            first = parts[0][1]
            out = first.new_empty(rows.sequences(), *first.shape[1:])
            for index, bias in parts:
                out[index] = bias
            return out
        finally:
            _use(table, self._xv_bias[rows.resident_set])

    PerVariantBias = type(f"PerVariant{cls.__name__}", (cls,), {method: biased})
    PerVariantBias.__qualname__ = PerVariantBias.__name__
    return PerVariantBias


@functools.cache
def per_variant_class(cls: type) -> type:
    """A subclass of `cls` whose forward runs once per variant group on the group's rows,
    with that group's tensors, and writes each output's rows back in order."""

    class PerVariant(cls):
        _xv_rows: VariantRows
        _xv_tensors: list[list[tuple[str, str, torch.Tensor]]]
        """per tensor set: (table "_parameters" or "_buffers", attribute, tensor)"""

        def _xv_use(self, tensor_set: int) -> None:
            _use(self, self._xv_tensors[tensor_set])

        def forward(self, x, *args, **kwargs):
            rows = self._xv_rows
            groups = rows.groups(x.shape[0])
            try:
                if len(groups) == 1:
                    self._xv_use(groups[0][0])
                    return super().forward(x, *args, **kwargs)
                parts = []
                for tensor_set, index in groups:
                    self._xv_use(tensor_set)
                    part = x[index] if isinstance(index, slice) else x.index_select(0, index)
                    parts.append((index, super().forward(part, *args, **kwargs)))
                return _scatter(parts, x.shape[0])
            finally:
                self._xv_use(rows.resident_set)

    PerVariant.__name__ = PerVariant.__qualname__ = f"PerVariant{cls.__name__}"
    return PerVariant


def _scatter(parts: list[tuple[slice | torch.Tensor, object]], n: int):
    """The groups' outputs (a tensor or a tuple of tensors each) put back at their rows
    (consecutive slices in order: one concatenation). An output may flatten its input's rows
    (DeepSeek-V2's router: [B, T, H] in, [B*T, k] out): each input row then owns `per`
    consecutive output rows."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor) and isinstance(parts[0][0], slice):
        return torch.cat([part for _, part in parts])
    if isinstance(first, torch.Tensor):
        per = first.shape[0] // len(parts[0][0])
        out = first.new_empty(n * per, *first.shape[1:])
        for index, part in parts:
            if per > 1:
                index = (index[:, None] * per + torch.arange(per, device=index.device)).flatten()
            out.index_copy_(0, index, part)
        return out
    return type(first)(_scatter([(index, part[i]) for index, part in parts], n) for i in range(len(first)))


@functools.cache
def cross_bank_class(bank_cls: type) -> type:
    """A subclass of a fused bank class that looks each token's expert index up in the slot
    map of the token's variant (`variant_slots` [V, E], one row per variant)."""

    class CrossVariantBank(bank_cls):
        _xv_rows: VariantRows
        variant_slots: torch.Tensor

        def forward(self, hidden_states, top_k_index, top_k_weights):
            variants = self._xv_rows.token_variants(top_k_index.shape[0])
            if isinstance(variants, int):
                index = self.variant_slots[variants][top_k_index]
            else:
                index = self.variant_slots[variants[:, None], top_k_index]
            return super(bank_cls, self).forward(hidden_states, index, top_k_weights)

    CrossVariantBank.__name__ = CrossVariantBank.__qualname__ = f"CrossVariant{bank_cls.__name__}"
    return CrossVariantBank


@functools.cache
def cross_onehot_bank_class(bank_cls: type) -> type:
    """A subclass of Switch's bank class that folds each token's one-hot choice over the E
    experts onto the K bank entries through the slot map of the token's variant
    (`variant_slots` [V, E]): a token of variant v routed to expert e goes to entry
    variant_slots[v, e]."""

    class CrossVariantOneHotBank(bank_cls):
        _xv_rows: VariantRows
        variant_slots: torch.Tensor

        def forward(self, hidden_states, selected_experts, routing_weights):
            variants = self._xv_rows.token_variants(selected_experts.shape[0])
            folded = selected_experts.new_zeros(*selected_experts.shape[:-1], self.num_experts)
            if isinstance(variants, int):
                folded.index_add_(-1, self.variant_slots[variants], selected_experts)
            else:  # [N, 1, E]: row n's entry e goes to its variant's slot of e
                index = self.variant_slots[variants].view(
                    -1, *[1] * (selected_experts.dim() - 2), selected_experts.shape[-1]
                )
                folded.scatter_add_(-1, index.expand_as(selected_experts), selected_experts)
            return super(bank_cls, self).forward(hidden_states, folded, routing_weights)

    CrossVariantOneHotBank.__name__ = CrossVariantOneHotBank.__qualname__ = f"CrossVariant{bank_cls.__name__}"
    return CrossVariantOneHotBank


_CROSS_BANK_CLASSES = {BankKind.FUSED: cross_bank_class, BankKind.MODULES: cross_onehot_bank_class}
"""the subclass of each kind of bank class that looks slot maps up per token"""


# -- the residency ---------------------------------------------------------------------------------


class CrossVariantResidency:
    """Every variant resident at once: each distinct swap region on the device (the installed
    variant's is the flat buffers' own), every module that owns a differing tensor made
    per-variant, and the bank looking slot maps up per token in one table [V, E] per layer.
    `activate` copies nothing; it only names the variant of a forward without rows."""

    def __init__(
        self,
        variant_set: VariantSet,
        model: nn.Module,
        banks: dict[str, nn.Module],
        targets: dict[str, torch.Tensor],
        flats: dict[torch.dtype, Flat],
        host: dict[str, dict[torch.dtype, torch.Tensor]],
        slot_maps: dict[str, torch.Tensor],
        installed: str,
    ):
        """Take over the runtime's `host` buffers (variant -> dtype -> its swap region, laid out
        as `flats`' swap regions; equal buffers are one object) onto the device, with
        `installed` the variant the flat buffers hold. Every variant's corrected experts are
        already in its own private bank entries (the runtime writes them at load)."""
        self._variant_set = variant_set
        self._names = list(variant_set.variants)
        self._flats = flats
        device = next(iter(flats.values())).buffer.device
        signature = {n: tuple(id(host[n][d]) for d in flats) for n in self._names}
        sets: dict[tuple, int] = {}
        for n in [installed, *self._names]:
            sets.setdefault(signature[n], len(sets))
        self._set_of = {n: sets[signature[n]] for n in self._names}
        first = {s: next(n for n in self._names if self._set_of[n] == s) for s in range(len(sets))}
        self._set_buffers = [
            {d: flat.swap_region if s == 0 else host[first[s]][d].to(device) for d, flat in flats.items()}
            for s in range(len(sets))
        ]
        self._rows = VariantRows(device, resident_set=0)
        self._rows.set_default(self._names.index(installed), 0)
        self._make_per_variant(model, targets)
        tables = torch.stack([slot_maps[n] for n in self._names], dim=1).to(device)  # [layers, V, E]
        cross_bank = _CROSS_BANK_CLASSES[variant_set.record.bank]
        for i, bank in enumerate(banks.values()):
            bank.__class__ = cross_bank(type(bank))
            bank._xv_rows = self._rows
            bank.variant_slots = tables[i]
        self._banks = banks

    def _make_per_variant(self, model: nn.Module, targets: dict[str, torch.Tensor]) -> None:
        """Point every module that owns a differing tensor at its variant group's views."""
        # one view per (tensor, set); a tensor several modules share (tied weights) stays one object per set
        swappable = {id(targets[t]): t for flat in self._flats.values() for t in flat.swappable}
        per_set: dict[int, list[torch.Tensor]] = {}
        for tid, tname in swappable.items():
            target = targets[tname]
            flat = self._flats[target.dtype]
            views = [target]
            for buffers in self._set_buffers[1:]:
                view = flat.view_in(buffers[target.dtype], tname, target.shape)
                views.append(
                    nn.Parameter(view, requires_grad=target.requires_grad) if isinstance(target, nn.Parameter) else view
                )
            per_set[tid] = views
        for mname, module in model.named_modules():
            if isinstance(module, BankExperts):
                continue
            own = [
                (table, attr, t)
                for table in ("_parameters", "_buffers")
                for attr, t in getattr(module, table).items()
                if t is not None and id(t) in per_set
            ]
            if not own:
                continue
            tensors = [
                [(table, attr, per_set[id(t)][s]) for table, attr, t in own] for s in range(len(self._set_buffers))
            ]
            bias = position_bias_owner(model, mname)
            if bias is not None:  # fed positions, not rows: its owner computes the bias per variant group
                owner, child, method = bias
                owner.__class__ = per_variant_bias_class(type(owner), child, method)
                owner._xv_rows, owner._xv_bias = self._rows, tensors
                continue
            if not row_wise(module):
                raise SettingsError(
                    f"cross-variant batching cannot serve {type(module).__name__} ({mname}): it owns a tensor that differs "
                    f"between variants ({own[0][1]}) and takes more than one input; serve this artifact in swap mode"
                )
            module.__class__ = per_variant_class(type(module))
            module._xv_rows = self._rows
            module._xv_tensors = tensors

    def activate(self, previous: str, name: str) -> None:
        """`name` becomes the variant of a forward without rows; nothing is copied."""
        self._rows.set_default(self._names.index(name), self._set_of[name])

    def swap_bytes(self, a: str, b: str) -> int:
        return 0

    def variant_group(self, name: str) -> int:
        """The group `name`'s rows run in: variants whose differing non-expert tensors are all
        equal share one."""
        return self._set_of[name]

    @contextmanager
    def variant_rows(self, names: list[str], active: str) -> Iterator[None]:
        """The next forwards' sequence i is of variant `names[i]`, any mix."""
        for n in names:
            self._variant_set.check(n)
        self._rows.set([self._names.index(n) for n in names], [self._set_of[n] for n in names])
        try:
            yield
        finally:
            self._rows.clear()

    def slot_map(self, layer: str, active: str) -> list[int]:
        return self._banks[layer].variant_slots[self._names.index(active)].tolist()

    def extra_non_expert_bytes(self) -> int:
        """The device buffers of the variant groups beyond the flat buffers' own swap regions."""
        return sum(
            nbytes(t)
            for buffers in self._set_buffers
            for dtype, t in buffers.items()
            if t is not self._flats[dtype].swap_region
        )
