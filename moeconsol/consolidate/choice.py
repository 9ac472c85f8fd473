"""Which measured plan merge writes: figures per variant, the max-min rule with its margin, and
the variants that fall below their base (pure functions of the held-back losses).

A variant's **figure** under a plan says how much it keeps, 1.0 = as much as its own model:

- `retained_gain` = (L_base - L) / (L_base - L_own), when its base's held-back loss is known
  and its own model is better than the base there (L_own < L_base); 0 = no better than the
  base, < 0 = worse than the base;
- `loss_ratio` = L_own / L otherwise (no base known, the base itself, or no gain on the
  held-back data).

L is the consolidated variant's held-back loss, L_own its own model's, L_base the base's (all
on the variant's held-back data, `analysis.heldout`). A figure that is not a finite number
(a plan that made the loss NaN) counts as the worst.

**The rule** (`choose`): a candidate is *admissible* when none of its variants falls below
that variant's best figure under any candidate by more than `margin`. Among the admissible
candidates, the one whose worst variant keeps the most is written; when none is admissible,
the one whose worst variant keeps the most among all. Ties go to the earlier candidate (the
calibrated plan first). In the rule a figure above 1 counts as 1: a plan that serves a
variant better than its own model does (another variant's experts happening to suit its
held-back data) keeps all of it, not more, so that such luck neither wins the max-min nor
passes over candidates that keep the variant whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MARGIN = 0.05
"""How far (in figure units: 0.05 = 5 points of retained gain) a variant may fall below its
best figure under another candidate before the rule passes a candidate over."""
RETAINED_GAIN = "retained_gain"
LOSS_RATIO = "loss_ratio"


@dataclass(frozen=True)
class Losses:
    """One variant's held-back losses: its own model's, its base's (None: unknown)."""

    own: float
    base: float | None

    @property
    def score(self) -> str:
        """Which figure this variant is scored by (module docstring)."""
        if self.base is not None and math.isfinite(self.base) and self.own < self.base:
            return RETAINED_GAIN
        return LOSS_RATIO

    def figure(self, loss: float) -> float:
        """The figure of a plan under which this variant's held-back loss is `loss`."""
        if not math.isfinite(loss):
            return -math.inf
        if self.score == RETAINED_GAIN:
            assert self.base is not None
            return (self.base - loss) / (self.base - self.own)
        return self.own / loss if loss > 0 else (1.0 if self.own <= 0 else math.inf)

    def below_base(self, loss: float) -> bool:
        """Whether a plan leaves this variant worse than its base (retained gain < 0)."""
        return self.score == RETAINED_GAIN and self.figure(loss) < 0


def worst(figures: dict[str, float]) -> float:
    """The worst variant's figure as the rule counts it (NaN the worst, above 1 as 1)."""
    return min((counted(f) for f in figures.values()), default=-math.inf)


def best_figures(figures: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each variant's best figure under any candidate, as the rule counts it."""
    variants = next(iter(figures.values())).keys()
    return {v: max(counted(f[v]) for f in figures.values()) for v in variants}


def admissible(figures: dict[str, dict[str, float]], margin: float) -> list[str]:
    """The candidates (in order) under which no variant falls more than `margin` below its best."""
    best = best_figures(figures)
    return [c for c, f in figures.items() if all(counted(f[v]) >= best[v] - margin for v in best)]


def choose(figures: dict[str, dict[str, float]], margin: float = MARGIN) -> str:
    """The candidate to write (module docstring): candidate -> variant -> figure, in order."""
    if not figures:
        raise ValueError("no candidate to choose from")
    pool = admissible(figures, margin) or list(figures)
    return max(pool, key=lambda c: (worst(figures[c]), -list(figures).index(c)))


def counted(f: float) -> float:
    """A figure as the rule counts it: NaN as -inf (the worst), above 1 as 1."""
    return -math.inf if math.isnan(f) else min(f, 1.0)
