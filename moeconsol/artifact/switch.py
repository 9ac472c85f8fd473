"""Changing an artifact that exists (`moeconsol add`, `remove`): new files beside the old
ones, then one atomic switch of manifest.json.

A change never rewrites a file the current manifest lists. Its new files carry the new
generation in their names (`generation_prefix`), so they cannot be files the current
manifest lists; a crash before the switch leaves only files no manifest lists, which the
next change of that generation overwrites. The switch is `os.replace` of a complete,
fsynced manifest: a reader opens either the old manifest, with every file it lists
unchanged, or the new one, with every file it lists complete.

Written to another directory (`-o NEW`) instead, the files the new manifest keeps are
hard-linked from the old artifact (copied across file systems) into the new one, which is
renamed into place when complete (`writer.atomic_directory`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from ..io.writer import _sigterm_as_interrupt, atomic_directory, copy_file, write_all
from .manifest import MANIFEST, Manifest
from .reader import Progress

MANIFEST_TMP = ".manifest.json.tmp-"
"""Prefix of the complete new manifest waiting to replace manifest.json (a SIGKILL just
before the switch leaves one behind: harmless, and deleted by the next change)."""


def generation_prefix(kind: str, generation: int) -> str:
    """Shard name prefix of the files generation `generation` writes (`bank-g0003`)."""
    return f"{kind}-g{generation:04d}"


def switch_manifest(path: Path, manifest: Manifest, progress: Progress | None = None) -> int:
    """Replace `path`/manifest.json with `manifest` atomically (write, fsync, rename, fsync
    the directory). Returns the manifest's size in bytes."""
    text = manifest.dumps().encode()
    fd, tmp = tempfile.mkstemp(prefix=MANIFEST_TMP, dir=path)
    try:
        try:
            write_all(fd, text)
            os.fsync(fd)
        finally:
            os.close(fd)
        if progress:
            progress("switch", 0, 1)
        os.replace(tmp, path / MANIFEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path)
    if progress:
        progress("switch", 1, 1)
    return len(text)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(path: Path) -> None:
    """Delete what an interrupted change left: a new manifest that never replaced the old."""
    for p in path.glob(f"{MANIFEST_TMP}*"):
        p.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """`target` as a hard link to `source` (files of an artifact are never rewritten), or a
    copy where the two lie on different file systems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        copy_file(source, target)


@contextlib.contextmanager
def changed_artifact(
    path: Path, out: Path | None, force: bool = False, progress: Progress | None = None
) -> Iterator[tuple[Path, Callable[[Manifest], int]]]:
    """Yield (the directory to write new files into, commit(manifest) -> its bytes).

    In place (`out` None): new files go into `path`; commit switches the manifest, and on an
    exception before it the files written are not listed anywhere (the caller removes them).
    To `out`: new files go into a temporary directory beside it; commit links in every other
    file the manifest lists and writes the manifest; the directory becomes `out` on exit."""
    if out is None:
        remove_leftovers(path)
        with _sigterm_as_interrupt():  # so that the caller's cleanup runs on SIGTERM too
            yield path, lambda m: switch_manifest(path, m, progress)
        return
    with atomic_directory(out, force=force, inputs=[path]) as tmp:

        def commit(manifest: Manifest) -> int:
            for name in manifest.files:
                if not (tmp / name).exists():
                    link_or_copy(path / name, tmp / name)
            text = manifest.dumps().encode()
            (tmp / MANIFEST).write_bytes(text)
            if progress:
                progress("switch", 1, 1)
            return len(text)

        yield tmp, commit


def delete_unlisted(path: Path, before: Manifest, after: Manifest) -> list[str]:
    """After a switch: delete the files `before` listed that `after` does not (and the
    models/<name>/ directories left empty). Returns their names."""
    gone = sorted(set(before.files) - set(after.files))
    for name in gone:
        (path / name).unlink(missing_ok=True)
    for d in {(path / name).parent for name in gone}:
        if d != path and d.is_dir() and not any(d.iterdir()):
            shutil.rmtree(d, ignore_errors=True)
    return gone
