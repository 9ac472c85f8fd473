"""Spending one byte budget on bank experts and compressed deltas (`merge --mode calibrated --deltas`).

The budget counts bank bytes plus delta bytes against the N variants' expert bytes. For a
few bank sizes between the floor (one bank expert per expert index per layer) and what the
budget allows on its own (`bank_counts`), the calibrated clustering is made as without deltas
(`planners.calibrated.calibrated_plans`); the bytes the bank leaves are then given to deltas:

- every slot served by a bank entry whose stored tensors are not its own expert's has
  options (`slot_options`): share (no delta, 0 bytes), or a delta of each format at each of
  its sizes (`corrections.FORMATS`; one format with `--delta-format`). Each option is costed on
  the slot's own calibration tokens exactly as a shared expert is
  (`calibration.candidate_cost`: the corrected expert is just another candidate), against
  the bank entry's stored tensors (representative or weighted mean) in float32;
- `allocate` spends the bytes greedily where the cost falls most per byte, over the lower
  convex hull of each slot's (bytes, cost) options.

The bank size whose clustering cost minus delta savings is least wins (ties: the smaller
bank). Keeping a slot's own expert is an option through the bank size: a larger bank keeps
more experts apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..analysis.calibration import candidate_cost
from ..analysis.similarity import read_layer
from ..artifact.corrections import AUTO, FORMATS, DeltaFormat, corrected
from ..artifact.reader import Progress
from ..errors import SettingsError
from ..io.checkpoint import Checkpoint, expert_nbytes
from ..io.safetensors_file import torch_dtypes
from .plan import CalibratedInputs, LayerPlan, SlotDelta, stored_bank_part
from .settings import MergeSettings, budget_bytes

BANK_COUNTS = 4
"""Bank sizes compared, from the floor to what the budget allows (evenly spaced)."""


@dataclass(frozen=True)
class Option:
    """One way of serving a slot: `format` None is sharing the bank entry as stored."""

    nbytes: int
    cost: float
    format: str | None = None
    size: int | None = None


@dataclass
class SlotOptions:
    layer: int
    item: int
    """Flat index model * E + expert."""
    options: list[Option]
    """options[0] is sharing (0 bytes)."""


def bank_counts(floor: int, most: int, n: int = BANK_COUNTS) -> list[int]:
    """Up to `n` bank sizes evenly spaced from `floor` to `most` (both included)."""
    if most <= floor:
        return [floor]
    return sorted({floor + round((most - floor) * j / (n - 1)) for j in range(n)})


def formats(name: str | None) -> list[DeltaFormat]:
    return list(FORMATS.values()) if name in (None, AUTO) else [FORMATS[name]]


def candidate_sizes(fmt: DeltaFormat, shapes: list[tuple[int, int]]) -> list[int | None]:
    """The sizes tried for a slot: every size any of its parts' shapes suggests, at which the
    format can store every part (`mixed` cannot store gpt-oss' [1, I] bias parts at any size)."""
    sizes: list[int | None] = []
    for shape in shapes:
        sizes += [x for x in fmt.sizes(shape) if x not in sizes and all(storable(fmt, s, x) for s in shapes)]
    return sorted(sizes, key=lambda x: -1 if x is None else x)


def storable(fmt: DeltaFormat, shape: tuple[int, int], size: int | None) -> bool:
    """Whether `fmt` can store a matrix of `shape` at `size`."""
    try:
        fmt.components(shape, size, torch.float32)
    except SettingsError:
        return False
    return True


def check_delta_format(name: str | None, ckpt: Checkpoint) -> None:
    """Refuse a named delta format that cannot store every expert part of these models at any
    size (`auto` leaves such formats out by itself)."""
    if name in (None, AUTO):
        return
    fmt = FORMATS[name]
    shapes = [tuple(ckpt.expert_shape(p)) for p in ckpt.layout.parts]
    if candidate_sizes(fmt, shapes):  # type: ignore[arg-type]
        return
    bad = [f"{p} {list(s)}" for p, s in zip(ckpt.layout.parts, shapes) if not candidate_sizes(fmt, [s])]  # type: ignore[list-item]
    usable = [f for f, x in FORMATS.items() if candidate_sizes(x, shapes)]  # type: ignore[arg-type]
    raise SettingsError(
        f"delta format {name} cannot store every expert part of {ckpt.layout.architecture} "
        f"({', '.join(bad) or 'at any size'}); choose auto or one of {', '.join(usable)}"
    )


def bank_value(p: LayerPlan, k: int, flat: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Bank entry `k`'s stored tensors, from the layer's experts (`plan.stored_bank_part`)."""
    return {part: stored_bank_part(lambda i: flat[i][part], p, k) for part in flat[p.clusters[k][0]]}


def slot_options(
    ckpt: Checkpoint,
    layer: str,
    flat: list[dict[str, torch.Tensor]],
    inputs: CalibratedInputs,
    li: int,
    item: int,
    bank: dict[str, torch.Tensor],
    fmts: list[DeltaFormat],
) -> list[Option]:
    """Share, or each format at each size, with its calibrated cost and bytes."""
    norm = inputs.costs[li].norm
    share = candidate_cost(ckpt, layer, flat, [item], bank, inputs.acts, norm)
    options = [Option(0, share)]
    if share <= 0:  # no calibration token reached the slot: nothing to correct
        return options
    dtype = torch_dtypes()[ckpt.dtype]
    own = flat[item]
    delta = {p: own[p].float() - bank[p].float() for p in own}
    shapes = {p: tuple(t.shape) for p, t in own.items()}
    for fmt in fmts:
        sizes = candidate_sizes(fmt, list(shapes.values()))
        if not sizes:
            continue
        encoded = {p: fmt.encode_many(delta[p], sizes, dtype) for p in own}
        for j, size in enumerate(sizes):
            candidate = {p: corrected(bank[p], encoded[p][j], fmt, size) for p in own}
            nbytes = sum(fmt.nbytes(shapes[p], size, dtype) for p in own)
            options.append(
                Option(nbytes, candidate_cost(ckpt, layer, flat, [item], candidate, inputs.acts, norm), fmt.name, size)
            )
    return options


def layer_options(
    ckpt: Checkpoint,
    p: LayerPlan,
    li: int,
    flat: list[dict[str, torch.Tensor]],
    inputs: CalibratedInputs,
    fmts: list[DeltaFormat],
    memo: dict | None = None,
) -> list[SlotOptions]:
    """Options of every slot of one layer plan that its bank entry does not store exactly.
    `memo` keeps them by (slot, bank entry's content) across the bank sizes compared."""
    digests = inputs.digests[li]
    memo = {} if memo is None else memo
    out = []
    for k, members in enumerate(p.clusters):
        rep = p.representatives[k]
        weights = p.weights[k] if p.weights else None
        content = (
            (li, digests[rep]) if rep is not None else (li, tuple(members), None if weights is None else tuple(weights))
        )
        bank = None
        for i in members:
            if rep is not None and digests[i] == digests[rep]:
                continue  # served by its own expert's bytes
            if (i, content) not in memo:
                bank = bank if bank is not None else bank_value(p, k, flat)
                memo[i, content] = slot_options(ckpt, p.layer, flat, inputs, li, i, bank, fmts)
            out.append(SlotOptions(li, i, memo[i, content]))
    return out


def hull(options: list[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, cost), from sharing (index 0) on: each step
    saves less cost per byte than the one before."""
    order = sorted(range(1, len(options)), key=lambda j: (options[j].nbytes, options[j].cost, j))
    path = [0]
    for j in order:
        if options[j].cost >= options[path[-1]].cost:
            continue
        while len(path) >= 2 and _rate(options, path[-2], path[-1]) <= _rate(options, path[-1], j):
            path.pop()
        path.append(j)
    return path


def _rate(options: list[Option], a: int, b: int) -> float:
    return (options[a].cost - options[b].cost) / (options[b].nbytes - options[a].nbytes)


def allocate(slots: list[SlotOptions], nbytes: int) -> tuple[list[int], float]:
    """Greedy: take the hull steps of all slots in order of cost saved per byte while they
    fit in `nbytes`. Returns (chosen option index per slot, total cost)."""
    paths = [hull(s.options) for s in slots]
    steps = [
        (-_rate(s.options, path[j - 1], path[j]), n, j)
        for n, (s, path) in enumerate(zip(slots, paths))
        for j in range(1, len(path))
    ]
    steps.sort()
    at = [0] * len(slots)
    left = nbytes
    for _, n, j in steps:
        if at[n] != j - 1:
            continue
        extra = slots[n].options[paths[n][j]].nbytes - slots[n].options[paths[n][j - 1]].nbytes
        if extra <= left:
            left -= extra
            at[n] = j
    chosen = [path[j] for path, j in zip(paths, at)]
    return chosen, sum(s.options[c].cost for s, c in zip(slots, chosen))


def plan_with_deltas(
    ckpts: list[Checkpoint],
    s: MergeSettings,
    inputs: CalibratedInputs,
    clustering: Callable[[int], list[LayerPlan]],
    progress: Progress | None = None,
) -> list[LayerPlan]:
    """Calibrated plans with deltas, within `s.budget` bytes of bank plus deltas.
    `clustering(count)` is the calibrated clustering into at most `count` bank experts."""
    ref = ckpts[0]
    E, L, N = ref.num_experts, len(ref.moe_layers), len(ckpts)
    one = expert_nbytes(ref)
    budget = budget_bytes(s.budget, ckpts)
    candidates: dict[int, list[LayerPlan]] = {}
    error: SettingsError | None = None
    for count in bank_counts(L * E, min(budget // one, N * L * E)):
        try:
            candidates[count] = clustering(count)
        except SettingsError as e:  # the same-model rule may forbid a bank this small
            error = e
    if not candidates:
        assert error is not None
        raise error
    fmts = formats(s.delta_format)
    slots: dict[int, list[SlotOptions]] = {count: [] for count in candidates}
    for li, layer in enumerate(ref.moe_layers):
        if progress:
            progress("deltas", li, L)
        flat = read_layer(ckpts, layer).flat
        memo: dict = {}
        for count, plans in candidates.items():
            slots[count] += layer_options(ref, plans[li], li, flat, inputs, fmts, memo)
    if progress:
        progress("deltas", L, L)
    best = None
    for count, plans in candidates.items():
        left = budget - sum(len(p.clusters) for p in plans) * one
        chosen, cost = allocate(slots[count], left)
        if best is None or cost < best[0]:
            best = (cost, count, chosen)
    _, count, chosen = best
    plans = candidates[count]
    for slot, c in zip(slots[count], chosen):
        option = slot.options[c]
        if option.format is not None:
            m, e = divmod(slot.item, E)
            plans[slot.layer].deltas.append(SlotDelta(m, e, option.format, option.size))
    for p in plans:
        p.deltas.sort(key=lambda d: (d.model, d.expert))
    return plans
