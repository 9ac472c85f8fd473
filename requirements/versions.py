"""The dependency versions in play, for the Makefile's lock targets (docs/dependencies.md).

python requirements/versions.py            installed vs locked version of each direct dependency
python requirements/versions.py --lowest   pip constraints pinning each direct dependency
                                           (dev extra included) to pyproject's lower bound;
                                           torch is left out: the Makefile's TORCH picks it
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)$")


def normalize(name: str) -> str:
    """PEP 503 name: `huggingface_hub` and `Huggingface-Hub` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def direct() -> dict[str, str]:
    """Every direct dependency (dev extra included) -> its version specifier in pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out: dict[str, str] = {}
    for line in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        name, spec = REQUIREMENT.match(line).groups()
        out[normalize(name)] = spec.strip()
    return out


def lower_bound(spec: str) -> str | None:
    found = re.search(r">=\s*([^,\s]+)", spec)
    return found[1] if found else None


def locked() -> dict[str, str]:
    """The lock's pins, by normalized name."""
    pins = (line.split("==") for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#"))
    return {normalize(name): version.strip() for name, version in pins}


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str]) -> int:
    if argv == ["--lowest"]:
        for name, spec in direct().items():
            if name != "torch" and (low := lower_bound(spec)) is not None:
                print(f"{name}=={low}")
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    pins = locked()
    for name, spec in direct().items():
        now, pin = installed(name), pins.get(name, "Makefile" if name == "torch" else None)
        mark = "" if now == pin or pin == "Makefile" else "   <- not the locked version"
        print(f"{name:20} {now or '-':12} locked {pin or '-':12} pyproject {spec}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
