"""Names and paths that come from outside: nothing is ever read or written outside the
directory it belongs to.

Paths read from a manifest or a checkpoint index, and model names (which become directory
names inside an artifact), are data written by someone else. Each is checked here before it
is joined to a directory: relative, no `..`, no empty or `.` component, no backslash, no NUL;
`inside` also resolves symlinks and checks the result stays in the directory.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from ..errors import UnsafePathError

NAME_RULE = "1 to 64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_safe_name(name: object) -> bool:
    """A model name usable as a directory name: see NAME_RULE."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: str, what: str = "model name") -> str:
    if not is_safe_name(name):
        raise UnsafePathError(f"bad {what} {name!r}: a name must be {NAME_RULE}")
    return name


def relative_path_problem(path: object, plain: bool = False) -> str | None:
    """Why `path` is not a safe relative path (None when it is). `plain`: a bare file name,
    no directory part."""
    if not isinstance(path, str):
        return f"{path!r} is not a string"
    if not path or "\\" in path or "\0" in path:
        return f"{path!r} is not a relative path"
    p = PurePosixPath(path)
    if p.is_absolute() or path.startswith("~"):
        return f"{path!r} is absolute"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return f"{path!r} is not a plain relative path (empty, '.' or '..' component)"
    if plain and len(parts) != 1:
        return f"{path!r} is not a plain file name"
    return None


def check_relative(path: object, where: str, plain: bool = False) -> str:
    """`path` itself when it is a safe relative path; otherwise UnsafePathError naming `where`."""
    problem = relative_path_problem(path, plain)
    if problem:
        raise UnsafePathError(f"{where}: unsafe path {problem}; refusing to read or write outside the directory")
    return path  # type: ignore[return-value]


def inside(root: Path, relative: str, where: str) -> Path:
    """`root / relative`, refused unless it is a safe relative path whose resolved location
    (symlinks followed) stays inside `root`."""
    check_relative(relative, where)
    target = root / relative
    real_root = root.resolve()
    real = target.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(
            f"{where}: {relative!r} resolves outside {root} (a symbolic link?); refusing to follow it"
        )
    return target


def is_regular_file(path: Path) -> bool:
    """True for a regular file (symlinks followed); False for a FIFO, device, directory or
    nothing, so that opening it can never block."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def within(path: Path, other: Path) -> bool:
    """Whether `path` is `other` or lies inside it (both resolved)."""
    a, b = path.resolve(), other.resolve()
    return a == b or b in a.parents
