"""Writing outputs safely: atomic directories and streaming safetensors shards.

Two rules shape this module:

- **Nothing half-written.** An output directory is built in a hidden temporary directory
  beside it (`.OUT.tmp-XXXX`) and renamed into place only when complete. An exception,
  Ctrl-C or SIGTERM removes the temporary directory; a SIGKILL can leave only that hidden
  directory behind, never OUT.
- **Never a whole shard in memory.** Every tensor to be written is declared up front (name,
  dtype, shape), so each file's safetensors header is known before its first byte of data:
  the header is written first and each tensor's bytes follow as they are produced, one
  tensor (or one piece of a tensor) at a time; a tensor stored unchanged from an input is
  copied by the kernel from its byte range. A file is hashed (sha256) while written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OutputError, SafetensorsError, SettingsError
from .checkpoint import SIDE_FILES
from .safetensors_file import ITEMSIZE, TensorInfo, dtype_names, iter_chunks
from .safety import within
from .sizes import format_bytes, parse_size  # noqa: F401 (re-exported: where callers know them from)

# -- atomic directories -------------------------------------------------------------------


_CHECKPOINT_FILES = ("model.safetensors.index.json",)
"""Besides SIDE_FILES and *.safetensors, the files a checkpoint directory may hold."""


def _replaceable(out: Path) -> bool:
    """An empty directory; an artifact (manifest.json, safetensors files, models/); or a
    checkpoint that holds nothing but checkpoint files (config, tokenizer, safetensors,
    index). Anything else in it (notes, code, a subdirectory) makes it irreplaceable."""
    entries = list(out.iterdir())
    names = {p.name for p in entries}
    if "manifest.json" in names:
        return all(_artifact_entry(p) for p in entries)
    if "config.json" in names:
        return all(_checkpoint_entry(p) for p in entries)
    return not entries


def _plain_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _artifact_entry(p: Path) -> bool:
    if p.name == "models":
        return p.is_dir() and not p.is_symlink()
    return _plain_file(p) and (p.name == "manifest.json" or p.suffix == ".safetensors")


def _checkpoint_entry(p: Path) -> bool:
    return _plain_file(p) and (p.name in SIDE_FILES or p.name in _CHECKPOINT_FILES or p.suffix == ".safetensors")


def check_destination(out: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """Refuse an OUT that is, lies inside or contains one of the command's `inputs` (even
    with `force`); an existing OUT without `force`; one that `force` must not delete (see
    `_replaceable`); a symbolic link; and an OUT whose parent does not exist."""
    for source in inputs:
        if within(out, source) or within(source, out):
            what = (
                "is"
                if out.resolve() == Path(source).resolve()
                else "lies inside"
                if within(out, source)
                else "contains"
            )
            raise OutputError(
                f"{out} {what} {source}, an input of this command: writing there would replace or damage the input; "
                "choose an output path outside every input"
            )
    if out.is_symlink():
        raise OutputError(f"{out} is a symbolic link: give the real path of the output directory")
    if out.exists() and not force:
        raise OutputError(f"{out} already exists: choose another path, or replace it (force)")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a directory: remove it first")
    if out.is_dir() and not _replaceable(out):
        raise OutputError(
            f"{out} is a directory that is neither a moeconsol artifact nor a checkpoint (or holds other files too): "
            "not replacing it even with force; choose another path or remove it yourself"
        )
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: no such directory to write {out.name} into")


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start when the file system holding OUT has less than `needed` bytes free."""
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise OutputError(
            f"not enough disk space for {out}: it needs about {format_bytes(needed)} but "
            f"{format_bytes(free)} is free on {out.parent}; free space or choose another location"
        )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises KeyboardInterrupt (so cleanup runs); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_directory(out: str | Path, force: bool = False, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out`.

    On any exception, Ctrl-C or SIGTERM the temporary directory is removed and `out` is
    left as it was. With `force`, an existing `out` is replaced only after the new one is
    complete; `inputs` are never replaced (see `check_destination`). An OSError while
    writing (a full disk) becomes an OutputError.
    """
    out = Path(out).absolute()
    check_destination(out, force, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _sigterm_as_interrupt():
            try:
                yield tmp
            except OSError as e:
                raise OutputError(f"cannot write {out}: {e.strerror or e}; nothing was written") from e
            if out.exists() or out.is_symlink():
                check_destination(out, force, inputs)
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / "previous")
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- safetensors files --------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: name, safetensors dtype name ("BF16") and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, dtype_names()[tensor.dtype], tuple(tensor.shape))


@dataclass(frozen=True)
class FileRecord:
    """Size and sha256 of a written file, as listed in a manifest."""

    size: int
    sha256: str


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for tensors stored in `specs` order, padded to 8."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are all declared up front.

    The header goes out at once; then `write(name, pieces)` is called for each spec, in
    order, with the tensor itself or an iterable of pieces whose bytes, concatenated, are
    the tensor's bytes (so a fused 3-D tensor can be streamed one expert at a time).
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path, self.specs = path, specs
        self._next = 0
        self._hash = hashlib.sha256()
        # The sha256 is computed on a thread of its own (hashlib and pread release the GIL),
        # one item behind the writes, in order; its worker exits with this writer.
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moeconsol-sha256")
        self._pending: deque[Future] = deque()
        self._size = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._emit(safetensors_header(specs, metadata))

    def _hash_range_later(self, source: TensorInfo) -> None:
        """Queue a file range for the sha256 (read back and hashed on the hashing thread)."""
        self._pending.append(self._hasher.submit(self._hash_range, source))
        while len(self._pending) > 2:
            self._pending.popleft().result()

    def _hash_range(self, source: TensorInfo) -> None:
        for chunk in iter_chunks(source):
            self._hash.update(chunk)

    def _emit(self, data) -> None:
        """Write bytes from memory; hashed now (after the queued ranges, to keep the order),
        so the caller may reuse its buffer as soon as this returns."""
        write_all(self._fd, data)
        while self._pending:
            self._pending.popleft().result()
        self._hash.update(data)
        self._size += memoryview(data).nbytes

    def _expect(self, name: str) -> TensorSpec:
        spec = self.specs[self._next] if self._next < len(self.specs) else None
        if spec is None or spec.name != name:
            raise RuntimeError(f"{self.path.name}: expected {spec.name if spec else 'no more tensors'}, got {name}")
        return spec

    def copy(self, name: str, source: TensorInfo | Sequence[TensorInfo]) -> None:
        """Write tensor `name` as the bytes of `source`'s range in another safetensors file
        (or of several ranges, concatenated: a fused tensor made of stored experts).

        The kernel copies the bytes (`copy_range`: no pass through Python, measured several
        times faster than write() here); the hashing thread reads the same ranges back
        through a reused buffer, which page-cached data makes cheap. No tensor is built."""
        spec = self._expect(name)
        sources = [source] if isinstance(source, TensorInfo) else list(source)
        nbytes = sum(s.nbytes for s in sources)
        if any(s.dtype != spec.dtype for s in sources) or nbytes != spec.nbytes:
            raise RuntimeError(
                f"{name}: sources are {sorted({s.dtype for s in sources})} of {nbytes} bytes, "
                f"declared {spec.dtype} of {spec.nbytes}"
            )
        for s in sources:
            copy_range(s, self._fd)
            self._hash_range_later(s)
        self._size += nbytes
        self._next += 1

    def write(self, name: str, pieces: torch.Tensor | Iterable[torch.Tensor]) -> None:
        spec = self._expect(name)
        if isinstance(pieces, torch.Tensor):
            if tuple(pieces.shape) != spec.shape:
                raise RuntimeError(f"{name}: shape {list(pieces.shape)} != declared {list(spec.shape)}")
            pieces = [pieces]
        written = 0
        for piece in pieces:
            if dtype_names()[piece.dtype] != spec.dtype:
                raise RuntimeError(f"{name}: dtype {piece.dtype} != declared {spec.dtype}")
            data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
            self._emit(data)
            written += data.nbytes
        if written != spec.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, declared {spec.nbytes}")
        self._next += 1

    def close(self) -> FileRecord:
        if self._next != len(self.specs):
            raise RuntimeError(f"{self.path.name}: {len(self.specs) - self._next} declared tensors not written")
        os.close(self._fd)
        while self._pending:
            self._pending.popleft().result()
        self._hasher.shutdown()
        return FileRecord(self._size, self._hash.hexdigest())

    def abort(self) -> None:
        self._hasher.shutdown(cancel_futures=True)
        os.close(self._fd)


def write_all(fd: int, data) -> None:
    """os.write until every byte of `data` is out (a write may be partial)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def copy_range(source: TensorInfo, fd: int) -> None:
    """Append `source`'s byte range to the file open as `fd` at its current position, by
    `os.copy_file_range` where the platform and file systems allow it, else read and write
    through a reused buffer."""
    with open(source.file, "rb", buffering=0) as src:
        pos, end = source.start, source.end
        while pos < end and hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src.fileno(), fd, end - pos, pos)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    break  # not supported between these files: fall back below
                raise
            if n == 0:
                raise SafetensorsError(f"{source.file}: truncated while reading")
            pos += n
    if pos < end:
        for chunk in iter_chunks(TensorInfo(source.file, source.dtype, (), pos, end)):
            write_all(fd, chunk)


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Split specs, in order, into consecutive shards of at most `max_bytes` of data each
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for s in specs:
        if not shards or (size + s.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class ShardedWriter:
    """Writes declared tensors, in order, into `{prefix}-0000k-of-0000K.safetensors` files
    of at most `max_bytes` each; only the current shard's file handle is open."""

    def __init__(self, directory: Path, prefix: str, specs: list[TensorSpec], max_bytes: int):
        self.directory = directory
        self.shards = plan_shards(specs, max_bytes)
        total = len(self.shards)
        self.file_names = [f"{prefix}-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self.weight_map: dict[str, str] = {
            s.name: self.file_names[i] for i, shard in enumerate(self.shards) for s in shard
        }
        self.records: dict[str, FileRecord] = {}
        self._shard = -1
        self._left = 0
        self._writer: SafetensorsWriter | None = None

    def write(self, name: str, pieces: torch.Tensor | Iterable[torch.Tensor]) -> None:
        self._current().write(name, pieces)
        self._done_one()

    def copy(self, name: str, source: TensorInfo | Sequence[TensorInfo]) -> None:
        """`SafetensorsWriter.copy` into the current shard."""
        self._current().copy(name, source)
        self._done_one()

    def _current(self) -> SafetensorsWriter:
        if self._left == 0:
            self._open_next()
        assert self._writer is not None
        return self._writer

    def _done_one(self) -> None:
        self._left -= 1
        if self._left == 0:
            self.records[self.file_names[self._shard]] = self._writer.close()
            self._writer = None

    def _open_next(self) -> None:
        self._shard += 1
        if self._shard >= len(self.shards):
            raise RuntimeError("more tensors written than declared")
        specs = self.shards[self._shard]
        self._writer = SafetensorsWriter(self.directory / self.file_names[self._shard], specs)
        self._left = len(specs)

    def close(self) -> dict[str, FileRecord]:
        if self._writer is not None or self._shard != len(self.shards) - 1:
            raise RuntimeError("not every declared tensor was written")
        return self.records


def copy_file(source: Path, target: Path) -> FileRecord:
    """Copy a file, hashing it on the way."""
    h = hashlib.sha256()
    size = 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
            h.update(chunk)
            size += len(chunk)
    return FileRecord(size, h.hexdigest())


def write_json(path: Path, obj: object) -> FileRecord:
    """Strict JSON (a NaN or infinity is refused: no JSON reader could parse it)."""
    try:
        data = (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode()
    except ValueError as e:
        raise SettingsError(
            f"{path.name} would hold a NaN or infinite number; check the inputs and options for NaN"
        ) from e
    path.write_bytes(data)
    return FileRecord(len(data), hashlib.sha256(data).hexdigest())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
