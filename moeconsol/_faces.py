"""Package faces that import nothing until a name is used.

Each subpackage's `__init__` names its public API with `face(__name__, {module: names})`.
`from moeconsol.serving import Runtime` then imports `moeconsol.serving.runtime` at that
moment, not before: a command pays only for the modules it runs (`moeconsol analyze` never
imports torch, FastAPI or the runtime), which is what start-up time needs (PEP 562).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def face(
    package: str, exports: dict[str, list[str]]
) -> tuple[Callable[[str], object], Callable[[], list[str]], list[str]]:
    """(`__getattr__`, `__dir__`, `__all__`) of a package whose public names live in its modules."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{home[name]}"), name)

    def __dir__() -> list[str]:
        return sorted(home)

    return __getattr__, __dir__, sorted(home)
