"""The bucket: an archive goes in as a checked multipart upload, comes out as ranged reads.

Every call to S3 that an archive's bytes need is a method here; services never hold a client.

Stored equals reported: every part goes with the CRC32 of the bytes the spool wrote, so the server
refuses a part that changed on the way; the completed object's composite checksum and size are
checked against the spool's digest before anyone reports it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import posixpath
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zstandard
from botocore.exceptions import ClientError
from s3transfer.utils import ReadFileChunk

from checkpointer import layout
from checkpointer.adapters.storage import StorageError, client
from checkpointer.archive.codec import READ_SIZE, ZSTD_MAGIC, CorruptArchive, crc32
from checkpointer.archive.spool import Digest, GrowingFile, SpoolFailed

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef, ObjectIdentifierTypeDef

    from checkpointer.adapters.kube import Kube
    from checkpointer.models import CheckpointStorage

log = logging.getLogger(__name__)
DOWNLOAD_WINDOW = 4  # parts downloading at once, and held in memory at most
Progress = Callable[[int], None]


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
    ) -> None:
        """Upload the spool as one multipart object while it may still be growing.

        `upload_id` resumes an open upload: its parts whose size and CRC32 match the spool's are
        kept, the others are sent. `on_started` receives the id of a new upload before any part
        goes, so that a restarted agent can resume it. A storage error leaves the upload open for
        that; a failed spool or a cancellation aborts it. Completed only on the spool's good verdict.
        """
        existing = self._parts(key, upload_id) if upload_id else None
        if existing is None:
            self.abort_uploads(key)  # one a crash left before its id was recorded
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
                if etag is None:
                    limiter.take(length)
                    # The part streams from the spool file: no part is ever held in memory whole.
                    with ReadFileChunk.from_filename(str(spool.path), start, length, enable_callbacks=False) as body:
                        etag = self._s3.upload_part(  # ReadFileChunk is the seekable body botocore streams
                            Bucket=self.bucket,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=body,  # type: ignore[arg-type]
                            ChecksumCRC32=sent,
                        )["ETag"]
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
            raise

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
        """Abort every open multipart upload of `key`; returns how many."""
        return self._abort_under(key, exact=True)

    def abort_uploads_under(self, directory: str) -> int:
        """Abort every open multipart upload under `directory/`; returns how many."""
        return self._abort_under(directory.rstrip("/") + "/", exact=False)

    def _abort_under(self, prefix: str, exact: bool) -> int:
        aborted = 0
        for page in self._s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if not exact or upload["Key"] == prefix:
                    self._abort(upload["Key"], upload["UploadId"])
                    aborted += 1
        return aborted

    # --- small objects ---------------------------------------------------------------------------

    def put_manifest(self, directory: str, manifest: dict[str, Any]) -> None:
        self._s3.put_object(
            Bucket=self.bucket,
            Key=f"{directory}/{layout.MANIFEST}",
            Body=json.dumps(manifest, indent=2).encode(),
            ContentType="application/json",
        )

    def manifest_sha256(self, key: str) -> str | None:
        """The sha256 recorded for `key` in the manifest beside it, when there is one."""
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=f"{posixpath.dirname(key)}/{layout.MANIFEST}")
        except ClientError:
            return None
        manifest = json.loads(body["Body"].read())
        for entry in manifest.get("archives", []):
            if entry.get("key") == key:
                return str(entry.get("sha256") or "") or None
        return None

    def put_log(self, key: str, content: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=key, Body=content, ContentType="text/plain")

    def delete_dir(self, directory: str) -> int:
        """Delete every object under `directory/` and abort its open uploads; returns objects deleted."""
        prefix = directory.rstrip("/") + "/"
        deleted = 0
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys: list[ObjectIdentifierTypeDef] = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        self._abort_under(prefix, exact=False)
        return deleted

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=key)

    # --- download --------------------------------------------------------------------------------

    def download(self, key: str, path: Path, on_progress: Callable[[int, int], None]) -> tuple[str, int]:
        """Download `key` into `path` with concurrent ranged GETs; returns the sha256 and size of the stored bytes.

        Parts are fetched DOWNLOAD_WINDOW at a time and consumed in order, so memory stays at that
        many parts. A zstd archive is decompressed on the way: podman reads its import twice (config
        first, then everything), and a plain tar spares it two decompressions, the larger part of
        its restore time. Raises ArchiveMissing, or CorruptArchive when the zstd stream is damaged.
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
        with (
            path.open("wb") as out,
            ThreadPoolExecutor(DOWNLOAD_WINDOW, thread_name_prefix="download") as pool,
            ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher,
        ):
            pending: deque[Future[bytearray]] = deque(
                pool.submit(part, start) for start in islice(starts, DOWNLOAD_WINDOW)
            )
            sink: Any = out
            try:
                while pending:
                    data = pending.popleft().result()
                    pending.extend(pool.submit(part, start) for start in islice(starts, 1))
                    if done == 0 and data.startswith(ZSTD_MAGIC):
                        sink = zstandard.ZstdDecompressor().stream_writer(out, closefd=False)
                    # Both let go of the GIL: the part is hashed while it is decompressed and written.
                    hashed = hasher.submit(digest.update, data)
                    sink.write(data)
                    hashed.result()
                    done += len(data)
                    on_progress(done, total)
                sink.flush()
            except zstandard.ZstdError as e:
                raise CorruptArchive(f"the archive cannot be read: {e}") from None
            finally:
                for future in pending:  # on any failure, parts not yet started are not fetched
                    future.cancel()
        return digest.hexdigest(), total


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class Stores:
    """An ArchiveStore for each CheckpointStorage, with one client per configuration and credentials:
    a boto3 client costs megabytes and milliseconds to make."""

    def __init__(self, kube: Kube, transfer: Transfer) -> None:
        self.kube = kube
        self.transfer = transfer
        self._clients: dict[tuple[str, str, object], S3Client] = {}
        self._lock = threading.Lock()

    def of(self, storage: CheckpointStorage) -> ArchiveStore:
        """The store of `storage`; raises ValueError when its Secret lacks a key, StorageError when unreadable."""
        credentials = self.kube.credentials(storage)
        key = (storage.metadata.name, storage.spec.model_dump_json(), credentials)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = client(storage, credentials, max_connections=self.transfer.concurrency + 2)
            s3 = self._clients[key]
        return ArchiveStore(s3, storage.spec.bucket, storage.spec.prefix, self.transfer)


__all__ = ["ArchiveMissing", "ArchiveStore", "Cancelled", "CorruptArchive", "StorageError", "Stores", "Transfer"]
