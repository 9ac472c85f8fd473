"""Byte counts as people write them (`5GB`, `500MB`, `2GiB`) and as commands print them;
torch-free, for commands that import nothing heavy (`inspect`)."""

from __future__ import annotations

import re

from ..errors import SettingsError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from `5GB`, `500MB`, `2GiB` or a plain integer (decimal units are powers of 1000)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or m[2].upper() not in _UNITS:
        raise SettingsError(f"bad size {text!r}: give bytes like 5GB, 500MB, 2GiB or 1000000")
    value = int(float(m[1]) * _UNITS[m[2].upper()])
    if value <= 0:
        raise SettingsError(f"bad size {text!r}: must be more than 0 bytes")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
