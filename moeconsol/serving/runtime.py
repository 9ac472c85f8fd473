"""Serve N consolidated variants from one resident model: the bank stays, the rest swaps.

The runtime builds one transformers model (the record's model class: MixtralForCausalLM,
Qwen3MoeForCausalLM, ... SwitchTransformersForConditionalGeneration) whose MoE blocks run a
shared **expert bank** (banks.py) through a per-layer **slot map** (expert index -> bank
index). The non-expert tensors (attention, norms, embeddings, LM head, routers) are views into
one flat device buffer per dtype (flat.py). Nothing is re-allocated, the model is never
rebuilt and the experts never move, so generation, KV cache and sampling stay transformers'
own (engine.py).

How the variants are held is the runtime's residency, chosen by its `ServingMode`:
`SwapResidency` (here: every variant's differing tensors wait in host memory, pinned on
CUDA; activating a variant copies them into the resident parameters in place and rewrites
the slot maps) or `CrossVariantResidency` (crossvariant.py: every variant resident at once,
rows routed per variant).

The core does not know the artifact format: it takes a `VariantSet` (variants.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..architectures.layouts import Architecture
from ..artifact.corrections import corrected
from ..artifact.reader import Artifact
from ..errors import ArtifactError, MoeconsolError, SettingsError
from .banks import BankExperts, bank_class, canonical_experts
from .crossvariant import CrossVariantResidency, ServingMode
from .device import parse_device, synchronize
from .flat import Flat, nbytes, plan_flats
from .lora import LoraForward, add_adapters
from .variants import Variant, VariantSet, generation_config

HOST_COPY, HOST_FILE = "copy", "file"
HOST_BUFFERS = (HOST_COPY, HOST_FILE)
"""Where swap mode keeps the variants that are not active: `copy`, a host buffer per variant
(a swap is one memcpy; host memory grows with every variant); `file`, nothing: a swap reads
the variant's tensors from the artifact's files (the page cache) straight into the swap
region, decoding the encoded ones (host memory stays flat in N; a swap costs a read)."""

# -- reports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapReport:
    """What one activation cost. A no-op (already active) has seconds == 0 and bytes == 0."""

    model: str
    previous: str
    seconds: float
    bytes_moved: int
    tensors_copied: int
    tensors_skipped: int
    slot_maps_changed: int
    experts_corrected: int = 0
    """The new variant's corrected experts copied into the private bank entries (decoded once,
    at load; their bytes count in `bytes_moved`)."""

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ResidentBytes:
    bank: int
    """the bank on the device, private entries for corrected experts included"""
    non_expert: int
    host: int
    """everything waiting in host memory for swaps: every variant's non-expert tensors (each
    stored key once) and corrected experts (`corrected`)"""
    deltas: int = 0
    """compressed delta components resident on the device: none, they are decoded at load
    (kept in the report's shape)"""
    corrected: int = 0
    """of `host`: every variant's corrected experts, decoded once at load and kept in host
    memory, which a swap copies into the private bank entries (swap mode; with cross-variant
    batching each variant's stay in its own entries, in `bank`)"""
    adapters: int = 0
    """the factors of the LoRA adapters served unmerged (`lora.LoraForward`), on the device"""

    @property
    def total(self) -> int:
        return self.bank + self.non_expert + self.deltas + self.adapters

    def to_dict(self) -> dict:
        return {
            "bank": self.bank,
            "non_expert": self.non_expert,
            "deltas": self.deltas,
            "adapters": self.adapters,
            "total": self.total,
            "host": self.host,
            "corrected": self.corrected,
        }


# -- residency: how the variants are held ---------------------------------------------------------


class Residency(Protocol):
    """What a serving mode decides: what `activate` does, and how a forward's rows map to
    variants. `SwapResidency` below; `crossvariant.CrossVariantResidency`."""

    def activate(self, previous: str, name: str) -> SwapReport | None:
        """Make `name`'s weights the served ones; the report of what moved, None if nothing
        had to (every variant is resident)."""

    def swap_bytes(self, a: str, b: str) -> int:
        """Bytes an activation of `b` after `a` (a != b) copies."""

    def variant_group(self, name: str) -> int:
        """The group `name`'s rows run in."""

    def variant_rows(self, names: list[str], active: str) -> AbstractContextManager[None]:
        """A context in which the next forwards' sequence i is of variant `names[i]`."""

    def slot_map(self, layer: str, active: str) -> list[int]:
        """The active variant's slot map of `layer` as the bank looks it up."""

    def extra_non_expert_bytes(self) -> int:
        """Non-expert bytes resident on the device beyond the flat buffers."""


class SwapResidency:
    """One variant resident at a time: the flat buffers' swap regions hold the active variant's
    differing tensors, every variant's wait in host memory (`host`: variant -> dtype -> buffer
    laid out as the swap region, pinned on CUDA; variants with equal keys share one), and
    activating another is one copy per dtype plus one copy of its slot-map table, plus one
    copy per bank parameter and layer of its corrected experts (`corrected`: variant -> its
    `RowCopy`s)."""

    def __init__(
        self,
        variant_set: VariantSet,
        flats: dict[torch.dtype, Flat],
        host: dict[str, dict[torch.dtype, HostSource]],
        slot_maps: dict[str, torch.Tensor],
        slot_table: torch.Tensor,
        corrected: dict[str, list[RowCopy]],
    ):
        self._variant_set = variant_set
        self._flats, self._host = flats, host
        self._slot_maps, self._slot_table = slot_maps, slot_table
        self._corrected = corrected
        self._tensors = sum(len(f.swappable) + len(f.shared) for f in flats.values())
        self._layer_slots = dict(zip(variant_set.layers, slot_table))

    @torch.no_grad()
    def activate(self, previous: str, name: str) -> SwapReport:
        """One copy per dtype of `name`'s swappable tensors into the resident buffer's swap
        region (none when its host buffer is `previous`'s), one copy of the slot-map table if
        it differs, then `name`'s corrected experts into the private bank entries."""
        device = self._slot_table.device
        synchronize(device)
        start = time.perf_counter()
        moved = copied = 0
        for dtype, flat in self._flats.items():
            source = self._host[name][dtype]
            if source is not self._host[previous][dtype]:
                _fill_region(flat.swap_region, source)
                moved += _source_bytes(source)
                copied += len(flat.swappable)
        maps = self._slot_maps[name]
        if maps is not self._slot_maps[previous]:
            _copy_into(self._slot_table, maps)
            moved += nbytes(maps)
        for copy in self._corrected[name]:
            copy()
            moved += copy.nbytes
        corrected_experts = sum(len(x) for x in self._variant_set.variants[name].deltas.values())
        synchronize(device)
        seconds = time.perf_counter() - start
        old, new = self._variant_set.variants[previous].slot_maps, self._variant_set.variants[name].slot_maps
        changed = sum(old[layer] != new[layer] for layer in self._variant_set.layers)
        return SwapReport(name, previous, seconds, moved, copied, self._tensors - copied, changed, corrected_experts)

    def swap_bytes(self, a: str, b: str) -> int:
        moved = sum(_source_bytes(self._host[b][d]) for d in self._flats if self._host[b][d] is not self._host[a][d])
        moved += sum(copy.nbytes for copy in self._corrected[b])
        return moved + (nbytes(self._slot_maps[b]) if self._slot_maps[b] is not self._slot_maps[a] else 0)

    def variant_group(self, name: str) -> int:
        return 0

    @contextmanager
    def variant_rows(self, names: list[str], active: str) -> Iterator[None]:
        """Every name must be the active variant's: one forward serves one variant."""
        wrong = next((n for n in names if n != active), None)
        if wrong is not None:
            raise MoeconsolError(
                f"a batch row of {wrong!r} while {active!r} is active: mixing variants in one "
                "forward needs cross-variant batching"
            )
        yield

    def slot_map(self, layer: str, active: str) -> list[int]:
        return self._layer_slots[layer].tolist()

    def extra_non_expert_bytes(self) -> int:
        return 0


# -- the runtime ------------------------------------------------------------------------------


class Runtime:
    """One resident model serving every variant of a `VariantSet`."""

    def __init__(
        self,
        variant_set: VariantSet,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        active: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        mode: ServingMode = ServingMode.SWAP,
        host_buffers: str = HOST_COPY,
    ):
        if host_buffers not in HOST_BUFFERS:
            raise SettingsError(f"host_buffers {host_buffers!r}: one of {', '.join(HOST_BUFFERS)}")
        if host_buffers == HOST_FILE and (variant_set.artifact is None or ServingMode(mode) is not ServingMode.SWAP):
            raise SettingsError("host_buffers 'file' serves swap mode from an artifact's files")
        self.host_buffers = host_buffers
        if not variant_set.variants:
            raise ArtifactError("the artifact holds no models")
        self.variant_set = variant_set
        self.mode = ServingMode(mode)
        self.device = parse_device(str(device)) if not isinstance(device, torch.device) else device
        self.dtype = dtype or variant_set.dtype
        self.names = list(variant_set.variants)
        active = active or self.names[0]
        self.check_model(active)
        variant_set.check_configs()
        self._delta_offsets = _delta_offsets(variant_set, one_after_another=self.mode is ServingMode.CROSS_VARIANT)
        self._private = _private_entries(variant_set, self._delta_offsets)
        self.model = _build_skeleton(variant_set, active, self.dtype, self._private)
        self._banks: dict[str, nn.Module] = {
            layer: self.model.get_submodule(f"{layer}.mlp.experts") for layer in variant_set.layers
        }
        self._through_model_dtype = _self_casting_router_weights(self.model, variant_set)
        self._allocate()
        _finish_resident(self.model)
        self._targets = _swap_targets(self.model, self._banks)
        self._slot_maps = _slot_map_tensors(
            variant_set, self.device, _served_slot_maps(variant_set, self._delta_offsets)
        )
        self._host = self._load(progress)
        self._corrected = self._correct_experts(progress)
        self._tokenizers: dict[str, Any] = {}
        self.swaps: list[SwapReport] = []
        self.active = ""
        self._lora = LoraForward(self.model, variant_set, self.device)
        if self._lora.any and self.mode is ServingMode.CROSS_VARIANT:
            raise SettingsError(
                "cross-variant batching does not serve unmerged LoRA adapters: merge them into the artifact "
                "(`moeconsol merge ... NAME=ADAPTER_DIR`) or serve them without cross-variant batching"
            )
        self._install(active)
        self._residency = self._start_residency()

    @classmethod
    def from_artifact(
        cls,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        active: str | None = None,
        progress=None,
        mode: ServingMode = ServingMode.SWAP,
        adapters: dict[str, Path] | None = None,
        host_buffers: str = HOST_COPY,
        checksums: bool = True,
    ) -> Runtime:
        """The artifact's variants, and `adapters` (name -> LoRA adapter directory) served
        unmerged on the variant each names as its base (`lora.add_adapters`)."""
        variant_set = VariantSet.from_artifact(path, checksums=checksums)
        if adapters:
            sources = {m.name: m.source for m in Artifact.open(path, checksums=False).spec.models}
            variant_set = add_adapters(variant_set, adapters, sources)
        return cls(
            variant_set,
            device=device,
            dtype=dtype,
            active=active,
            progress=progress,
            mode=mode,
            host_buffers=host_buffers,
        )

    @property
    def family(self) -> VariantSet:
        """`variant_set` under a second name, kept for code that reads `family`."""
        return self.variant_set

    # -- loading ----------------------------------------------------------------------------
    def _allocate(self) -> None:
        """Lay out the skeleton's non-expert tensors in one flat buffer per dtype (the ones
        that differ between variants first), then give every meta tensor its storage on the
        device: non-expert tensors become views into their flat buffer, the slot maps rows of
        one [layers, experts] table, the bank and the rest fresh tensors. Nothing is
        allocated twice."""
        targets = _swap_targets(self.model, self._banks)
        self._keys = {name: _resolve_keys(self.model, targets, v) for name, v in self.variant_set.variants.items()}
        self._flats = plan_flats(targets, self._keys, self.device)
        experts = len(next(iter(self._banks.values())).slot_map)
        self._slot_table = torch.empty(len(self._banks), experts, dtype=torch.long, device=self.device)
        views = {id(t): self._flats[t.dtype].view(name, t.shape) for name, t in targets.items()}
        views.update({id(m.slot_map): self._slot_table[i] for i, m in enumerate(self._banks.values())})
        _materialize(self.model, self.device, views)

    @torch.no_grad()
    def _load(self, progress) -> dict[str, dict[torch.dtype, HostSource]]:
        """Each variant's host buffers (`_host_buffers`), the tensors every variant shares and
        the bank, filled. What the artifact stores whole, of the dtype and shape it goes to,
        is read straight into its place, several files at once, each file hashed as it is read
        (`VariantSet.read_in_place`); the rest (encoded, cast, on a GPU) is read tensor by
        tensor and copied."""
        host, fills = self._host_buffers()
        fills += self._bank_fills()
        totals = Counter(f.stage for f in fills)
        counts: Counter[str] = Counter()

        def advance(fill: _Fill) -> None:
            counts[fill.stage] += 1
            if progress:
                progress(fill.stage, counts[fill.stage], totals[fill.stage])

        direct = [
            f
            for f in fills
            if f.direct and f.places and all(self.variant_set.can_read_in_place(k, t) for k, t in f.places.items())
        ]
        places: dict[str, list[torch.Tensor]] = {}
        waiting: dict[str, list[_Fill]] = {}
        left = {id(f): len(f.places) for f in direct}
        for f in direct:
            for key, target in f.places.items():
                places.setdefault(key, []).append(target)
                waiting.setdefault(key, []).append(f)

        def landed(key: str) -> None:
            for f in waiting[key]:
                left[id(f)] -= 1
                if not left[id(f)]:
                    advance(f)

        self.variant_set.read_in_place(places, landed)
        for f in fills:
            if id(f) not in left:
                f.fallback()
                advance(f)
        return host

    def _host_buffers(self) -> tuple[dict[str, dict[torch.dtype, HostSource]], list[_Fill]]:
        """Each variant's swappable tensors in one flat host buffer per dtype (pinned on CUDA),
        laid out as the device buffer's swap region; variants whose swappable tensors all have
        the same stored keys share one buffer. Returns the buffers (allocated) and what fills
        them and the tensors every variant shares (read once, straight into the device
        buffer)."""
        pin = self.device.type == "cuda"
        signatures = {  # (variant, dtype) -> what its host buffer holds
            (name, dtype): (dtype, *(self._keys[name][t] for t in flat.swappable))
            for dtype, flat in self._flats.items()
            for name in self.names
        }
        fills: list[_Fill] = []
        host: dict[str, dict[torch.dtype, HostSource]] = {name: {} for name in self.names}
        built: dict[tuple, HostSource] = {}
        for dtype, flat in self._flats.items():
            for name in self.names:
                signature = signatures[name, dtype]
                if signature in built:
                    pass
                elif self.host_buffers == HOST_FILE:  # read from the files at each swap
                    region = [self._non_expert_fill(flat.swap_region, flat, t, name) for t in flat.swappable]
                    built[signature] = FileRegion(self.variant_set, region, nbytes(flat.swap_region))
                else:
                    built[signature] = torch.zeros(flat.swap_numel, dtype=dtype, pin_memory=pin)
                    fills += [self._non_expert_fill(built[signature], flat, t, name) for t in flat.swappable]
                host[name][dtype] = built[signature]
            fills += [self._non_expert_fill(flat.buffer, flat, t, self.names[0]) for t in flat.shared]
        return host, fills

    def _non_expert_fill(self, buffer: torch.Tensor, flat: Flat, tname: str, variant: str) -> _Fill:
        target = self._targets[tname]
        place = flat.view_in(buffer, tname, target.shape)
        key = self._keys[variant][tname]
        cast = tname in self._through_model_dtype and target.dtype != self.dtype

        def fallback() -> None:
            stored = self.variant_set.read(key)
            if stored.shape != target.shape:
                raise ArtifactError(
                    f"model {variant!r}: {tname} is {list(stored.shape)}, the model needs {list(target.shape)}"
                )
            if tname in self._through_model_dtype and stored.is_floating_point():
                stored = stored.to(self.dtype)  # as transformers loads it, before its router casts it
            place.copy_(stored)

        return _Fill("non-expert tensors", {key: place}, fallback, direct=not cast)

    def _bank_fills(self) -> list[_Fill]:
        """One fill per bank expert: its parts straight into the bank's parameters where they
        are plain contiguous views of them (every fused layout but an interleaved one)."""
        fills = []
        record = self.variant_set.record
        for layer, module in self._banks.items():
            views = canonical_experts(record, module)
            storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
            for k in range(self.variant_set.bank_sizes[layer]):
                keys = {p: self.variant_set.bank_key(layer, k, p) for p in views[k]}
                in_bank = all(v.untyped_storage().data_ptr() in storages for v in views[k].values())
                places = {keys[p]: v for p, v in views[k].items() if keys[p] is not None}
                fills.append(_Fill("expert bank", places, _loader(module, k, self.variant_set, layer), in_bank))
        return fills

    @torch.no_grad()
    def _correct_experts(self, progress) -> dict[str, list[RowCopy]]:
        """Every variant's corrected experts, computed once: written into its private bank
        entries (`_write_corrected`). With cross-variant batching each variant has entries of
        its own, and that is all. In swap mode the variants take turns in the same entries:
        each one's rows are kept in host memory (pinned on CUDA), and activating it copies
        them back (`RowCopy`). Decoding on every swap instead cost hundreds of
        times the copy (docs/runtime.md, "Expert corrections")."""
        keep = self.mode is ServingMode.SWAP
        pin = self.device.type == "cuda"
        total = sum(len(x) for v in self.variant_set.variants.values() for x in v.deltas.values())
        done = 0
        out: dict[str, list[RowCopy]] = {}
        for name in self.names:
            rows = self._write_corrected(name)
            out[name] = [RowCopy(r.detach(), pin) for r in rows] if keep else []
            done += sum(len(x) for x in self.variant_set.variants[name].deltas.values())
            if progress and total:
                progress("expert corrections", done, total)
        return out

    @torch.no_grad()
    def _write_corrected(self, name: str) -> list[torch.Tensor]:
        """Write `name`'s corrected experts (bank entry + decoded delta, `corrections.corrected`,
        on the device, from its compressed components read now and not kept) into its private
        bank entries; the rows written, as contiguous tensors (`entries`)."""
        record = self.variant_set.record
        rows: list[torch.Tensor] = []
        for layer, entries in self.variant_set.variants[name].deltas.items():
            module = self._banks[layer]
            views = canonical_experts(record, module)
            start = self.variant_set.bank_sizes[layer] + self._delta_offsets[name].get(layer, 0)
            for j, x in enumerate(entries):
                bank = views[x.bank]
                parts = {}
                for p, keys in x.keys.items():
                    comps = {c: self.variant_set.read(key).to(self.device) for c, key in keys.items()}
                    parts[p] = corrected(bank[p], comps, x.format, x.size)
                module.load_expert(start + j, parts)
            rows += module.entries(start, len(entries))
        return rows

    @torch.no_grad()
    def _install(self, name: str) -> None:
        """First activation: copy every swap region and the slot maps of `name`."""
        for dtype, flat in self._flats.items():
            _fill_region(flat.swap_region, self._host[name][dtype])
        self._slot_table.copy_(self._slot_maps[name])
        for copy in self._corrected[name]:
            copy()
        self._lora.activate(name)
        self._set_generation_config(name)
        self.active = name
        synchronize(self.device)

    def _start_residency(self) -> Residency:
        """The residency `mode` asks for, over what the runtime has loaded and installed."""
        if self.mode is ServingMode.CROSS_VARIANT:
            host, self._host = self._host, {}  # moved onto the device: nothing waits in host memory
            return CrossVariantResidency(
                self.variant_set,
                self.model,
                self._banks,
                self._targets,
                self._flats,
                host,
                self._slot_maps,
                installed=self.active,
            )
        return SwapResidency(
            self.variant_set, self._flats, self._host, self._slot_maps, self._slot_table, self._corrected
        )

    # -- serving ----------------------------------------------------------------------------
    @torch.no_grad()
    def activate(self, name: str) -> SwapReport:
        """Make `name` the served model (in swap mode: one copy per dtype of its swappable
        tensors, one copy of the slot-map table if it differs; with cross-variant batching no
        copy). Free if already active."""
        self.check_model(name)
        previous = self.active
        if name == previous:
            return self._no_swap(name, previous)
        report = self._residency.activate(previous, name)
        self._lora.activate(name)
        self._set_generation_config(name)
        self.active = name
        if report is None:
            return self._no_swap(name, previous)
        self.swaps.append(report)
        return report

    def _no_swap(self, name: str, previous: str) -> SwapReport:
        return SwapReport(name, previous, 0.0, 0, 0, len(self._targets), 0)

    def swap_bytes(self, a: str, b: str) -> int:
        """Bytes a swap from `a` to `b` copies (what `activate` reports as bytes_moved)."""
        return 0 if a == b else self._residency.swap_bytes(a, b)

    def variant_group(self, name: str) -> int:
        """Cross-variant: the group `name`'s rows run in (variants whose differing non-expert
        tensors are all equal share one); swap mode: 0."""
        return self._residency.variant_group(name)

    def variant_rows(self, names: list[str]) -> AbstractContextManager[None]:
        """A context manager: the next forwards' sequence i is of variant `names[i]`. Swap mode:
        every name must be the active variant's (one forward serves one variant); cross-variant:
        any mix."""
        return self._residency.variant_rows(names, self.active)

    # -- inspection -------------------------------------------------------------------------
    def resident_bytes(self) -> ResidentBytes:
        bank = sum(nbytes(p) for m in self._banks.values() for p in m.parameters())
        non_expert = sum(nbytes(f.buffer) for f in self._flats.values()) + self._residency.extra_non_expert_bytes()
        held = {id(t): t for buffers in self._host.values() for t in buffers.values() if isinstance(t, torch.Tensor)}
        host = sum(nbytes(t) for t in held.values())
        corrected = sum(copy.nbytes for copies in self._corrected.values() for copy in copies)
        return ResidentBytes(bank, non_expert, host + corrected, 0, corrected, self._lora.nbytes())

    def bank_tensors(self) -> dict[str, torch.Tensor]:
        """The resident bank parameters, by name (for checks that the experts never move)."""
        return {f"{layer}.{n}": p for layer, m in self._banks.items() for n, p in m.named_parameters()}

    def slot_map(self, layer: str) -> list[int]:
        """The active variant's slot map of `layer` as served (delta slots at private entries)."""
        return self._residency.slot_map(layer, self.active)

    def tokenizer(self, name: str | None = None):
        name = name or self.active
        self.check_model(name)
        if name not in self._tokenizers:
            variant = self.variant_set.variants[name]
            if variant.tokenizer is not None:
                self._tokenizers[name] = variant.tokenizer
            elif variant.model_dir is not None:
                from transformers import AutoTokenizer  # transformers: imported when a tokenizer is first loaded

                try:
                    self._tokenizers[name] = AutoTokenizer.from_pretrained(str(variant.model_dir))
                except (OSError, ValueError) as e:
                    raise ArtifactError(f"model {name!r} has no usable tokenizer in {variant.model_dir}: {e}") from None
            else:
                raise ArtifactError(f"model {name!r} has no tokenizer")
        return self._tokenizers[name]

    def encode(self, name: str, prompt: str) -> list[int]:
        """`prompt`'s token ids by `name`'s tokenizer, with its special tokens."""
        return list(self.tokenizer(name)(prompt, add_special_tokens=True)["input_ids"])

    def max_context(self, name: str | None = None) -> int | None:
        """Longest prompt + completion the model supports, if it states one."""
        config = self.variant_set.variants[name or self.active].config
        limit = config.get("max_position_embeddings")
        return int(limit) if limit else None

    # -- helpers ----------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        self.variant_set.check(name)

    def _set_generation_config(self, name: str) -> None:
        self.model.generation_config = generation_config(self.variant_set.variants[name], self.model.config)


# -- construction helpers ---------------------------------------------------------------------


def _delta_offsets(variant_set: VariantSet, one_after_another: bool) -> dict[str, dict[str, int]]:
    """Per variant and MoE layer, where its private bank entries start after the stored bank:
    0 for every variant when they take turns in the same entries (swap mode); one after the
    other when all are resident at once (cross-variant)."""
    out: dict[str, dict[str, int]] = {}
    ends = {layer: 0 for layer in variant_set.layers}
    for name, v in variant_set.variants.items():
        out[name] = {layer: ends[layer] if one_after_another else 0 for layer in variant_set.layers}
        for layer in variant_set.layers:
            ends[layer] = out[name][layer] + len(v.deltas.get(layer, []))
    return out


def _private_entries(variant_set: VariantSet, offsets: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per MoE layer, the bank entries beyond the stored bank that hold corrected experts:
    the most any variant's entries reach there (swap mode: the active variant's, in entries
    all variants share; cross-variant: every variant's, one after the other)."""
    return {
        layer: max(
            (offsets[n][layer] + len(v.deltas.get(layer, [])) for n, v in variant_set.variants.items()), default=0
        )
        for layer in variant_set.layers
    }


def _served_slot_maps(variant_set: VariantSet, offsets: dict[str, dict[str, int]]) -> dict[str, dict[str, list[int]]]:
    """Each variant's slot maps as the runtime serves them: a delta slot points at its
    private bank entry (bank size + the variant's offset + its position in the layer's delta
    list)."""
    out = {}
    for name, v in variant_set.variants.items():
        maps = {layer: list(v.slot_maps[layer]) for layer in variant_set.layers}
        for layer, entries in v.deltas.items():
            for j, x in enumerate(entries):
                if maps[layer][x.expert] != x.bank:
                    raise ArtifactError(
                        f"model {name!r}: layer {layer}: the delta of expert {x.expert} corrects bank entry {x.bank}, the slot map says {maps[layer][x.expert]}"
                    )
                maps[layer][x.expert] = variant_set.bank_sizes[layer] + offsets[name][layer] + j
        out[name] = maps
    return out


def _build_skeleton(variant_set: VariantSet, active: str, dtype, private: dict[str, int] | None = None) -> nn.Module:
    """The transformers model on the meta device (nothing allocated), in `dtype`, from the
    active variant's config, each MoE block's experts replaced by a bank module (the class
    for its architecture and experts class, `bank_class`) of the bank's entries plus
    `private[layer]` for corrected experts."""
    record = variant_set.record
    config_class, model_class = record.transformers_classes()
    config = config_class.from_dict(variant_set.variants[active].config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = model_class(config)
            for layer in variant_set.layers:
                try:
                    block = model.get_submodule(f"{layer}.mlp")
                except AttributeError:
                    raise ArtifactError(f"MoE layer {layer} does not exist in a {model_class.__name__}") from None
                bank = bank_class(variant_set.architecture, type(block.experts))(
                    config, variant_set.bank_sizes[layer] + (private or {}).get(layer, 0)
                )
                block.experts = bank
                variant_set.check_slot_maps(layer, len(bank.slot_map))
                _keep_router_dtype(model, config, layer, record)
    finally:
        torch.set_default_dtype(previous)
    return model


def _keep_router_dtype(model: nn.Module, config, layer: str, record: Architecture) -> None:
    """A router that casts its weights to its own dtype at every forward (Switch's
    `self.classifier = self.classifier.to(router_dtype)`) would, in another model dtype,
    replace them with a copy outside the runtime's flat buffer, which swaps no longer reach:
    hold them in that dtype from the start (the same values transformers computes with)."""
    if record.router_dtype_key is None:
        return
    dtype = getattr(torch, str(getattr(config, record.router_dtype_key)))
    model.get_submodule(f"{layer}.mlp.{record.router}").to(dtype)


def _self_casting_router_weights(model: nn.Module, variant_set: VariantSet) -> set[str]:
    """Names of the router weights `_keep_router_dtype` holds in the router's own dtype: they
    are loaded through the model's dtype first, as from_pretrained loads them before the
    router's forward casts them."""
    record = variant_set.record
    if record.router_dtype_key is None:
        return set()
    return {
        f"{layer}.mlp.{record.router}.{n}"
        for layer in variant_set.layers
        for n, _ in model.get_submodule(f"{layer}.mlp.{record.router}").named_parameters()
    }


def _materialize(model: nn.Module, device: torch.device, views: dict[int, torch.Tensor]) -> None:
    """Give every meta parameter and buffer storage on `device`, as `to_empty` does, except
    that the tensors named in `views` (id of the meta tensor -> a view into a flat buffer)
    become those views. A parameter several modules share (tied weights) stays one Parameter."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (meta tensor kept alive, new tensor)
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in made:
                    data = views.get(id(t))
                    data = torch.empty_like(t, device=device) if data is None else data
                    made[id(t)] = (
                        t,
                        nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else data,
                    )
                table[key] = made[id(t)][1]


def _finish_resident(model: nn.Module) -> None:
    """As from_pretrained does: re-tie tied weights, compute non-persistent buffers (rotary
    inv_freq) with transformers' own initializer, and leave requires_grad as it is (True, as
    from_pretrained does; generation runs under no_grad). Not a detail: for a weight that does
    not require grad, torch's matmul runs a 3-D input such as the prefill's last token through
    the LM head as expand + bmm, copying the whole weight (65 MB at vocab 32000 and hidden
    1024, 0.36 s on one core, once per request)."""
    model.tie_weights()
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set and not isinstance(module, BankExperts):
                model._init_weights(module)
    model.eval()


def _swap_targets(model: nn.Module, banks: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers outside the bank, each tensor once (the first of its
    tied names)."""
    bank_ids = {id(t) for m in banks.values() for t in [*m.parameters(), *m.buffers()]}
    targets: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in bank_ids or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        targets[name] = tensor
    return targets


def _resolve_keys(model: nn.Module, targets: dict[str, torch.Tensor], variant: Variant) -> dict[str, str]:
    """Target name -> the variant's stored key, looking through tied aliases (lm_head/embeddings)."""
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
    by_target = {}
    known = set()
    for name, target in targets.items():
        names = aliases[id(target)]
        known.update(names)
        key = next((variant.tensors[n] for n in names if n in variant.tensors), None)
        if key is None:
            raise ArtifactError(f"model {variant.name!r} lacks tensor {name}: the artifact is incomplete; re-run merge")
        by_target[name] = key
    unknown = sorted(n for n in variant.tensors if n not in known and n not in aliases)
    if unknown:
        raise ArtifactError(f"model {variant.name!r} has tensors the model does not: {', '.join(unknown[:3])}")
    return by_target


def _slot_map_tensors(
    variant_set: VariantSet, device: torch.device, served: dict[str, dict[str, list[int]]]
) -> dict[str, torch.Tensor]:
    """Each variant's slot maps (as served: `_served_slot_maps`) as one [layers, experts] table
    (pinned on CUDA); variants whose maps are all equal share one table."""
    pin = device.type == "cuda"
    tables: dict[str, torch.Tensor] = {}
    built: dict[tuple, torch.Tensor] = {}
    for name in variant_set.variants:
        rows = tuple(tuple(served[name][layer]) for layer in variant_set.layers)
        if rows not in built:
            table = torch.tensor(rows, dtype=torch.long)
            built[rows] = table.pin_memory() if pin else table
        tables[name] = built[rows]
    return tables


class RowCopy:
    """Resident bank rows (a variant's corrected experts in the private entries) and their copy
    in host memory (pinned when `pin`: copies to the device are asynchronous); calling it
    copies them back. On CPU the byte views are made once, not at every call (a swap makes
    one such copy per bank parameter and layer)."""

    def __init__(self, rows: torch.Tensor, pin: bool):
        self.rows = rows
        self.source = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=pin)
        self.source.copy_(rows)
        self.nbytes = nbytes(self.source)
        cpu = rows.device.type == "cpu"
        self._bytes = (rows.view(torch.uint8).numpy(), self.source.view(torch.uint8).numpy()) if cpu else None

    def __call__(self) -> None:
        if self._bytes is None:
            self.rows.copy_(self.source, non_blocking=True)
        else:
            np.copyto(*self._bytes)


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """One copy of a contiguous host buffer into a same-sized resident one: asynchronous from
    pinned memory on CUDA; on CPU one memcpy (numpy's copy of the bytes) on the calling thread.
    torch's own CPU copy splits a large copy over its intra-op thread pool, and on a busy
    machine waiting for those threads costs far more than the copy (measured: 3.7 MB took
    7-23 ms through the pool under load, 0.3-1.2 ms as one memcpy; 155 MB 42-47 ms through the
    pool, 22-28 ms as one memcpy)."""
    if target.device.type == "cuda":
        target.copy_(source, non_blocking=True)
        return
    np.copyto(target.view(torch.uint8).numpy(), source.view(torch.uint8).numpy())


@dataclass
class _Fill:
    """Stored tensors going to their places in the runtime's memory: read straight there
    (`places`: stored key -> place) when `direct` and the artifact allows, else `fallback`."""

    stage: str
    places: dict[str, torch.Tensor]
    fallback: Callable[[], None]
    direct: bool


def _loader(module: nn.Module, k: int, variant_set: VariantSet, layer: str) -> Callable[[], None]:
    """Bank expert `k` of `layer` read and copied in (`load_expert`)."""
    return lambda: module.load_expert(k, variant_set.bank_expert(layer, k))


class FileRegion:
    """A variant's swap region of one dtype, read from the artifact at each swap."""

    def __init__(self, variant_set: VariantSet, fills: list[_Fill], size: int):
        self._variant_set, self._fills, self.nbytes = variant_set, fills, size
        self._direct = [
            f for f in fills if f.direct and all(variant_set.can_read_in_place(k, t) for k, t in f.places.items())
        ]

    @torch.no_grad()
    def fill(self) -> None:
        places: dict[str, list[torch.Tensor]] = {}
        for f in self._direct:
            for key, target in f.places.items():
                places.setdefault(key, []).append(target)
        self._variant_set.read_in_place(places)
        direct = {id(f) for f in self._direct}
        for f in self._fills:
            if id(f) not in direct:
                f.fallback()


HostSource = torch.Tensor | FileRegion
"""Where a variant's swap region comes from: a host buffer, or the artifact's files."""


def _fill_region(region: torch.Tensor, source: HostSource) -> None:
    if isinstance(source, FileRegion):
        source.fill()
    else:
        _copy_into(region, source)


def _source_bytes(source: HostSource) -> int:
    return source.nbytes if isinstance(source, FileRegion) else nbytes(source)
