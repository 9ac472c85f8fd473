"""The layout of the resident non-expert tensors: one flat buffer per dtype, each tensor a view
into it, the tensors that differ between variants first (the swap region), the tensors every
variant shares after them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN_BYTES = 64
"""each resident tensor starts on a 64-byte boundary of its flat buffer"""


@dataclass
class Flat:
    """The resident non-expert tensors of one dtype: views into one flat device buffer. The
    tensors whose stored key is not the same in every variant come first, in
    `buffer[:swap_numel]`; a swap copies that region with one copy. The tensors every variant
    shares follow; they are loaded once and never move."""

    buffer: torch.Tensor
    offsets: dict[str, int]
    """target name -> element offset in `buffer`"""
    swappable: list[str]
    shared: list[str]
    swap_numel: int

    def __post_init__(self) -> None:
        # what a swap overwrites, sliced once: a swap issues nothing but its copies
        self.swap_region = self.buffer[: self.swap_numel]

    def view(self, name: str, shape: torch.Size) -> torch.Tensor:
        return self.view_in(self.buffer, name, shape)

    def view_in(self, buffer: torch.Tensor, name: str, shape: torch.Size) -> torch.Tensor:
        """Tensor `name` in `buffer`, a buffer laid out as this one (or as its swap region)."""
        offset = self.offsets[name]
        return buffer[offset : offset + shape.numel()].view(shape)


def plan_flats(
    targets: dict[str, torch.Tensor], keys: dict[str, dict[str, str]], device: torch.device
) -> dict[torch.dtype, Flat]:
    """One flat device buffer per dtype for the tensors `targets` (name -> tensor), given each
    variant's stored key of each (`keys`: variant -> name -> key): first the tensors whose key
    differs between some variants (the swap region), then those every variant shares."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, t in targets.items():
        by_dtype.setdefault(t.dtype, []).append(name)
    flats = {}
    for dtype, names in by_dtype.items():
        differs = {n: len({k[n] for k in keys.values()}) > 1 for n in names}
        swappable = [n for n in names if differs[n]]
        shared = [n for n in names if not differs[n]]
        align = max(1, ALIGN_BYTES // targets[names[0]].element_size())
        offsets: dict[str, int] = {}
        end = 0
        for name in swappable + shared:
            offsets[name] = end
            end += -(-targets[name].numel() // align) * align
        swap_numel = offsets[shared[0]] if shared else end
        flats[dtype] = Flat(torch.zeros(end, dtype=dtype, device=device), offsets, swappable, shared, swap_numel)
    return flats


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
