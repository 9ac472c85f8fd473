"""What `add` and `remove` share: which stored keys a manifest uses, and its `bytes` record
counted again from the manifest itself."""

from __future__ import annotations

import math

from ..artifact.manifest import Manifest
from ..artifact.validate import bank_part_key
from ..io.safetensors_file import ITEMSIZE


def appended_key(m: Manifest, layer: str, k: int) -> str | None:
    """The `BankEntry.key` of a bank entry appended at index `k` of `layer` by the change that
    makes generation `m.generation + 1`: None (merge's `bank.{layer}.{k}`) unless that key is
    still stored (after a `remove`), then one of its own, named by the generation."""
    if not any(bank_part_key(layer, k, None, p) in m.weight_map for p in m.parts):
        return None
    return f"bank.g{m.generation + 1}.{layer}.{k}"


def bank_keys(m: Manifest) -> set[str]:
    return {
        bank_part_key(entry.layer, k, b.key, part)
        for entry in m.layers
        for k, b in enumerate(entry.bank)
        for part in m.parts
    }


def delta_keys(m: Manifest) -> set[str]:
    return {
        key
        for entry in m.layers
        for ds in entry.deltas.values()
        for d in ds
        for comps in d.keys.values()
        for key in comps.values()
    }


def non_expert_keys(m: Manifest) -> set[str]:
    """Every non-expert key a model maps to, and the references of the encoded ones."""
    keys = {key for model in m.models for key in model.tensors.values()}
    return keys | {m.encodings[k].reference for k in keys if k in m.encodings}


def used_keys(m: Manifest) -> set[str]:
    return bank_keys(m) | delta_keys(m) | non_expert_keys(m)


def recount_bytes(m: Manifest, inputs: int | None) -> dict[str, int | None]:
    """`bytes` of manifest `m` from what it stores (`inputs`: the sources' bytes, if known)."""

    def nbytes(key: str) -> int:
        t = m.shapes[key]
        return math.prod(t.shape) * ITEMSIZE[t.dtype]

    def whole(key: str) -> int:
        e = m.encodings.get(key)
        return nbytes(key) if e is None else math.prod(e.shape) * ITEMSIZE[e.dtype]

    one = sum(math.prod(s) for s in m.part_shapes.values()) * ITEMSIZE[m.dtype]
    ne = non_expert_keys(m)
    out: dict[str, int | None] = {
        "inputs": inputs,
        "experts_in": len(m.models) * len(m.layers) * m.experts_per_layer * one,
        "bank": sum(len(entry.bank) for entry in m.layers) * one,
    }
    if "deltas" in m.bytes:
        out["deltas"] = sum(nbytes(k) for k in delta_keys(m))
    out["non_expert"] = sum(nbytes(k) for k in ne)
    out["non_expert_whole"] = sum(whole(k) for k in ne)
    return out
