"""The bucket: an archive goes in as a checked multipart upload, comes out as ranged reads.

Every call to S3 that an archive's bytes need is a method here; services never hold a client.

Stored equals reported: every part goes with the CRC32 of the bytes the spool wrote, so the server
refuses a part that changed on the way; the completed object's composite checksum and size are
checked against the spool's digest before anyone reports it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import zstandard
from botocore.exceptions import ClientError
from s3transfer.utils import ReadFileChunk

from checkpointer import layout
from checkpointer.adapters.storage import StorageError, client
from checkpointer.archive import encryption, manifest
from checkpointer.archive.codec import READ_SIZE, ZSTD_MAGIC, CorruptArchive, crc32
from checkpointer.archive.encryption import Data, Keys
from checkpointer.archive.spool import Digest, GrowingFile, SpoolFailed

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, ObjectIdentifierTypeDef

    from checkpointer.adapters.kube import Kube
    from checkpointer.models import CheckpointStorage

log = logging.getLogger(__name__)
DOWNLOAD_WINDOW = 4  # parts downloading at once, and held in memory at most
# A manifest is a few KiB: one larger is not read whole.
MANIFEST_MAX_BYTES = 1024 * 1024
# zstd's own default limit is 128 MiB; every level up to 19 (and podman's zstd) stays within 8 MiB.
ZSTD_MAX_WINDOW = 32 * 1024 * 1024
Progress = Callable[[int], None]
# A streamed part is readable: its index (from 0), the sha256 of the archive up to its end, its length.
PartLanded = Callable[[int, str, int], None]


def _sha256_of(path: Path, start: int, length: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0:
            chunk = f.read(min(READ_SIZE, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


class ArchiveMissing(Exception):
    """The key is not in the bucket."""


class StoredMismatch(Exception):
    """The bucket holds other bytes than the spool's digest says were sent."""


class Cancelled(Exception):
    """The upload was stopped because its object is being deleted."""


class RateLimiter:
    """A token bucket shared by the transfer workers; rate 0 means unlimited."""

    def __init__(self, bytes_per_second: int) -> None:
        self.rate = bytes_per_second
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def take(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            start = max(self._next, time.monotonic())
            self._next = start + nbytes / self.rate
        delay = start - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def checksum(crc: int) -> str:
    """S3's base64 form of a CRC32."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def composite_checksum(part_crc32: Iterable[int]) -> str:
    """The checksum S3 reports for a multipart object: the CRC32 of its parts' CRC32s, and their count."""
    crcs = list(part_crc32)
    return f"{checksum(crc32(b''.join(c.to_bytes(4, 'big') for c in crcs)))}-{len(crcs)}"


@dataclass(frozen=True)
class Transfer:
    """How much a store moves at once, and how fast."""

    part_size: int
    concurrency: int
    upload_limiter: RateLimiter
    download_limiter: RateLimiter


class ArchiveStore:
    """A CheckpointStorage's bucket and prefix, with what checkpoints and restores do in it."""

    def __init__(self, s3: S3Client, bucket: str, prefix: str, transfer: Transfer) -> None:
        self._s3 = s3
        self.bucket = bucket
        self.prefix = prefix
        self.transfer = transfer

    def uri(self, key: str) -> str:
        return layout.uri(self.bucket, key)

    def reachable(self) -> None:
        """Raise StorageError unless the bucket answers with these credentials."""
        self._s3.head_bucket(Bucket=self.bucket)

    # --- upload ----------------------------------------------------------------------------------

    def upload(
        self,
        key: str,
        spool: GrowingFile,
        *,
        upload_id: str,
        on_started: Callable[[str], None],
        on_progress: Progress,
        cancelled: threading.Event,
        on_part: PartLanded | None = None,
    ) -> None:
        """Upload the spool as one multipart object while it may still be growing.

        With `on_part`, every part is first stored as an object of its own (layout.part_key) and
        copied into the upload by the server (UploadPartCopy), and `on_part` receives its index,
        the sha256 of the archive's bytes up to its end, and its length once it is readable: a
        restore may read the parts while the export goes on, and checks each with the running sha256
        of the whole it takes anyway. The part objects are removed once the upload is completed or aborted.

        `upload_id` resumes an open upload: its parts whose size and CRC32 match the spool's are
        kept, the others are sent. `on_started` receives the id of a new upload before any part
        goes, so that a restarted agent can resume it. A storage error leaves the upload open for
        that; a failed spool or a cancellation aborts it. Completed only on the spool's good verdict.
        """
        existing = self._parts(key, upload_id) if upload_id else None
        if existing is None:
            # No other upload of the key is aborted here: an upload is ended only by the id its
            # starter recorded. One a crash left before its id was recorded is the bucket sweep's
            # once its object is finished, or the controller's when the object is deleted.
            upload_id = self._s3.create_multipart_upload(Bucket=self.bucket, Key=key, ChecksumAlgorithm="CRC32")[
                "UploadId"
            ]
            on_started(upload_id)
            existing = {}
        parts: dict[int, CompletedPartTypeDef] = {}
        done = 0
        lock = threading.Lock()
        next_index = 0
        stop = threading.Event()
        limiter = self.transfer.upload_limiter

        def worker() -> None:
            nonlocal next_index, done
            while not stop.is_set():
                if cancelled.is_set():
                    raise Cancelled(key)
                with lock:
                    index, next_index = next_index, next_index + 1
                part = spool.part(index)
                if part is None:
                    return
                start, length, crc = part
                number, sent = index + 1, checksum(crc)
                stored = existing.get(number, {})
                same = stored.get("ChecksumCRC32") == sent and stored.get("Size") == length
                etag = stored.get("ETag") if same else None
                sha256 = ""
                if on_part is not None:
                    # Of the archive up to this part's end: taken as the spool was written, else read now.
                    sha256 = spool.prefix_sha256(index) or _sha256_of(spool.path, 0, start + length)
                if etag is None:
                    limiter.take(length)
                    if on_part is not None:
                        # Readable, and said so, before the server copies it into the upload.
                        self._put_part(key, number, spool.path, start, length, sent)
                        on_part(index, sha256, length)
                        etag = self._copy_part(key, upload_id, number)
                    else:
                        # The part streams from the spool file: no part is ever held in memory whole.
                        with ReadFileChunk.from_filename(
                            str(spool.path), start, length, enable_callbacks=False
                        ) as body:
                            etag = self._s3.upload_part(  # ReadFileChunk is the seekable body botocore streams
                                Bucket=self.bucket,
                                Key=key,
                                UploadId=upload_id,
                                PartNumber=number,
                                Body=body,  # type: ignore[arg-type]
                                ChecksumCRC32=sent,
                            )["ETag"]
                elif on_part is not None:  # stored before a restart: readable as the archive's range once complete
                    on_part(index, sha256, length)
                with lock:
                    parts[number] = {"PartNumber": number, "ETag": etag, "ChecksumCRC32": sent}
                    done += length
                    on_progress(done)
                if length < spool.part_size:
                    return

        try:
            with ThreadPoolExecutor(max_workers=self.transfer.concurrency, thread_name_prefix="upload") as pool:
                futures = [pool.submit(worker) for _ in range(self.transfer.concurrency)]
                for future in futures:
                    try:
                        future.result()
                    except BaseException:
                        stop.set()
                        raise
            size = spool.verdict()  # completed only once podman has succeeded and the spool is on disk
            if done != size:
                raise SpoolFailed(f"spool incomplete: uploaded {done} of {size} bytes")
            self._s3.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": [parts[n] for n in sorted(parts)]},
            )
        except (SpoolFailed, Cancelled):
            self._abort(key, upload_id)
            if on_part is not None:
                self.delete_parts(key)
            raise
        if on_part is not None:
            self.delete_parts(key)

    def _put_part(self, key: str, number: int, path: Path, start: int, length: int, sent: str) -> None:
        """Store one part as an object of its own, with the CRC32 of the bytes the spool wrote."""
        part = layout.part_key(key, number)
        with ReadFileChunk.from_filename(str(path), start, length, enable_callbacks=False) as body:
            self._s3.put_object(Bucket=self.bucket, Key=part, Body=body, ChecksumCRC32=sent)  # type: ignore[arg-type]

    def _copy_part(self, key: str, upload_id: str, number: int) -> str:
        """Have the server copy a stored part into the upload (UploadPartCopy), keeping its CRC32."""
        part = layout.part_key(key, number)
        copied = self._s3.upload_part_copy(
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            CopySource={"Bucket": self.bucket, "Key": part},
        )
        return str(copied["CopyPartResult"]["ETag"])

    def part_keys(self, key: str) -> list[str]:
        """The part objects of a streamed archive still in the bucket."""
        found: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=key + layout.PART_INFIX
        ):
            found += [str(o["Key"]) for o in page.get("Contents", [])]
        return found

    def delete_parts(self, key: str) -> int:
        """Remove the part objects of a streamed archive; returns how many there were."""
        keys = self.part_keys(key)
        for start in range(0, len(keys), 1000):
            objects: list[ObjectIdentifierTypeDef] = [{"Key": k} for k in keys[start : start + 1000]]
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
        return len(keys)

    def read_part(self, key: str, number: int, start: int, length: int) -> bytearray:
        """Part `number` of a streamed archive: its own object while it streams, else the range of
        the completed archive (the part objects go once it is completed). Raises ArchiveMissing."""
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=layout.part_key(key, number))["Body"]
        except ClientError as e:
            if _code(e) not in ("404", "NoSuchKey", "NotFound"):
                raise
            try:
                end = start + length - 1
                body = self._s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
            except ClientError as e2:
                if _code(e2) in ("404", "NoSuchKey", "NotFound", "InvalidRange"):
                    raise ArchiveMissing(
                        f"part {number} of {self.uri(key)} is in the bucket neither alone nor in the archive"
                    ) from None
                raise
        limiter = self.transfer.download_limiter
        data = bytearray()
        with body:
            for chunk in body.iter_chunks(READ_SIZE):
                limiter.take(len(chunk))
                data += chunk
        return data

    def _parts(self, key: str, upload_id: str) -> dict[int, Any] | None:
        """The parts of an open upload by number; None once it is no longer open."""
        found: dict[int, Any] = {}
        try:
            for page in self._s3.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                found.update({p["PartNumber"]: p for p in page.get("Parts", [])})
        except ClientError as e:
            if _code(e) in ("NoSuchUpload", "404", "NotFound"):
                return None
            raise
        return found

    def verify(self, key: str, digest: Digest) -> None:
        """Raise StoredMismatch unless the stored object has the digest's size and part checksums."""
        head = self._s3.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        if head["ContentLength"] != digest.size:
            raise StoredMismatch(f"{self.uri(key)} holds {head['ContentLength']} bytes, the spool {digest.size}")
        stored = head.get("ChecksumCRC32")
        expected = composite_checksum(digest.part_crc32)
        if stored is None:
            raise StoredMismatch(f"{self.uri(key)} has no CRC32 checksum: the storage did not check the parts")
        if stored != expected and not (len(digest.part_crc32) == 1 and stored == expected.split("-")[0]):
            raise StoredMismatch(f"{self.uri(key)} has checksum {stored}, the spool's parts make {expected}")

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as e:
            if _code(e) not in ("NoSuchUpload", "404"):
                raise

    def abort_uploads(self, key: str) -> int:
        """Abort every open multipart upload of exactly `key`, whoever started it; returns how many.

        Only for the controller's deletion of the checkpoint whose own key it is (a checkpoint's
        folder holds its uid: layout.archive_dir). The agent aborts only the uploads it started, by
        the ids it recorded (abort_upload)."""
        aborted = 0
        for page in self._s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=key):
            for upload in page.get("Uploads", []):
                if upload["Key"] == key:
                    self._abort(key, upload["UploadId"])
                    aborted += 1
        return aborted

    def open_uploads(self, under: str) -> list[tuple[str, str]]:
        """Every open multipart upload whose key is below the folder `under`, as (key, upload id)."""
        start = f"{under.strip('/')}/" if under.strip("/") else ""
        found = []
        for page in self._s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=start):
            found += [(str(u["Key"]), str(u["UploadId"])) for u in page.get("Uploads", [])]
        return found

    def abort_upload(self, key: str, upload_id: str) -> bool:
        """Abort one multipart upload; False when it was already completed or aborted."""
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as e:
            if _code(e) not in ("NoSuchUpload", "404"):
                raise
            return False
        return True

    # --- small objects ---------------------------------------------------------------------------

    def put_manifest(self, directory: str, document: dict[str, Any]) -> str:
        """Write the manifest of `directory`; returns the sha256 of the bytes written."""
        body = manifest.body(document)
        self._s3.put_object(
            Bucket=self.bucket, Key=f"{directory}/{layout.MANIFEST}", Body=body, ContentType="application/json"
        )
        return hashlib.sha256(body).hexdigest()

    def manifest_bytes(self, directory: str) -> bytes | None:
        """The manifest of `directory` as stored, at most MANIFEST_MAX_BYTES; None when there is none.

        Raises CorruptArchive for a larger one: no manifest checkpointer writes is near that size.
        """
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=f"{directory}/{layout.MANIFEST}")["Body"]
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        with body:
            data = body.read(MANIFEST_MAX_BYTES + 1)
        if len(data) > MANIFEST_MAX_BYTES:
            raise CorruptArchive(f"{self.uri(directory)}/{layout.MANIFEST} is larger than {MANIFEST_MAX_BYTES} bytes")
        return data

    def manifest_directories(self, under: str) -> Iterator[str]:
        """Every folder below `under` that holds a manifest, in the bucket's listing order."""
        start = f"{under.strip('/')}/" if under.strip("/") else ""
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
            for stored in page.get("Contents", []):
                directory, _, name = stored.get("Key", "").rpartition("/")
                if name == layout.MANIFEST and directory:
                    yield directory

    def exists(self, key: str) -> bool:
        return self._exists(key)

    def put_log(self, key: str, content: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=key, Body=content, ContentType="text/plain")

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=key)

    def delete_keys(self, keys: Iterable[str]) -> int:
        """Delete exactly these objects and abort the open uploads of exactly these keys; returns how
        many of them existed. Nothing else is touched, even in a folder they share with others."""
        wanted = sorted(set(keys))
        deleted = 0
        for start in range(0, len(wanted), 1000):  # what one DeleteObjects takes
            batch = wanted[start : start + 1000]
            present = [k for k in batch if self._exists(k)]
            if present:
                objects: list[ObjectIdentifierTypeDef] = [{"Key": k} for k in present]
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
                deleted += len(present)
        for key in wanted:
            self.abort_uploads(key)
        return deleted

    def _exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    # --- download --------------------------------------------------------------------------------

    def download(
        self,
        key: str,
        path: Path,
        on_progress: Callable[[int, int], None],
        *,
        keys: Keys | None = None,
        limit: int | None = None,
    ) -> tuple[str, int]:
        """Download `key` into `path` with concurrent ranged GETs; returns the sha256 and size of the stored bytes.

        Parts are fetched DOWNLOAD_WINDOW at a time and consumed in order, so memory stays at that
        many parts. An age-encrypted archive is decrypted on the way with the identity of `keys`,
        and a zstd archive decompressed: podman reads its import twice (config first, then
        everything), and a plain tar spares it two decompressions, the larger part of its restore
        time. What is written to `path` may not grow past `limit` bytes, so that a small object
        that inflates hugely (a zstd bomb) fills neither the node's disk nor the agent's memory.
        Raises ArchiveMissing, or CorruptArchive (and removes `path`) when the bytes cannot be
        decrypted, the zstd stream is damaged, or the output passes `limit`.
        """
        try:
            total = self._s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                raise ArchiveMissing(f"{self.uri(key)} does not exist") from None
            raise
        part_size = self.transfer.part_size
        limiter = self.transfer.download_limiter

        def part(start: int) -> bytearray:
            end = min(start + part_size, total) - 1
            body = self._s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")["Body"]
            data = bytearray()
            for chunk in body.iter_chunks(READ_SIZE):
                limiter.take(len(chunk))  # a capped downlink slows every part alike
                data += chunk
            if len(data) != end - start + 1:
                raise RuntimeError(f"{key}: got {len(data)} bytes of range {start}-{end}")
            return data

        digest = hashlib.sha256()
        done = 0
        starts = iter(range(0, total, part_size))
        try:
            with (
                path.open("wb") as out,
                ThreadPoolExecutor(DOWNLOAD_WINDOW, thread_name_prefix="download") as pool,
                ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher,
            ):
                pending: deque[Future[bytearray]] = deque(
                    pool.submit(part, start) for start in islice(starts, DOWNLOAD_WINDOW)
                )

                def stored() -> Iterator[bytearray]:
                    """The object's bytes in order, each part hashed while the next stage works on it."""
                    nonlocal done
                    while pending:
                        data = pending.popleft().result()
                        pending.extend(pool.submit(part, start) for start in islice(starts, 1))
                        # Both let go of the GIL: the part is hashed while it is decrypted or decompressed.
                        hashed = hasher.submit(digest.update, data)
                        yield data
                        hashed.result()
                        done += len(data)
                        on_progress(done, total)

                sink = PlaintextSink(CappedFile(out, limit, self.uri(key)))
                try:
                    parts = stored()
                    first = next(parts, None)
                    if first is not None:
                        rest = chain([first], parts)
                        if encryption.is_encrypted(first):
                            if keys is None or keys.identity is None:
                                raise encryption.Undecryptable(
                                    f"{self.uri(key)} is encrypted (age), and its storage has no identity to "
                                    "decrypt it with (the encryption Secret's key identity)"
                                )
                            encryption.decrypt(rest, sink.write, keys.identity)
                        else:
                            for data in rest:
                                sink.write(data)
                    sink.flush()
                except zstandard.ZstdError as e:
                    raise CorruptArchive(f"the archive cannot be read: {e}") from None
                finally:
                    for future in pending:  # on any failure, parts not yet started are not fetched
                        future.cancel()
        except CorruptArchive:
            path.unlink(missing_ok=True)
            raise
        return digest.hexdigest(), total


class ArchiveTooLarge(CorruptArchive):
    """The archive inflates past what may be written for it on the node."""


class CappedFile:
    """The node-side file of a download, refusing to grow past `limit` bytes."""

    def __init__(self, out: BinaryIO, limit: int | None, uri: str) -> None:
        self._out = out
        self._limit = limit
        self._uri = uri
        self.written = 0

    def write(self, data: Data) -> int:
        self.written += len(data)
        if self._limit is not None and self.written > self._limit:
            raise ArchiveTooLarge(
                f"{self._uri} inflates past {self._limit} bytes, more than its manifest states or the "
                "node may hold (CHECKPOINTER_MAX_ARCHIVE_BYTES, the spool's free space less "
                "CHECKPOINTER_SPOOL_MIN_FREE_BYTES)"
            )
        return self._out.write(data)


class PlaintextSink:
    """Where the plaintext of an archive goes: decompressed on the way when it is zstd."""

    def __init__(self, out: CappedFile) -> None:
        self._out = out
        self._sink: Any = None

    def write(self, data: Data) -> None:
        if self._sink is None:
            if bytes(data[: len(ZSTD_MAGIC)]) == ZSTD_MAGIC:
                # A bounded window: a frame may not make the agent allocate more than ZSTD_MAX_WINDOW.
                decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
                # It needs only write(): the capped file is not a whole IO.
                self._sink = decompressor.stream_writer(cast(BinaryIO, self._out), closefd=False)
            else:
                self._sink = self._out
        self._sink.write(data)

    def flush(self) -> None:
        if self._sink is not None and self._sink is not self._out:
            self._sink.flush()


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class Stores:
    """An ArchiveStore for each CheckpointStorage, with one client per configuration and credentials:
    a boto3 client costs megabytes and milliseconds to make."""

    def __init__(self, kube: Kube, transfer: Transfer) -> None:
        self.kube = kube
        self.transfer = transfer
        # By storage name: the client of its current spec and credentials. A changed storage or
        # rotated credentials replace the client, so clients never pile up.
        self._clients: dict[str, tuple[tuple[str, object], S3Client]] = {}
        self._lock = threading.Lock()

    def of(self, storage: CheckpointStorage) -> ArchiveStore:
        """The store of `storage`; raises ValueError when its Secret lacks a key, StorageError when unreadable."""
        credentials = self.kube.credentials(storage)
        configuration = (storage.spec.model_dump_json(), credentials)
        with self._lock:
            known = self._clients.get(storage.metadata.name)
            if known is None or known[0] != configuration:
                made = client(storage, credentials, max_connections=self.transfer.concurrency + 2)
                known = self._clients[storage.metadata.name] = (configuration, made)
            s3 = known[1]
        return ArchiveStore(s3, storage.spec.bucket, storage.spec.prefix, self.transfer)


__all__ = ["ArchiveMissing", "ArchiveStore", "Cancelled", "CorruptArchive", "StorageError", "Stores", "Transfer"]
