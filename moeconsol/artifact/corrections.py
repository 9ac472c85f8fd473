"""Compressed corrections from a shared bank expert towards a slot's own expert.

A slot (model m, expert e, MoE layer L) served by a bank expert that is not its own may carry
a *delta*: a compressed form of `own - bank`, one per canonical part (2-D matrix), the way
BitDelta (sign bits and one scale), Delta-CoMe (low-rank) and D2-MoE (shared base expert plus
SVD-compressed expert deltas) store fine-tune differences. The formats are data: `FORMATS`
holds one `DeltaFormat` record each, with

- `sizes(shape)`: the size parameters worth trying for a matrix of that shape;
- `components(shape, size, dtype)`: the name, dtype and shape of every stored tensor;
- `encode(delta, size, dtype)`: float32 delta -> those tensors;
- `decode(components, shape, size)`: back to a float32 matrix.

`corrected` is THE definition of a corrected expert part, used by export and by the runtime
alike, so both produce the same weights bit for bit on CPU.

Formats (size parameter in brackets):

- `lowrank` [rank r]: truncated SVD, `a = U_r diag(S_r)` [out, r] and `b = Vh_r` [r, in] in
  the experts' dtype; decode = a @ b in float32.
- `sign` [none]: BitDelta, the sign of every entry packed 8 per uint8 (bit j of byte c is
  column 8c + j of its row; 1 = positive or zero) and one float32 scale, mean |delta|;
  decode = +-scale.
- `int4` [group size g, or none for one group per row]: absmax quantisation, each group of g
  columns of a row scaled by max|x| / 7 (float32) and rounded to -7..7, stored +8 as 4-bit
  codes, two per uint8 (low nibble = even column).
- `mixed` [rank r >= 2], after Delta-CoMe: the truncated SVD with balanced factors
  `U_r sqrt(S_r)` and `sqrt(S_r) Vh_r`; the top h = max(1, r // 4) singular vectors at 8
  bits (int8, absmax / 127 per vector), the other r - h at 4 bits (absmax / 7 per vector,
  codes as in int4, each vector a row packed two per uint8), float32 scales.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SettingsError

Shape = tuple[int, int]
Components = dict[str, torch.Tensor]
ComponentSpecs = dict[str, tuple[torch.dtype, tuple[int, ...]]]

_POWERS = tuple(2**i for i in range(16))


@dataclass(frozen=True)
class DeltaFormat:
    """One way of storing a delta matrix (see the module docstring)."""

    name: str
    sizes: Callable[[Shape], list[int | None]]
    components: Callable[[Shape, int | None, torch.dtype], ComponentSpecs]
    encode: Callable[[torch.Tensor, int | None, torch.dtype], Components]
    decode: Callable[[Components, Shape, int | None], torch.Tensor]
    sized: bool = True
    """Whether the format takes a size parameter (`sign` does not: its size is null)."""

    def size_problem(self, size: int | None, shapes: list[Shape]) -> str | None:
        """Why a delta of parts of `shapes` cannot have been written at `size`, or None. A
        size beyond every dimension clamps to the same components as a smaller one, but no
        writer makes it: it is refused, not served."""
        largest = max((max(shape) for shape in shapes), default=0)
        if size is not None and not self.sized:
            return f"{self.name} takes no size, got {size}"
        if size is not None and not 1 <= size <= largest:
            return f"size {size} is outside 1..{largest} (the largest dimension of the parts)"
        try:
            for shape in shapes:
                self.components(shape, size, torch.float32)
        except SettingsError as e:
            return str(e)
        return None

    def nbytes(self, shape: Shape, size: int | None, dtype: torch.dtype) -> int:
        """Bytes of the stored components of one matrix."""
        return sum(
            math.prod(s) * torch.empty((), dtype=d).element_size()
            for d, s in self.components(shape, size, dtype).values()
        )

    def component_names(self) -> list[str]:
        """The names of the stored components, sorted (the same at every shape and size)."""
        return sorted(self.components((8, 8), 2, torch.float32))

    def encode_many(self, delta: torch.Tensor, sizes: list[int | None], dtype: torch.dtype) -> list[Components]:
        """`encode` at every size of `sizes` (lowrank: one SVD for all ranks)."""
        if self.name == "lowrank":
            return _lowrank_many(delta, sizes, dtype)
        return [self.encode(delta, size, dtype) for size in sizes]


# -- bit packing ----------------------------------------------------------------------------


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols / 8)]; bit j of byte c is column 8c + j."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, device=mask.device)).to(torch.uint8)
    return (padded.view(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_bits`: bool [rows, cols]."""
    shifts = torch.arange(8, device=packed.device).to(torch.uint8)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :cols].bool()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [rows, cols] -> uint8 [rows, ceil(cols / 2)], low nibble = even column."""
    rows, cols = codes.shape
    padded = torch.zeros(rows, cols + cols % 2, dtype=torch.uint8, device=codes.device)
    padded[:, :cols] = codes
    return padded[:, 0::2] | (padded[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: uint8 codes [rows, cols]."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    return out[:, :cols]


# -- lowrank ----------------------------------------------------------------------------------


def _lowrank_sizes(shape: Shape) -> list[int | None]:
    out, inp = shape
    return [r for r in _POWERS if r <= min(shape) and r * (out + inp) < out * inp]


def _lowrank_components(shape: Shape, size: int | None, dtype: torch.dtype) -> ComponentSpecs:
    r = _rank(shape, size)
    return {"a": (dtype, (shape[0], r)), "b": (dtype, (r, shape[1]))}


def _rank(shape: Shape, size: int | None) -> int:
    if size is None or size < 1:
        raise SettingsError(f"lowrank needs a rank of at least 1, got {size!r}")
    return min(int(size), *shape)


def _lowrank_many(delta: torch.Tensor, sizes: list[int | None], dtype: torch.dtype) -> list[Components]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    out = []
    for size in sizes:
        r = _rank(tuple(delta.shape), size)
        out.append({"a": (u[:, :r] * s[:r]).to(dtype).contiguous(), "b": vh[:r].to(dtype).contiguous()})
    return out


def _lowrank_encode(delta: torch.Tensor, size: int | None, dtype: torch.dtype) -> Components:
    return _lowrank_many(delta, [size], dtype)[0]


def _lowrank_decode(c: Components, shape: Shape, size: int | None) -> torch.Tensor:
    return c["a"].float() @ c["b"].float()


# -- sign (BitDelta) --------------------------------------------------------------------------


def _sign_components(shape: Shape, size: int | None, dtype: torch.dtype) -> ComponentSpecs:
    return {"bits": (torch.uint8, (shape[0], -(-shape[1] // 8))), "scale": (torch.float32, (1,))}


def _sign_encode(delta: torch.Tensor, size: int | None, dtype: torch.dtype) -> Components:
    d = delta.float()
    return {"bits": pack_bits(d >= 0), "scale": d.abs().mean().reshape(1)}


def _sign_decode(c: Components, shape: Shape, size: int | None) -> torch.Tensor:
    positive = unpack_bits(c["bits"], shape[1])
    scale = c["scale"].float()
    return torch.where(positive, scale, -scale)


# -- int4 (absmax) ----------------------------------------------------------------------------


def _group(shape: Shape, size: int | None) -> int:
    if size is not None and size < 1:
        raise SettingsError(f"int4 needs a group size of at least 1, got {size!r}")
    return shape[1] if size is None else min(int(size), shape[1])


def _int4_sizes(shape: Shape) -> list[int | None]:
    return [None, *(g for g in (128, 64, 32) if g < shape[1])]


def _int4_components(shape: Shape, size: int | None, dtype: torch.dtype) -> ComponentSpecs:
    g = _group(shape, size)
    return {
        "codes": (torch.uint8, (shape[0], -(-shape[1] // 2))),
        "scale": (torch.float32, (shape[0], -(-shape[1] // g))),
    }


def _int4_encode(delta: torch.Tensor, size: int | None, dtype: torch.dtype) -> Components:
    rows, cols = delta.shape
    g = _group((rows, cols), size)
    groups = -(-cols // g)
    x = torch.zeros(rows, groups * g, dtype=torch.float32, device=delta.device)
    x[:, :cols] = delta.float()
    x = x.view(rows, groups, g)
    scale = x.abs().amax(-1) / 7.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe.unsqueeze(-1)).clamp_(-7, 7)
    codes = (q.view(rows, -1)[:, :cols] + 8).to(torch.uint8)
    return {"codes": pack_nibbles(codes), "scale": scale.contiguous()}


def _int4_decode(c: Components, shape: Shape, size: int | None) -> torch.Tensor:
    rows, cols = shape
    scale = c["scale"].float()
    g = _group(shape, size)
    q = unpack_nibbles(c["codes"], cols).float() - 8.0
    per_column = scale.repeat_interleave(g, dim=1)[:, :cols]
    return q * per_column


# -- mixed (Delta-CoMe-like) ------------------------------------------------------------------


def _split_rank(shape: Shape, size: int | None) -> tuple[int, int]:
    """(vectors at 8 bits, vectors at 4 bits) of a mixed delta."""
    if size is None or size < 2:
        raise SettingsError(f"mixed needs a rank of at least 2, got {size!r}")
    r = min(int(size), *shape)
    if r < 2:
        raise SettingsError(f"mixed needs a matrix of at least 2 x 2, got {list(shape)}")
    high = max(1, r // 4)
    return high, r - high


def _mixed_sizes(shape: Shape) -> list[int | None]:
    out, inp = shape
    return [r for r in _POWERS if 2 <= r <= min(shape) and r * (out + inp) < out * inp]


def _mixed_components(shape: Shape, size: int | None, dtype: torch.dtype) -> ComponentSpecs:
    out, inp = shape
    high, low = _split_rank(shape, size)
    return {
        "a8": (torch.int8, (out, high)),
        "b8": (torch.int8, (high, inp)),
        "scale8": (torch.float32, (2, high)),
        "a4": (torch.uint8, (low, -(-out // 2))),
        "b4": (torch.uint8, (low, -(-inp // 2))),
        "scale4": (torch.float32, (2, low)),
    }


def _absmax_rows(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x rounded to -levels..levels after scaling by its max|x| / levels: (codes, scales)."""
    scale = x.abs().amax(-1) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / safe.unsqueeze(-1)).clamp_(-levels, levels), scale


def _mixed_encode(delta: torch.Tensor, size: int | None, dtype: torch.dtype) -> Components:
    high, low = _split_rank(tuple(delta.shape), size)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[: high + low].sqrt()
    a = (u[:, : high + low] * root).T.float()  # one singular vector per row
    b = (root.unsqueeze(1) * vh[: high + low]).float()
    qa8, sa8 = _absmax_rows(a[:high], 127)
    qb8, sb8 = _absmax_rows(b[:high], 127)
    qa4, sa4 = _absmax_rows(a[high:], 7)
    qb4, sb4 = _absmax_rows(b[high:], 7)
    return {
        "a8": qa8.T.to(torch.int8).contiguous(),
        "b8": qb8.to(torch.int8).contiguous(),
        "scale8": torch.stack([sa8, sb8]),
        "a4": pack_nibbles((qa4 + 8).to(torch.uint8)),
        "b4": pack_nibbles((qb4 + 8).to(torch.uint8)),
        "scale4": torch.stack([sa4, sb4]),
    }


def _mixed_decode(c: Components, shape: Shape, size: int | None) -> torch.Tensor:
    out, inp = shape
    s8, s4 = c["scale8"].float(), c["scale4"].float()
    a8 = c["a8"].float() * s8[0]
    b8 = c["b8"].float() * s8[1].unsqueeze(1)
    a4 = (unpack_nibbles(c["a4"], out).float() - 8.0) * s4[0].unsqueeze(1)
    b4 = (unpack_nibbles(c["b4"], inp).float() - 8.0) * s4[1].unsqueeze(1)
    return a8 @ b8 + a4.T @ b4


FORMATS: dict[str, DeltaFormat] = {
    f.name: f
    for f in (
        DeltaFormat("lowrank", _lowrank_sizes, _lowrank_components, _lowrank_encode, _lowrank_decode),
        DeltaFormat("sign", lambda shape: [None], _sign_components, _sign_encode, _sign_decode, sized=False),
        DeltaFormat("int4", _int4_sizes, _int4_components, _int4_encode, _int4_decode),
        DeltaFormat("mixed", _mixed_sizes, _mixed_components, _mixed_encode, _mixed_decode),
    )
}
AUTO = "auto"
"""The planner's choice: every format at every size."""


def delta_format(name: str) -> DeltaFormat:
    """The format record named `name`; SettingsError naming the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise SettingsError(f"unknown `delta_format` {name!r}: choose from {', '.join([AUTO, *FORMATS])}") from None


def decode(fmt: str | DeltaFormat, components: Components, shape: Shape, size: int | None) -> torch.Tensor:
    """The float32 delta matrix of `shape` that `components` store (encoded at `size`)."""
    f = delta_format(fmt) if isinstance(fmt, str) else fmt
    return f.decode(components, tuple(shape), size)


def corrected(
    bank_part: torch.Tensor, components: Components, fmt: str | DeltaFormat, size: int | None
) -> torch.Tensor:
    """A bank expert's part plus its decoded delta, in the bank part's dtype: what a slot with
    a delta is served (export and runtime alike)."""
    return (bank_part.float() + decode(fmt, components, tuple(bank_part.shape), size)).to(bank_part.dtype)


def delta_key(layer: str, model: str, expert: int, part: str, component: str) -> str:
    """Stored name of one component of one part of a slot's delta."""
    return f"delta.{layer}.{model}.{expert}.{part}.{component}"
