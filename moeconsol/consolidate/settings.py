"""How to consolidate: `MergeSettings` (the modes are `modes.Mode`), the checks every mode shares, and budgets.

Each mode's own checks (which options it takes, what it needs) are its planner's
(`planners.Planner.check`); `check_settings` here checks what holds in every mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..analysis.similarity import METRICS
from ..artifact import nonexpert_codec as codec
from ..artifact.corrections import AUTO, delta_format
from ..errors import SettingsError
from ..io.checkpoint import Checkpoint, expert_nbytes
from ..io.sizes import format_bytes, parse_size
from .grouping import REPRESENTATIVES
from .modes import Mode, check_mode

DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass
class MergeSettings:
    """How to consolidate; validated by `check_settings` and the mode's planner."""

    mode: Mode | str = Mode.LOSSLESS
    """A `Mode` or its value (`"lossless"`)."""
    metric: str | None = None
    """Similarity for threshold and budget modes (default cosine); unused in lossless."""
    threshold: float | None = None
    budget: str | None = None
    """Bytes of bank (`40GB`) or a fraction of all experts (`0.5`)."""
    representative: str = "medoid"
    shard_size: int = DEFAULT_SHARD_SIZE
    seed: int = 0
    """Seed of the Gaussian probes when the metric is cka (as in analyze)."""
    base: str | None = None
    """The pre-trained checkpoint (PATH or hub id) for task-arithmetic and ties."""
    density: float = 0.2
    """ties: fraction of each task vector's entries kept (top-k by magnitude)."""
    scale: float = 1.0
    """task-arithmetic and ties: lambda, the factor on the summed / merged task vectors."""
    calibration: dict[str, str] | None = None
    """calibrated mode: model name -> calibration file (text, or JSONL for seq2seq);
    the key "*" applies to every model not named."""
    calibration_tokens: int = 512
    """calibrated mode: routed inputs kept per (model, layer, expert)."""
    deltas: bool = False
    """calibrated mode: slots served by a bank expert not their own may carry a compressed
    correction (module deltas); the budget then counts bank plus delta bytes."""
    delta_format: str | None = None
    """With deltas: `auto` (every format, the default) or one `corrections.FORMATS` name."""
    holdout: float | None = None
    """calibrated mode: share of each calibration file held back from planning to measure the
    candidate plans on (None: `heldout.DEFAULT_HELDOUT`, 0.2; 0: no check, the calibrated plan
    made from all the data, as before the check existed)."""
    check_margin: float | None = None
    """calibrated mode: the margin of the held-back choice rule (`choice`; None: `MARGIN`, 0.05)."""
    non_expert_codec: str = codec.XOR_ZSTD
    """How a non-expert tensor's versions after the first are stored: encoded against the
    first (codec.XOR_ZSTD) where that takes at most `nonexpert.MAX_DELTA_RATIO` of whole,
    or whole (codec.NONE)."""


def check_settings(s: MergeSettings) -> MergeSettings:
    """Refuse an unknown mode and what is wrong in every mode; the mode as a `Mode`."""
    mode = check_mode(s.mode)
    for option, value in (("scale", s.scale), ("density", s.density), ("threshold", s.threshold)):
        if value is not None and not math.isfinite(value):
            raise SettingsError(f"`{option}` must be a finite number, got {value}")
    if s.representative not in REPRESENTATIVES:
        raise SettingsError(f"unknown `representative` {s.representative!r}: choose from {', '.join(REPRESENTATIVES)}")
    if s.representative == "best" and mode != Mode.CALIBRATED:
        raise SettingsError(
            "`representative` best needs `mode` calibrated (it compares members and the mean on calibration data)"
        )
    if s.shard_size <= 0:
        raise SettingsError("`shard_size` must be more than 0 bytes")
    if s.deltas and mode != Mode.CALIBRATED:
        raise SettingsError(
            f"`deltas` apply to `mode` calibrated only, not {mode} (they are costed on calibration data)"
        )
    if s.delta_format is not None:
        if not s.deltas:
            raise SettingsError(f"`delta_format` {s.delta_format} needs `deltas` turned on")
        if s.delta_format != AUTO:
            delta_format(s.delta_format)
    if s.holdout is not None and not (math.isfinite(s.holdout) and 0 <= s.holdout < 1):
        raise SettingsError(
            f"`holdout` must be at least 0 and less than 1 (a share of each calibration file), got {s.holdout}"
        )
    if s.check_margin is not None and not (math.isfinite(s.check_margin) and s.check_margin >= 0):
        raise SettingsError(f"`check_margin` must be a finite number of at least 0, got {s.check_margin}")
    if s.non_expert_codec not in codec.CHOICES:
        raise SettingsError(
            f"unknown `non_expert_codec` {s.non_expert_codec!r}: choose from {', '.join(codec.CHOICES)}"
        )
    return replace(s, mode=mode)


QUANTIZED_MODES = (Mode.LOSSLESS, Mode.THRESHOLD, Mode.BUDGET, Mode.REFERENCE)
"""The modes that bank a quantized release's experts: each bank entry is one of the inputs'
experts, stored as it was (codes and scales); the others compute new expert values."""


def check_quantized(s: MergeSettings, ckpts: list[Checkpoint]) -> None:
    """Refuse, for a quantized release, what would compute new expert values: the merging
    baselines, calibrated mode, a mean representative."""
    q = ckpts[0].quantization
    if q is None:
        return
    if any(c.quantization is None for c in ckpts) and s.mode != Mode.LOSSLESS:
        raise SettingsError(
            f"mode {s.mode}: a {q.method} release beside unquantized fine-tunes merges in mode lossless only (a bank "
            "entry either stores one of the release's experts as released, which the fine-tunes' equal values "
            "share, or a fine-tune's own expert)"
        )
    if s.mode not in QUANTIZED_MODES or s.representative == "mean":
        what = f"mode {s.mode}" if s.mode not in QUANTIZED_MODES else "representative mean"
        raise SettingsError(
            f"{what} computes new expert values, but {ckpts[0].name!r} is a {q.method} release whose experts are "
            f"banked as stored (codes and scales): choose mode {', '.join(m.value for m in QUANTIZED_MODES)}, "
            "with representative first or medoid"
        )


APPLIES_TO: dict[str, tuple[Mode, ...]] = {
    "metric": (Mode.THRESHOLD, Mode.BUDGET, Mode.CALIBRATED),
    "threshold": (Mode.THRESHOLD,),
    "budget": (Mode.BUDGET, Mode.CALIBRATED, Mode.REFERENCE),
    "base": (Mode.TASK_ARITHMETIC, Mode.TIES, Mode.CALIBRATED),
    "calibration": (Mode.CALIBRATED,),
    "holdout": (Mode.CALIBRATED,),
    "check_margin": (Mode.CALIBRATED,),
}
"""The settings only some modes take -> those modes; every other mode refuses them (`refuse`)."""


def refuse(s: MergeSettings, mode: Mode) -> None:
    """Refuse the first given setting that `mode` does not take (`APPLIES_TO`), naming the modes that take it."""
    given = {
        "metric": s.metric,
        "threshold": s.threshold,
        "budget": s.budget,
        "base": s.base,
        "calibration": s.calibration,
        "holdout": s.holdout,
        "check_margin": s.check_margin,
    }
    for option, modes in APPLIES_TO.items():
        if given[option] not in (None, {}) and mode not in modes:
            names = [m.value for m in modes]
            which = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
            raise SettingsError(f"`{option}` applies to `mode` {which} only, not {mode}")


def checked_metric(s: MergeSettings) -> str:
    """The similarity metric of a mode that measures experts: cosine unless given."""
    metric = s.metric or "cosine"
    if metric not in METRICS:
        raise SettingsError(f"unknown `metric` {metric!r}: choose from {', '.join(METRICS)}")
    return metric


def check_budget(s: MergeSettings, mode: Mode, ckpts: list[Checkpoint]) -> None:
    """A budgeted mode's budget: given, at least the floor."""
    if s.budget is None:
        raise SettingsError(f"`mode` {mode} needs a `budget`: bytes of bank (40GB) or a fraction of all experts (0.5)")
    budget_experts(s.budget, ckpts)


def calibration_file(s: MergeSettings, name: str) -> str:
    """The calibration file of model `name` (its own, or the one given for every model)."""
    files = s.calibration or {}
    if name in files:
        return files[name]
    if "*" in files:
        return files["*"]
    raise SettingsError(
        f"`mode` calibrated needs calibration data for every model; none for {name!r}: give `calibration` {name}=FILE"
    )


# -- budgets ------------------------------------------------------------------------------


def budget_slots(budget: str, total: int, one: int) -> tuple[int, str]:
    """The experts a budget holds (a fraction of `total` experts, or bytes of experts of `one`
    byte each), and the budget as text for messages; no floor or ceiling applied."""
    text = str(budget).strip()
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    if fraction is not None and fraction <= 1.0:
        if fraction <= 0:
            raise SettingsError(
                f"`budget` {text!r} must be more than 0: a fraction of all experts (0.5) or bytes (40GB)"
            )
        return int(fraction * total + 1e-9), f"{fraction:g} of {total} experts"
    nbytes = parse_size(text)
    return nbytes // one, format_bytes(nbytes)


def budget_experts(budget: str, ckpts: list[Checkpoint]) -> int:
    """How many bank experts (over all layers) a budget allows, refusing one below the floor
    of one model's worth of experts (E per layer)."""
    ref = ckpts[0]
    layers, experts = len(ref.moe_layers), ref.num_experts
    total = len(ckpts) * layers * experts
    one = expert_nbytes(ref)
    slots, what = budget_slots(budget, total, one)
    floor = layers * experts
    if slots < floor:
        raise SettingsError(
            f"`budget` too small: {what} holds {slots} experts, but the bank needs at least one model's worth: "
            f"{floor} experts ({format_bytes(floor * one)}, or a fraction of {floor / total:.4g})"
        )
    return min(slots, total)


def budget_bytes(budget: str, ckpts: list[Checkpoint]) -> int:
    """Bytes of expert memory a budget allows (a fraction of all N models' expert bytes, or
    bytes), at most all of them; the floor is checked by `budget_experts`."""
    ref = ckpts[0]
    total = len(ckpts) * len(ref.moe_layers) * ref.num_experts * expert_nbytes(ref)
    budget_experts(budget, ckpts)
    text = str(budget).strip()
    try:
        fraction = float(text)
    except ValueError:
        fraction = None
    nbytes = int(fraction * total + 1e-9) if fraction is not None and fraction <= 1.0 else parse_size(text)
    return min(nbytes, total)
