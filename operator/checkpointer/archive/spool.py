"""The node-side spool: podman's export, hashed (and compressed where podman did not, and encrypted
when the storage asks for it) into a file that the upload reads from while it grows.

The spool decouples podman from the network: podman writes at disk speed and never waits for S3,
uploads start while podman is still writing, and a finished spool survives an agent restart so the
upload can be retried without checkpointing again. Parts stream from the file, so memory stays
bounded by the read size and the compressor's buffers, whatever the archive size.

While it writes, the spool also takes the CRC32 of every upload part. Each part is sent with the
CRC32 of the bytes that were written, not of the bytes read back, so S3 refuses a part whose bytes
changed anywhere between podman and its disk. At each part's end it also takes the sha256 of the
bytes so far (a copy of the archive's running sha256, finalized): what a restore that reads the
parts as they land checks each part with, without hashing the bytes a second time.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from checkpointer.archive import encryption
from checkpointer.archive.codec import READ_SIZE, Chunk, compressor, crc32, read_chunks
from checkpointer.models import Compression


@dataclass(frozen=True)
class Digest:
    """What identifies a spool's bytes: its size, sha256, and the CRC32 of each upload part."""

    size: int
    sha256: str
    part_size: int
    part_crc32: tuple[int, ...]


class _Parts:
    """The sha256 of a byte stream fed to it in any chunking, with the CRC32 of each of its
    consecutive `part_size` slices and the sha256 of the stream up to each slice's end."""

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.done: list[int] = []
        self.prefixes: list[str] = []
        self.sha256 = hashlib.sha256()
        self._crc = 0
        self._fill = 0

    def update(self, data: Chunk) -> None:
        view = memoryview(data)
        while view:
            piece = view[: self.part_size - self._fill]
            self._crc = crc32(piece, self._crc)
            self.sha256.update(piece)
            self._fill += len(piece)
            view = view[len(piece) :]
            if self._fill == self.part_size:
                self.prefixes.append(self.sha256.copy().hexdigest())
                self.done.append(self._crc)
                self._crc = self._fill = 0

    def close(self) -> tuple[int, ...]:
        if self._fill or not self.done:  # an empty archive is one empty part
            self.prefixes.append(self.sha256.copy().hexdigest())
            self.done.append(self._crc)
        return tuple(self.done)


class GrowingFile:
    """A spool file that readers can read from while the writer is still appending to it.

    Two moments end it: `end()`, when the last byte is written (uploads may send the last part),
    and `finish()`, the verdict once podman has exited and the file is on disk (an upload may be
    completed only after a good one).
    """

    def __init__(self, path: Path, part_size: int) -> None:
        self.path = path
        self.part_size = part_size
        # Exists from the start, so that readers may open it before the writer has written anything.
        path.touch()
        self._written = 0
        self._crcs: list[int] = []
        self._prefixes: list[str] = []
        self._ended = False
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()

    def advance(self, written: int, part_crc32: list[int], prefixes: list[str] | None = None) -> None:
        with self._cond:
            self._written = written
            self._crcs = part_crc32
            if prefixes is not None:
                self._prefixes = prefixes
            self._cond.notify_all()

    def end(self, part_crc32: tuple[int, ...], prefixes: list[str] | None = None) -> None:
        with self._cond:
            self._crcs = list(part_crc32)
            if prefixes is not None:
                self._prefixes = list(prefixes)
            self._ended = True
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._ended, self._done, self._error = True, True, error
            self._cond.notify_all()

    def part(self, index: int) -> tuple[int, int, int] | None:
        """Block until part `index` is whole (or the last); returns (start, length, crc32), or None past the end."""
        start = index * self.part_size
        with self._cond:
            self._cond.wait_for(lambda: len(self._crcs) > index or self._ended)
            self._raise_error()
            if index >= len(self._crcs):
                return None
            return start, min(self._written, start + self.part_size) - start, self._crcs[index]

    def prefix_sha256(self, index: int) -> str | None:
        """The sha256 of the spool's bytes up to the end of part `index`, once that part is whole;
        None where the spool was not hashed so (a spool taken up again, see `finished`)."""
        with self._cond:
            return self._prefixes[index] if index < len(self._prefixes) and index < len(self._crcs) else None

    def verdict(self) -> int:
        """Block until finished; returns the final size, or raises what the writer failed with."""
        with self._cond:
            self._cond.wait_for(lambda: self._done)
            self._raise_error()
            return self._written

    def _raise_error(self) -> None:
        if self._error is not None:
            raise SpoolFailed(f"spool writer failed: {self._error}") from self._error

    @classmethod
    def finished(cls, path: Path, digest: Digest, prefixes: Sequence[str] | None = None) -> GrowingFile:
        spool = cls(path, digest.part_size)
        spool.advance(digest.size, list(digest.part_crc32), list(prefixes) if prefixes is not None else None)
        spool.end(digest.part_crc32)
        spool.finish()
        return spool


class SpoolFailed(Exception):
    """The spool's writer failed: its bytes are not an archive and must not be completed."""


def write(
    chunks: Iterable[Chunk],
    spool: GrowingFile,
    compression: Compression,
    zstd_level: int,
    recipients: Sequence[str] = (),
    zstd_threads: int = -1,
) -> tuple[Digest, int]:
    """Compress `chunks` into the spool, and encrypt them to `recipients` when there are any (age);
    returns the digest of the stored bytes and the raw size. zstd_threads as codec.compressor's."""
    parts = _Parts(spool.part_size)
    comp = compressor(compression, zstd_level, zstd_threads)
    size = raw = 0
    with spool.path.open("wb") as out:

        def emit(data: Chunk) -> None:
            nonlocal size
            if data:
                out.write(data)
                parts.update(data)
                size += len(data)
                out.flush()
                spool.advance(size, parts.done, parts.prefixes)

        def compressed() -> Iterator[Chunk]:
            nonlocal raw
            for chunk in chunks:
                raw += len(chunk)
                yield comp.compress(chunk)
            yield comp.flush()

        if recipients:
            # Between the compressor and the file: what is hashed, checked and stored is the age file.
            encryption.encrypt(compressed(), emit, recipients)
        else:
            for data in compressed():
                emit(data)
        crcs = parts.close()
        spool.advance(size, list(crcs), list(parts.prefixes))
        # The last part may go while the file is made durable and podman cleans up.
        spool.end(crcs, parts.prefixes)
        os.fsync(out.fileno())
    return Digest(size, parts.sha256.hexdigest(), spool.part_size, crcs), raw


def hashed_file(path: Path, part_size: int) -> tuple[Digest, tuple[str, ...]]:
    """Hash a spool on disk again, as it is now (a retry uploads only what it has just hashed), with the
    sha256 of the spool up to the end of each part (GrowingFile.prefix_sha256)."""
    parts = _Parts(part_size)
    size = 0
    with path.open("rb") as f:
        for chunk in read_chunks(f, READ_SIZE):
            parts.update(chunk)
            size += len(chunk)
    crcs = parts.close()
    return Digest(size, parts.sha256.hexdigest(), part_size, crcs), tuple(parts.prefixes)


@dataclass(frozen=True)
class SpoolUsage:
    """What the spool holds, what its file system has free, and its cap (0: none), in bytes."""

    used_bytes: int
    free_bytes: int
    cap_bytes: int

    @property
    def room(self) -> int:
        """What the spool may still take: its file system's free space, within its cap."""
        if not self.cap_bytes:
            return self.free_bytes
        return max(0, min(self.free_bytes, self.cap_bytes - self.used_bytes))


def spool_usage(root: Path, cap_bytes: int = 0) -> SpoolUsage:
    """The bytes the files under `root` take on disk (allocated, as the file system counts them) and
    the bytes its file system has free for an unprivileged writer."""
    used = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                used += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except FileNotFoundError:  # removed while counting
                continue
    stat = os.statvfs(root)
    return SpoolUsage(used_bytes=used, free_bytes=stat.f_bavail * stat.f_frsize, cap_bytes=cap_bytes)
