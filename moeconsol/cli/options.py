"""Values of the options several commands share: `NAME=FILE` lists and budget lists."""

from __future__ import annotations

from pathlib import Path

from ..errors import SettingsError


def parse_named_files(items: list[str], option: str, allow_unnamed: bool = True) -> dict[str, str]:
    """`NAME=FILE` items -> {name: file}; a bare FILE is keyed "*" (every model not named)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" in item and not Path(item).exists():
            name, _, file = item.partition("=")
            if not name or not file:
                raise SettingsError(f"bad {option} value {item!r}: expected NAME=FILE")
        elif allow_unnamed:
            name, file = "*", item
        else:
            raise SettingsError(
                f"bad {option} value {item!r}: expected NAME=FILE (the variant's name, then its data file)"
            )
        if name in out:
            raise SettingsError(f"{option} names {name!r} twice")
        out[name] = file
    return out


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SettingsError(
            f"--budgets {text!r}: give fractions of all experts separated by commas, e.g. 1.0,0.75,0.5,0.25"
        ) from e
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise SettingsError(f"--budgets {text!r}: every budget must be a fraction in (0, 1]")
    return budgets
