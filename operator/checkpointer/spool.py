"""The node-side spool: podman's export is hashed, and compressed where podman did not, into a file
that uploads read from.

The spool decouples podman from the network: podman writes at disk speed and never waits for S3,
uploads start while podman is still writing, and a finished spool survives an agent restart so the
upload can be retried without checkpointing again. Parts stream from the file, so memory stays
bounded by the read size and the compressor's buffers, whatever the archive size.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zstandard
from isal import isal_zlib

from checkpointer.models import Compression

READ_SIZE = 1024 * 1024
ZSTD_JOB_SIZE = 2 * 1024 * 1024

# A chunk of a stream: a view is valid only until the next chunk is asked for (see read_chunks).
Chunk = bytes | memoryview


class _Compressor(Protocol):
    def compress(self, data: Chunk) -> Chunk: ...
    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: Chunk) -> Chunk:
        return data

    def flush(self) -> bytes:
        return b""


class _ParallelGzip:
    """gzip on every core: blocks compressed side by side, each a gzip member, written in order.

    A gzip file may hold several members one after another; gzip, Go's reader (podman's import)
    and Python all read them as one stream. Deflate is ISA-L's (python-isal): at level 1 it runs
    at about 1 GB/s a core on this workload where zlib's level 1 manages 25 MB/s on the
    incompressible half. Memory: (workers + 1) blocks in flight.
    """

    BLOCK = 4 * 1024 * 1024

    def __init__(self) -> None:
        self.workers = os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="gzip")
        self.pending: deque[Future[bytes]] = deque()
        self.buffer = bytearray()

    @staticmethod
    def _member(block: bytes) -> bytes:
        # wbits=31 writes the gzip container that podman detects.
        return isal_zlib.compress(block, 1, 16 + isal_zlib.MAX_WBITS)

    def _ready(self, wait_for: int) -> bytes:
        """Output of finished blocks, in order, waiting until at most `wait_for` are left running."""
        out = bytearray()
        while self.pending and (self.pending[0].done() or len(self.pending) > wait_for):
            out += self.pending.popleft().result()
        return bytes(out)

    def compress(self, data: Chunk) -> Chunk:
        self.buffer += data
        while len(self.buffer) >= self.BLOCK:
            self.pending.append(self.pool.submit(self._member, bytes(self.buffer[: self.BLOCK])))
            del self.buffer[: self.BLOCK]
        return self._ready(self.workers)

    def flush(self) -> bytes:
        if self.buffer or not self.pending:
            self.pending.append(self.pool.submit(self._member, bytes(self.buffer)))
            self.buffer.clear()
        out = self._ready(0)
        self.pool.shutdown()
        return out


def compressor(compression: Compression, zstd_level: int = 3) -> _Compressor:
    if compression is Compression.ZSTD:
        # threads=-1: one worker per core; the frame stays a single standard zstd frame, with a
        # content checksum (xxhash, nearly free) that every reader checks, podman's included.
        # 2 MiB jobs: zstd's multi-threaded buffers take 40 MiB instead of 127 MiB at the default
        # job size, for the same output.
        params = zstandard.ZstdCompressionParameters.from_level(
            zstd_level, threads=-1, write_checksum=True, job_size=ZSTD_JOB_SIZE
        )
        return zstandard.ZstdCompressor(compression_params=params).compressobj()
    if compression is Compression.GZIP:
        return _ParallelGzip()
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
    """A spool file that readers can read from while the writer is still appending to it.

    Two moments end it: `end()`, when the last byte is written (uploads may send the last part),
    and `finish()`, the verdict once podman has exited and the file is on disk (an upload may be
    completed only after a good one).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # Exists from the start, so that readers may open it before the writer has written anything.
        path.touch()
        self._written = 0
        self._ended = False
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, written: int) -> None:
        with self._cond:
            self._written = written
            self._cond.notify_all()

    def end(self) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._ended, self._done, self._error = True, True, error
            self._cond.notify_all()

    def wait_for(self, end: int) -> int:
        """Block until `end` bytes exist or writing stopped; returns min(bytes written, end)."""
        with self._cond:
            self._cond.wait_for(lambda: self._written >= end or self._ended)
            self._raise_error()
            return min(self._written, end)

    def verdict(self) -> int:
        """Block until finished; returns the final size, or raises what the writer failed with."""
        with self._cond:
            self._cond.wait_for(lambda: self._done)
            self._raise_error()
            return self._written

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"spool writer failed: {self._error}") from self._error

    @classmethod
    def finished(cls, path: Path) -> GrowingFile:
        spool = cls(path)
        spool.advance(path.stat().st_size)
        spool.finish()
        return spool


def write_spool(
    chunks: Iterable[Chunk],
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

        def emit(data: Chunk) -> None:
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
        spool.advance(size)
        # The last part may go while the file is made durable and podman cleans up.
        spool.end()
        os.fsync(out.fileno())
    return size, digest.hexdigest(), raw


class _Readable(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def read_chunks(stream: _Readable, size: int = READ_SIZE) -> Iterator[memoryview]:
    """The stream in chunks of up to `size` bytes, all read into one buffer: each chunk is valid only
    until the next is asked for. A new bytes object per read would be a new mapping (glibc maps
    blocks this large) whose pages the kernel faults in and zeroes, then unmaps after: that cost
    more than the copy itself."""
    view = memoryview(bytearray(size))
    while n := stream.readinto(view):
        yield view[:n]
