"""The node-side spool: podman's raw tar is compressed and hashed into a file that uploads read from.

The spool decouples podman from the network: podman writes at disk speed and never waits for S3,
uploads start while podman is still writing, and a finished spool survives an agent restart so the
upload can be retried without checkpointing again. Memory stays bounded by the read size plus
part size x upload concurrency, whatever the archive size.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from checkpointer.models import Compression

READ_SIZE = 1024 * 1024


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def compressor(compression: Compression, zstd_level: int = 3) -> _Compressor:
    if compression is Compression.ZSTD:
        # threads=-1: one worker per core; the frame stays a single standard zstd frame.
        zc = zstandard.ZstdCompressor(level=zstd_level, threads=-1)
        return zc.compressobj()
    if compression is Compression.GZIP:
        # Level 1 is the fastest deflate zlib offers; wbits=31 writes the gzip container podman detects.
        return zlib.compressobj(level=1, wbits=16 + zlib.MAX_WBITS)
    return _Identity()


@dataclass
class SpoolRecord:
    """What a finished spool holds; written next to it so a restarted agent can upload it."""

    container: str
    container_id: str
    compression: str
    size: int
    sha256: str
    raw_size: int
    stats: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SpoolRecord | None:
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None


class GrowingFile:
    """A spool file that readers can read from while the writer is still appending to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Exists from the start, so that readers may open it before the writer has written anything.
        path.touch()
        self._written = 0
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._done, self._error = True, error
            self._cond.notify_all()

    def wait_for(self, end: int) -> int:
        """Block until `end` bytes exist or writing stopped; returns min(bytes written, end)."""
        with self._cond:
            self._cond.wait_for(lambda: self._written >= end or self._done)
            if self._error is not None:
                raise RuntimeError(f"spool writer failed: {self._error}") from self._error
            return min(self._written, end)

    @property
    def complete(self) -> tuple[bool, int]:
        with self._cond:
            return self._done and self._error is None, self._written

    @classmethod
    def finished(cls, path: Path) -> GrowingFile:
        spool = cls(path)
        spool.advance(path.stat().st_size)
        spool.finish()
        return spool


def write_spool(
    chunks: Iterable[bytes],
    spool: GrowingFile,
    compression: Compression,
    zstd_level: int,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, str, int]:
    """Compress `chunks` into the spool; returns (stored size, sha256 of the stored bytes, raw size)."""
    digest = hashlib.sha256()
    comp = compressor(compression, zstd_level)
    size = raw = 0
    with spool.path.open("wb") as out:

        def emit(data: bytes) -> None:
            nonlocal size
            if data:
                out.write(data)
                digest.update(data)
                size += len(data)

        for chunk in chunks:
            raw += len(chunk)
            emit(comp.compress(chunk))
            out.flush()
            spool.advance(size)
            if on_progress is not None:
                on_progress(raw)
        emit(comp.flush())
        out.flush()
        os.fsync(out.fileno())
    spool.advance(size)
    return size, digest.hexdigest(), raw


def read_chunks(stream: BinaryIO, size: int = READ_SIZE) -> Iterable[bytes]:
    while chunk := stream.read(size):
        yield chunk
