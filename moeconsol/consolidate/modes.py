"""The merge modes: `Mode`, and the check of a mode's name.

Kept apart from `settings.py` (whose checks import torch) so that the command line refuses
an unknown mode before it imports anything heavy.
"""

from __future__ import annotations

from enum import Enum

from ..errors import SettingsError


class Mode(str, Enum):
    """A merge mode; its value is the command line's `--mode` and the manifest's `mode`."""

    LOSSLESS = "lossless"
    THRESHOLD = "threshold"
    BUDGET = "budget"
    CALIBRATED = "calibrated"
    REFERENCE = "reference"
    AVERAGE = "average"
    TASK_ARITHMETIC = "task-arithmetic"
    TIES = "ties"

    def __str__(self) -> str:
        return self.value


def check_mode(mode: Mode | str) -> Mode:
    """`mode` as a `Mode`; SettingsError naming the modes if it is none of them."""
    names = [m.value for m in Mode]
    if mode not in names:
        raise SettingsError(f"unknown `mode` {mode!r}: choose from {', '.join(names)}")
    return Mode(mode)
