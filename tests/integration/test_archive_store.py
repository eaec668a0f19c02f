"""The archive's byte path against a real S3 server: spool, concurrent checked parts, resume, verify, abort."""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from botocore.exceptions import ClientError

from checkpointer.archive import spool as spooling
from checkpointer.archive.spool import Digest, GrowingFile, SpoolFailed
from checkpointer.archive.store import ArchiveStore, RateLimiter, StoredMismatch, Transfer
from checkpointer.models import Compression
from localenv.procs import BIN, require
from localenv.s3 import S3Server

MiB = 1024 * 1024
PART = 5 * MiB


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    require((BIN / "versitygw").exists(), "the S3 server is not built: run hack/install.sh")
    s3 = S3Server.start(tmp_path_factory.mktemp("s3"))
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture
def store(server: S3Server) -> Iterator[ArchiveStore]:
    yield ArchiveStore(server.client(), server.bucket, "", Transfer(PART, 3, RateLimiter(0), RateLimiter(0)))
    assert not open_uploads(server), "a test left a multipart upload open"


def open_uploads(server: S3Server) -> list[Any]:
    return list(server.client().list_multipart_uploads(Bucket=server.bucket).get("Uploads", []))


def payload(size: int) -> bytes:
    half = size // 2
    return os.urandom(half) + (b"checkpointer " * (half // 13 + 1))[: size - half]


def chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def start_upload(
    store: ArchiveStore,
    key: str,
    spool: GrowingFile,
    upload_id: str = "",
    on_progress: Callable[[int], None] = lambda _: None,
) -> tuple[threading.Thread, dict[str, Any]]:
    """Upload in a thread, as the agent does while podman writes; the dict gets the upload id and any error."""
    outcome: dict[str, Any] = {}

    def upload() -> None:
        try:
            store.upload(
                key,
                spool,
                upload_id=upload_id,
                on_started=lambda i: outcome.__setitem__("id", i),
                on_progress=on_progress,
                cancelled=threading.Event(),
            )
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=upload)
    thread.start()
    return thread, outcome


def sent_parts(store: ArchiveStore) -> list[int]:
    """Part numbers the store's client sends from now on."""
    sent: list[int] = []
    store._s3.meta.events.register(
        "before-parameter-build.s3.UploadPart", lambda params, **_: sent.append(params["PartNumber"])
    )
    return sent


@pytest.mark.parametrize("compression", list(Compression))
def test_archive_streams_into_s3_while_it_is_written_and_is_verified(
    store: ArchiveStore, tmp_path: Path, compression: Compression
) -> None:
    raw = payload(13 * MiB)
    spool = GrowingFile(tmp_path / "a", PART)
    key = f"stream/{compression}"
    thread, outcome = start_upload(store, key, spool)
    digest, raw_size = spooling.write(chunks(raw), spool, compression, 3)
    spool.finish()
    thread.join()
    assert "error" not in outcome
    stored = store._s3.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    assert digest.size == len(stored) and hashlib.sha256(stored).hexdigest() == digest.sha256
    assert raw_size == len(raw)
    assert spooling.hashed_file(spool.path, PART)[0] == digest
    store.verify(key, digest)
    if compression is Compression.ZSTD:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == raw
    elif compression is Compression.GZIP:
        assert gzip.decompress(stored) == raw
    else:
        assert stored == raw


def test_a_failed_writer_aborts_the_upload(store: ArchiveStore, tmp_path: Path) -> None:
    spool = GrowingFile(tmp_path / "a", PART)
    thread, outcome = start_upload(store, "failed", spool)
    spooling.write(chunks(payload(11 * MiB)), spool, Compression.NONE, 3)
    spool.finish(RuntimeError("podman failed"))
    thread.join()
    assert isinstance(outcome.get("error"), SpoolFailed) and "podman failed" in str(outcome["error"])
    assert "Contents" not in store._s3.list_objects_v2(Bucket=store.bucket, Prefix="failed")


def test_an_interrupted_upload_resumes_by_part(store: ArchiveStore, tmp_path: Path) -> None:
    data = payload(23 * MiB)  # five parts
    path = tmp_path / "a"
    path.write_bytes(data)
    digest = spooling.hashed_file(path, PART)[0]

    def fail_after_two(done: int) -> None:
        if done >= 2 * PART:
            raise ConnectionError("the storage went away")

    small = ArchiveStore(store._s3, store.bucket, "", Transfer(PART, 1, RateLimiter(0), RateLimiter(0)))
    thread, first = start_upload(small, "resumed", GrowingFile.finished(path, digest), on_progress=fail_after_two)
    thread.join()
    assert isinstance(first.get("error"), ConnectionError)
    sent = sent_parts(store)
    thread, second = start_upload(store, "resumed", GrowingFile.finished(path, digest), upload_id=first["id"])
    thread.join()
    assert "error" not in second and "id" not in second, "the open upload was resumed, not begun again"
    assert sorted(sent) == [3, 4, 5]
    store.verify("resumed", digest)


def test_a_part_that_changed_on_the_node_is_refused(store: ArchiveStore, tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.write_bytes(payload(7 * MiB))
    digest = spooling.hashed_file(path, PART)[0]
    with path.open("r+b") as f:  # one byte of the second part flips after the spool was hashed
        f.seek(PART + 10)
        f.write(b"\xff" if f.read(1) != b"\xff" else b"\x00")
    thread, outcome = start_upload(store, "changed", GrowingFile.finished(path, digest))
    thread.join()
    assert isinstance(outcome.get("error"), ClientError) and "BadDigest" in str(outcome["error"])
    assert store.abort_uploads("changed") == 1


def test_verify_tells_other_bytes_from_the_spool(store: ArchiveStore, tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.write_bytes(payload(6 * MiB))
    digest = spooling.hashed_file(path, PART)[0]
    thread, outcome = start_upload(store, "replaced", GrowingFile.finished(path, digest))
    thread.join()
    assert "error" not in outcome
    store.verify("replaced", digest)
    store._s3.put_object(Bucket=store.bucket, Key="replaced", Body=path.read_bytes())
    with pytest.raises(StoredMismatch):
        store.verify("replaced", digest)  # same bytes, but no part checksums: not what was checked
    with pytest.raises(StoredMismatch):
        store.verify("replaced", Digest(digest.size + 1, digest.sha256, PART, digest.part_crc32))


def test_stale_uploads_of_a_key_are_aborted(store: ArchiveStore) -> None:
    store._s3.create_multipart_upload(Bucket=store.bucket, Key="k")
    store._s3.create_multipart_upload(Bucket=store.bucket, Key="k-other")
    assert store.abort_uploads("k") == 1
    assert store.abort_uploads("k") == 0, "only the uploads of exactly that key"
    assert store.abort_uploads("k-other") == 1


def test_rate_limiter_spaces_out_parts() -> None:
    limiter = RateLimiter(10 * MiB)
    start = time.monotonic()
    for _ in range(3):
        limiter.take(MiB)
    assert time.monotonic() - start >= 0.18


def test_parts_go_as_soon_as_written_but_completion_waits_for_the_verdict(
    store: ArchiveStore, server: S3Server, tmp_path: Path
) -> None:
    spool = GrowingFile(tmp_path / "a", PART)
    thread, outcome = start_upload(store, "verdict", spool)
    digest, _ = spooling.write(chunks(payload(11 * MiB)), spool, Compression.NONE, 3)
    # Every byte is written, podman has not exited yet: all parts are up, the object is not.
    [upload] = open_uploads(server)
    deadline = time.monotonic() + 10
    while (
        sum(
            p["Size"]
            for p in store._s3.list_parts(Bucket=store.bucket, Key="verdict", UploadId=upload["UploadId"]).get(
                "Parts", []
            )
        )
        < digest.size
    ):
        assert time.monotonic() < deadline, "the parts were not uploaded before the verdict"
        thread.join(0.1)
    assert thread.is_alive()
    assert "Contents" not in store._s3.list_objects_v2(Bucket=store.bucket, Prefix="verdict")
    spool.finish()
    thread.join()
    assert "error" not in outcome
    store.verify("verdict", digest)
