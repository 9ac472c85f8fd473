"""An artifact's consolidation settings (the manifest's `consolidation`) as people read them."""

from __future__ import annotations

from ..io.sizes import format_bytes

_BYTES = {"budget_bytes"}
"""Settings that count bytes."""


def settings_line(consolidation: dict) -> str:
    """The scalar settings, given ones only: `mode calibrated, budget 0.5, deltas, budget bytes 294.9 KB`."""
    parts = []
    for key, value in consolidation.items():
        name = key.replace("_", " ")
        if value is None or value is False or isinstance(value, dict):
            continue
        if value is True:
            parts.append(name)
        else:
            parts.append(f"{name} {format_bytes(value) if key in _BYTES else value}")
    return ", ".join(parts)


def mapping_lines(consolidation: dict) -> list[str]:
    """One line per setting that maps models to values: `calibration: base=base.txt, code=code.txt`."""
    return [
        f"{key.replace('_', ' ')}: {', '.join(f'{k}={v}' for k, v in value.items())}"
        for key, value in consolidation.items()
        if isinstance(value, dict) and value
    ]
