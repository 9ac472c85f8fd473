"""Reading many stored tensors straight into memory the caller already holds (the runtime's
bank and flat buffers): each byte range is read once, into its final place, files read on
several threads at once, each file's sha256 computed on the bytes as they land (no second
pass over the file, no intermediate tensor, no copy). A file is checked as `Artifact.read`
checks it (size, headers, dtype and shape of every tensor, sha256 unless the artifact was
opened with `checksums=False`); a damaged file raises `DamagedArtifactError` naming it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import ArtifactError, DamagedArtifactError
from ..io.safetensors_file import TensorInfo, read_into, torch_dtypes
from ..io.safety import inside
from .reader import Artifact, check_files

READERS = 4
"""files read at once (reads in flight; hashing runs on the same threads)"""
CHUNK = 8 << 20
"""bytes read and hashed at a time (hashed while still in the CPU's cache)"""


def storable(art: Artifact, key: str, target: torch.Tensor) -> bool:
    """Whether `key` can be read straight into `target`: stored whole (not encoded), of
    `target`'s dtype and shape, and `target` contiguous host memory."""
    entry = art.spec.shapes.get(key)
    return (
        key not in art.spec.encodings
        and entry is not None
        and target.device.type == "cpu"
        and target.is_contiguous()
        and target.dtype == torch_dtypes().get(entry.dtype)
        and tuple(target.shape) == tuple(entry.shape)
    )


def read_in_place(
    art: Artifact,
    places: dict[str, list[torch.Tensor]],
    done: Callable[[str], None] | None = None,
    readers: int = READERS,
) -> None:
    """Fill every tensor in `places` (stored key -> the tensors that get its value; each
    `storable`) with the stored value; `done(key)` after each key (under a lock)."""
    by_file: dict[str, list[str]] = {}
    for key, targets in places.items():
        if not all(storable(art, key, t) for t in targets):
            raise ArtifactError(f"{art.path}: {key} cannot be read in place (encoded, or another dtype or shape)")
        file = art.spec.weight_map.get(key)
        if file is None:
            raise ArtifactError(f"{art.path}: no stored tensor {key!r}")
        by_file.setdefault(file, []).append(key)
    fresh = [f for f in by_file if f not in art._checked]
    _raise_first(art, check_files(art, fresh, checksums=False))  # sizes and headers, before any read
    lock = threading.Lock()

    def report(key: str) -> None:
        if done:
            with lock:
                done(key)

    def one_file(file: str) -> str | None:
        ranges = sorted(((art._headers[file][k], places[k], k) for k in by_file[file]), key=lambda r: r[0].start)
        return _read_file(art, file, ranges, art.checksums and file not in art._checked, report)

    with ThreadPoolExecutor(max(1, min(readers, len(by_file)))) as pool:
        problems = [p for p in pool.map(one_file, list(by_file)) if p]
    _raise_first(art, problems)
    art._checked.update(fresh)


def _read_file(
    art: Artifact,
    file: str,
    ranges: list[tuple[TensorInfo, list[torch.Tensor], str]],
    hashing: bool,
    report: Callable[[str], None],
) -> str | None:
    """Read each range into its first target (copied to the others), the bytes between them
    into a scratch buffer, hashing everything in file order; a problem, or None."""
    path = inside(art.path, file, "files")
    h = hashlib.sha256() if hashing else None
    scratch = memoryview(bytearray(CHUNK)) if hashing else None
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        for info, targets, key in ranges:
            if h is not None:
                pos = _hash_gap(fd, h, scratch, pos, info.start, path)
            view = memoryview(targets[0].view(-1).view(torch.uint8).numpy())
            for at in range(0, info.nbytes, CHUNK):
                chunk = view[at : at + CHUNK]
                read_into(fd, chunk, info.start + at, path)
                if h is not None:
                    h.update(chunk)
            for other in targets[1:]:
                other.copy_(targets[0])
            pos = info.end
            report(key)
        if h is None:
            return None
        _hash_gap(fd, h, scratch, pos, art.spec.files[file].size, path)
    finally:
        os.close(fd)
    if h.hexdigest() != art.spec.files[file].sha256:
        return f"{file}: sha256 mismatch (content damaged)"
    return None


def _hash_gap(fd: int, h, scratch: memoryview, start: int, end: int, path) -> int:
    """Hash the file's bytes [start, end) through `scratch`; returns `end`."""
    while start < end:
        chunk = scratch[: min(len(scratch), end - start)]
        read_into(fd, chunk, start, path)
        h.update(chunk)
        start += len(chunk)
    return end


def _raise_first(art: Artifact, problems: list[str]) -> None:
    if problems:
        raise DamagedArtifactError(
            f"{art.path}: damaged artifact: {problems[0]} (run `moeconsol verify` for the full list)"
        )
