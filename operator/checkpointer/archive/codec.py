"""An archive's encoding: the compressors of the spool, zstd detection and the checkpoint tar."""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zstandard
from isal import isal_zlib

from checkpointer.models import Compression

MiB = 1024 * 1024
READ_SIZE = MiB
ZSTD_JOB_SIZE = 2 * 1024 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CONFIG_DUMP = "config.dump"

# A chunk of a stream: a view is valid only until the next chunk is asked for (see read_chunks).
Chunk = bytes | memoryview


class Compressor(Protocol):
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


def compressor(compression: Compression, zstd_level: int = 3, zstd_threads: int = -1) -> Compressor:
    """zstd_threads: -1, one worker per core; 0, in the caller's thread, for a source whose own pace
    is the bound (see spool.write)."""
    if compression is Compression.ZSTD:
        # The frame stays a single standard zstd frame, with a content checksum (xxhash, nearly
        # free) that every reader checks, podman's included. 2 MiB jobs: zstd's multi-threaded
        # buffers take 40 MiB instead of 127 MiB at the default job size, for the same output.
        params = zstandard.ZstdCompressionParameters.from_level(
            zstd_level, threads=zstd_threads, write_checksum=True, job_size=ZSTD_JOB_SIZE
        )
        return zstandard.ZstdCompressor(compression_params=params).compressobj()
    if compression is Compression.GZIP:
        return _ParallelGzip()
    return _Identity()


def crc32(data: Chunk, value: int = 0) -> int:
    """CRC32 (the one S3 checks per part) at memory speed: ISA-L's, not zlib's."""
    return int(isal_zlib.crc32(data, value))


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


class CorruptArchive(Exception):
    """The bytes are not a readable podman checkpoint archive."""


SPEC_DUMP = "spec.dump"
# The JSON members an archive's policy is read from (services/archive_policy.py). Real ones are a
# few KiB; parsing JSON takes up to 25 bytes of memory per byte, so 1 MiB keeps a parse near 25 MiB.
DUMP_LIMIT = 1 * MiB
# Extended headers (pax records, GNU long names and links) are read into memory whole, before the
# member they describe. A path is at most 4 KiB and an xattr value 64 KiB: one header may take
# 64 KiB, all of an archive's together 1 MiB (each counted as at least one 512-byte block).
EXTENDED_HEADER_LIMIT = 64 * 1024
EXTENDED_HEADERS_LIMIT = 1 * MiB
# Consecutive extended headers before one member: GNU tar writes a long link and a long name, Go a
# pax header. Python reads a chain of them recursively.
EXTENDED_HEADER_CHAIN = 4
# Python's pax reader before 3.11.10 takes time quadratic in the longest run of digits of a header.
_DIGIT_RUN = re.compile(rb"\d{257}")


@dataclass(frozen=True)
class ContainerConfiguration:
    """What an archive asks podman to restore: its container configuration (`config.dump`) and the
    OCI runtime spec podman runs it with (`spec.dump`)."""

    config: dict[str, Any]
    spec: dict[str, Any]


class _Replay:
    """A file that first gives back bytes already read from `rest`: lets the pax reader read a
    header that was checked before it."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head = head
        self.rest = rest

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return bytes(self.rest.read(size))
        if size < 0:
            size = len(self.head) + (1 << 62)
        out, self.head = self.head[:size], self.head[size:]
        if len(out) < size:
            out += self.rest.read(size - len(out))
        return out

    def tell(self) -> int:
        return int(self.rest.tell()) - len(self.head)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.head = b""
        return int(self.rest.seek(offset, whence))


class _BoundedTarFile(tarfile.TarFile):
    """A tar reader that refuses extended headers past the limits above before reading them."""

    members: list[tarfile.TarInfo]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before TarFile.__init__, which already reads the first member.
        self.extended_bytes = 0
        self.extended_chain = 0
        kwargs["tarinfo"] = _BoundedTarInfo
        super().__init__(*args, **kwargs)


class _BoundedTarInfo(tarfile.TarInfo):
    def _extended(self, tar: tarfile.TarFile) -> _BoundedTarFile:
        if not isinstance(tar, _BoundedTarFile):
            raise TypeError("a bounded member needs a bounded tar")
        if self.size > EXTENDED_HEADER_LIMIT:
            raise CorruptArchive(
                f"the archive has an extended tar header of {self.size} bytes, more than {EXTENDED_HEADER_LIMIT}"
            )
        tar.extended_bytes += max(self.size, tarfile.BLOCKSIZE)
        if tar.extended_bytes > EXTENDED_HEADERS_LIMIT:
            raise CorruptArchive(f"the archive's extended tar headers take more than {EXTENDED_HEADERS_LIMIT} bytes")
        if tar.extended_chain >= EXTENDED_HEADER_CHAIN:
            raise CorruptArchive(f"the archive has more than {EXTENDED_HEADER_CHAIN} extended tar headers in a row")
        return tar

    def _proc_gnulong(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        bounded = self._extended(tar)
        bounded.extended_chain += 1
        try:
            return super()._proc_gnulong(tar)  # type: ignore[misc,no-any-return]
        finally:
            bounded.extended_chain -= 1

    def _proc_pax(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        bounded = self._extended(tar)
        fileobj = tar.fileobj
        block = fileobj.read(self.size + -self.size % tarfile.BLOCKSIZE)
        _check_pax_records(block[: self.size])
        tar.fileobj = _Replay(block, fileobj)  # type: ignore[assignment]
        bounded.extended_chain += 1
        try:
            return super()._proc_pax(tar)  # type: ignore[misc,no-any-return]
        finally:
            bounded.extended_chain -= 1
            tar.fileobj = fileobj

    def _proc_sparse(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        raise CorruptArchive("the archive has a sparse member; podman writes none")


def _check_pax_records(data: bytes) -> None:
    """Each record must be `<length> <keyword>=<value>\n` and fill the header exactly. Python's own
    reader searches for the next `=` past a record's end, which makes a crafted header take memory
    quadratic in its size; checked like this, every keyword stays inside its own record."""
    if _DIGIT_RUN.search(data):
        raise CorruptArchive("the archive has a pax header with a run of more than 256 digits")
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        digits = data[pos:space]
        if space < 0 or not digits.isdigit():
            raise CorruptArchive("the archive has a malformed pax header")
        end = pos + int(digits)
        equals = data.find(b"=", space + 1, end)
        if end > len(data) or equals <= space + 1 or data[end - 1 : end] != b"\n":
            raise CorruptArchive("the archive has a malformed pax header")
        if data.startswith(b"GNU.sparse.", space + 1):
            raise CorruptArchive("the archive has a sparse member; podman writes none")
        pos = end


def _member_name(member: tarfile.TarInfo) -> str:
    # As podman's extraction sees it: "./config.dump", "/config.dump" and "a/../config.dump" are all
    # config.dump.
    return posixpath.normpath("/" + member.name).lstrip("/")


def _read_json(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> dict[str, Any]:
    if not member.isreg():
        raise CorruptArchive(f"the archive's {name} is not a regular file")
    if member.size > DUMP_LIMIT:
        raise CorruptArchive(f"the archive's {name} has {member.size} bytes, more than {DUMP_LIMIT}")
    extracted = tar.extractfile(member)
    if extracted is None:
        raise CorruptArchive(f"the archive's {name} cannot be read")
    value = json.loads(extracted.read())
    if not isinstance(value, dict):
        raise CorruptArchive(f"the archive's {name} is not a JSON object")
    return value


def read_configuration(path: Path, whole: bool) -> ContainerConfiguration:
    """The archive's config.dump and spec.dump, read with bounded memory; `whole` also reads every
    other member, so that damage anywhere shows.

    Every header is read, so that an archive cannot show one config.dump here and another to podman
    (whose extraction keeps the last of two). Raises CorruptArchive when the tar cannot be read, a
    header or one of the two members is over its limit, either is missing or appears twice.
    """
    found: dict[str, dict[str, Any]] = {}
    try:
        with _BoundedTarFile.open(path, mode="r:*") as tar:
            while (member := tar.next()) is not None:
                # A stream of members must not become a list of them in memory.
                tar.members.clear()
                name = _member_name(member)
                if name in (CONFIG_DUMP, SPEC_DUMP):
                    if name in found:
                        raise CorruptArchive(f"the archive holds {name} twice")
                    found[name] = _read_json(tar, member, name)
                elif whole and member.isreg():
                    extracted = tar.extractfile(member)
                    while extracted is not None and extracted.read(READ_SIZE):
                        pass
    except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as e:
        # ValueError: JSON (and its UTF-8) that does not parse, or numbers in a header that do not.
        raise CorruptArchive(f"the archive cannot be read: {e}") from None
    for name in (CONFIG_DUMP, SPEC_DUMP):
        if name not in found:
            raise CorruptArchive(f"the archive holds no {name}: it is not a podman checkpoint")
    return ContainerConfiguration(config=found[CONFIG_DUMP], spec=found[SPEC_DUMP])


class ConfigurationTap:
    """Keeps config.dump and spec.dump of a plain tar streaming past (a Pod's, as its container runtime
    writes it), each up to DUMP_LIMIT, without holding anything else: a header at a time, the data of
    those two members, the pax and GNU long names (up to EXTENDED_HEADER_LIMIT) that rename the next
    member. What cannot be read leaves the two out; the stream goes on unchanged either way."""

    BLOCK = 512

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self._header = bytearray()
        self._remaining = 0  # data bytes of the current member still to come
        self._padding = 0
        self._keep: bytearray | None = None  # the current member's data, when it is kept
        self._kind = b""
        self._name = ""
        self._next_name = ""  # from a pax record or a GNU long name, for the member after
        self._ended = False

    def tap(self, chunks: Iterable[Chunk]) -> Iterator[Chunk]:
        for chunk in chunks:
            if not self._ended:
                try:
                    self._feed(memoryview(chunk).cast("B"))
                except ValueError:  # not a tar this reader understands: nothing is kept
                    self._ended = True
                    self.files.clear()
            yield chunk

    def _feed(self, data: memoryview) -> None:
        at = 0
        while at < len(data) and not self._ended:
            if self._remaining:
                take = min(self._remaining, len(data) - at)
                if self._keep is not None:
                    self._keep += data[at : at + take]
                at += take
                self._remaining -= take
                if not self._remaining:
                    self._member_done()
            elif self._padding:
                take = min(self._padding, len(data) - at)
                at += take
                self._padding -= take
            else:
                take = min(self.BLOCK - len(self._header), len(data) - at)
                self._header += data[at : at + take]
                at += take
                if len(self._header) == self.BLOCK:
                    self._header_done(bytes(self._header))
                    self._header.clear()

    def _header_done(self, header: bytes) -> None:
        if header == bytes(self.BLOCK):
            self._ended = True  # the end-of-archive blocks
            return
        size_field = header[124:136]
        if size_field[0] & 0x80:  # base-256
            size = int.from_bytes(size_field[1:], "big")
        else:
            size = int(size_field.rstrip(b"\0 ").strip() or b"0", 8)
        self._kind = header[156:157]
        name = header[0:100].split(b"\0", 1)[0].decode(errors="replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace") if header[257:262] == b"ustar" else ""
        self._name = self._next_name or (f"{prefix}/{name}" if prefix else name)
        self._remaining, self._padding = size, -size % self.BLOCK
        extended = self._kind in (b"x", b"L")
        wanted = self._kind in (b"0", b"\0") and posixpath.normpath("/" + self._name).lstrip("/") in (
            CONFIG_DUMP,
            SPEC_DUMP,
        )
        if extended and size > EXTENDED_HEADER_LIMIT:
            raise ValueError("an extended header past its limit")
        self._keep = bytearray() if (extended or (wanted and size <= DUMP_LIMIT)) else None
        if not extended:
            self._next_name = ""
        if not size:
            self._member_done()

    def _member_done(self) -> None:
        kept = bytes(self._keep) if self._keep is not None else None
        self._keep = None
        if kept is None:
            return
        if self._kind == b"L":
            self._next_name = kept.split(b"\0", 1)[0].decode(errors="replace")
        elif self._kind == b"x":
            for record in _pax_records(kept):
                if record[0] == "path":
                    self._next_name = record[1]
        else:
            self.files[posixpath.normpath("/" + self._name).lstrip("/")] = kept


def _pax_records(data: bytes) -> Iterator[tuple[str, str]]:
    """The `key=value` records of a pax header (`<length> key=value\\n`, the length counting all)."""
    at = 0
    while at < len(data):
        space = data.index(b" ", at)
        length = int(data[at:space])
        record = data[space + 1 : at + length - 1]
        key, _, value = record.partition(b"=")
        yield key.decode(errors="replace"), value.decode(errors="replace")
        at += length


# The tars inside an archive that podman unpacks on the node: rootfs-diff.tar into the container's
# root file system, devshm-checkpoint.tar into its /dev/shm, volumes/<name>.tar into named volumes.
NESTED_TAR_SUFFIX = ".tar"
# The paths podman removes from the container's root file system after it unpacked rootfs-diff.tar.
DELETED_FILES = "deleted.files"


@dataclass(frozen=True)
class Member:
    """One member of the archive, or of a tar inside it, as the unpacking rules see it
    (services/archive_policy.py)."""

    tar: str  # the tar inside the archive it is a member of; "" for the archive itself
    name: str  # as its header writes it
    kind: str  # "file", "dir", "symlink", "hardlink", "char", "block", "fifo"; "deleted" in deleted.files
    link: str = ""  # a link's target, as its header writes it


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.ischr():
        return "char"
    if member.isblk():
        return "block"
    if member.isfifo():
        return "fifo"
    return "dir" if member.isdir() else "file"


def _read_list(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> list[str]:
    """A JSON list of strings (deleted.files), read within DUMP_LIMIT."""
    if not member.isreg():
        raise CorruptArchive(f"the archive's {name} is not a regular file")
    if member.size > DUMP_LIMIT:
        raise CorruptArchive(f"the archive's {name} has {member.size} bytes, more than {DUMP_LIMIT}")
    extracted = tar.extractfile(member)
    value = json.loads(extracted.read()) if extracted is not None else []
    value = [] if value is None else value  # Go writes a nil list as null
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CorruptArchive(f"the archive's {name} is not a JSON list of paths")
    return value


def _members(tar: _BoundedTarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        # A stream of members must not become a list of them in memory.
        tar.members.clear()
        yield member


def unpacked_members(path: Path) -> Iterator[Member]:
    """Every member of the archive and of each tar inside it that podman unpacks (its name ends in
    .tar), one at a time, each header read within the bounds read_configuration keeps; and the paths
    of deleted.files, which podman removes from the container's root file system.

    Podman writes the tars inside uncompressed; one that is not a readable uncompressed tar is
    CorruptArchive, as is an archive that cannot be read.
    """
    try:
        with _BoundedTarFile.open(path, mode="r:*") as tar:
            for member in _members(tar):
                name = _member_name(member)
                yield Member("", member.name, _kind(member), member.linkname)
                if name == DELETED_FILES:
                    for deleted in _read_list(tar, member, name):
                        yield Member(DELETED_FILES, deleted, "deleted")
                    continue
                if not (member.isreg() and member.size and name.endswith(NESTED_TAR_SUFFIX)):
                    continue
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise CorruptArchive(f"the archive's {name} cannot be read")
                try:
                    # "r:", not "r:*": a compressed one could inflate without bound.
                    with _BoundedTarFile.open(fileobj=extracted, mode="r:") as inner:
                        for nested in _members(inner):
                            yield Member(name, nested.name, _kind(nested), nested.linkname)
                except tarfile.ReadError as e:
                    raise CorruptArchive(f"the archive's {name} is not an uncompressed tar: {e}") from None
    except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as e:
        raise CorruptArchive(f"the archive cannot be read: {e}") from None


# Bytes a streamed judgement reads from its source at once (tarfile's own stream reads 10 KiB).
STREAM_READ = MiB


def _padded(size: int) -> int:
    return size + -size % tarfile.BLOCKSIZE


def streamed_members(stream: Any, dumps: dict[str, bytes]) -> Iterator[tuple[Member | None, int]]:
    """The members unpacked_members yields, read from a file that is still being written (a restore's
    bytes as they arrive: its reads wait for bytes, a seek forward skips them unread), each with the
    offset up to which its bytes may be handed on once the member is judged acceptable; (None,
    offset) when only the offset moves on. The data of a plain member is never read.

    A member's own bytes (its data included) are covered by its offset: what a plain member holds is
    not judged, only where it goes. A tar inside (rootfs-diff.tar, ...) is covered member by member,
    as each is read, and deleted.files once its paths are. config.dump and spec.dump go into `dumps`
    (within DUMP_LIMIT, each once), for the restore's policy before podman sees the archive.
    Raises CorruptArchive as unpacked_members does.
    """
    try:
        with _BoundedTarFile.open(fileobj=stream, mode="r:") as tar:
            for member in _members(tar):
                name = _member_name(member)
                end = member.offset_data + _padded(member.size)
                if name in (CONFIG_DUMP, SPEC_DUMP):
                    if name in dumps:
                        raise CorruptArchive(f"the archive holds {name} twice")
                    if not member.isreg():
                        raise CorruptArchive(f"the archive's {name} is not a regular file")
                    if member.size > DUMP_LIMIT:
                        raise CorruptArchive(f"the archive's {name} has {member.size} bytes, more than {DUMP_LIMIT}")
                    extracted = tar.extractfile(member)
                    dumps[name] = extracted.read() if extracted is not None else b""
                    yield Member("", member.name, _kind(member), member.linkname), end
                    continue
                if name == DELETED_FILES:
                    yield Member("", member.name, _kind(member), member.linkname), member.offset_data
                    for deleted in _read_list(tar, member, name):
                        yield Member(DELETED_FILES, deleted, "deleted"), member.offset_data
                    yield None, end
                    continue
                if not (member.isreg() and member.size and name.endswith(NESTED_TAR_SUFFIX)):
                    yield Member("", member.name, _kind(member), member.linkname), end
                    continue
                yield Member("", member.name, _kind(member), member.linkname), member.offset_data
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise CorruptArchive(f"the archive's {name} cannot be read")
                try:
                    # "r:", not "r:*": a compressed one could inflate without bound.
                    with _BoundedTarFile.open(fileobj=extracted, mode="r:") as inner:
                        for nested in _members(inner):
                            covered = member.offset_data + nested.offset_data + _padded(nested.size)
                            yield Member(name, nested.name, _kind(nested), nested.linkname), min(covered, end)
                except tarfile.ReadError as e:
                    raise CorruptArchive(f"the archive's {name} is not an uncompressed tar: {e}") from None
                yield None, end
    except (tarfile.TarError, OSError, EOFError, ValueError, RecursionError) as e:
        raise CorruptArchive(f"the archive cannot be read: {e}") from None
    for name in (CONFIG_DUMP, SPEC_DUMP):
        if name not in dumps:
            raise CorruptArchive(f"the archive holds no {name}: it is not a podman checkpoint")


def configuration_of(dumps: dict[str, bytes]) -> ContainerConfiguration:
    """config.dump and spec.dump as streamed_members kept them. Raises CorruptArchive."""
    found: dict[str, dict[str, Any]] = {}
    for name in (CONFIG_DUMP, SPEC_DUMP):
        if name not in dumps:
            raise CorruptArchive(f"the archive holds no {name}: it is not a podman checkpoint")
        try:
            value = json.loads(dumps[name])
        except ValueError as e:
            raise CorruptArchive(f"the archive's {name} cannot be read: {e}") from None
        if not isinstance(value, dict):
            raise CorruptArchive(f"the archive's {name} is not a JSON object")
        found[name] = value
    return ContainerConfiguration(config=found[CONFIG_DUMP], spec=found[SPEC_DUMP])


def configuration_tar(dumps: dict[str, bytes]) -> bytes:
    """A tar of only config.dump and spec.dump, the bytes judged: what podman's first reading of an
    import takes from it (it extracts those two, and reads the rest of the stream only to skip it)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in (CONFIG_DUMP, SPEC_DUMP):
            info = tarfile.TarInfo(name)
            info.size = len(dumps[name])
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(dumps[name]))
    return out.getvalue()
