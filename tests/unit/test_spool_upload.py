"""The streaming data path against an in-process S3 (moto): spool, concurrent parts, abort on failure."""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import zstandard
from moto import mock_aws

from checkpointer.adapters import storage as s3
from checkpointer.models import Compression
from checkpointer.spool import GrowingFile, write_spool

MiB = 1024 * 1024


@pytest.fixture
def bucket() -> Iterator[s3.S3Client]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="archives")
        yield client


def payload(size: int) -> bytes:
    half = size // 2
    return os.urandom(half) + (b"checkpointer " * (half // 13 + 1))[: size - half]


def chunks(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def start_upload(
    bucket: s3.S3Client, spool: GrowingFile, concurrency: int
) -> tuple[threading.Thread, dict[str, object]]:
    """Upload the spool in a thread, as the agent does while podman writes; the dict gets size or error."""
    outcome: dict[str, object] = {}

    def upload() -> None:
        try:
            outcome["size"] = s3.upload_spool(
                bucket,
                "archives",
                "k",
                spool,
                part_size=5 * MiB,
                concurrency=concurrency,
                limiter=s3.RateLimiter(0),
                on_progress=lambda _: None,
            )
        except BaseException as e:
            outcome["error"] = e

    thread = threading.Thread(target=upload)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("compression", list(Compression))
def test_archive_streams_into_s3_while_it_is_written(
    bucket: s3.S3Client, tmp_path: Path, compression: Compression
) -> None:
    raw = payload(13 * MiB)
    spool = GrowingFile(tmp_path / "a")
    thread, outcome = start_upload(bucket, spool, concurrency=3)
    size, sha, raw_size = write_spool(chunks(raw), spool, compression, 3)
    spool.finish()
    thread.join()
    stored = bucket.get_object(Bucket="archives", Key="k")["Body"].read()
    assert outcome["size"] == size == len(stored)
    assert hashlib.sha256(stored).hexdigest() == sha
    assert raw_size == len(raw)
    if compression is Compression.ZSTD:
        assert stored[:4] == b"\x28\xb5\x2f\xfd"
        assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == raw
    elif compression is Compression.GZIP:
        assert stored[:2] == b"\x1f\x8b"
        assert gzip.decompress(stored) == raw
    else:
        assert stored == raw
    assert not bucket.list_multipart_uploads(Bucket="archives").get("Uploads")


def test_a_failed_writer_aborts_the_upload(bucket: s3.S3Client, tmp_path: Path) -> None:
    spool = GrowingFile(tmp_path / "a")
    thread, outcome = start_upload(bucket, spool, concurrency=2)
    write_spool(chunks(payload(11 * MiB)), spool, Compression.NONE, 3)
    spool.finish(RuntimeError("podman failed"))
    thread.join()
    assert "podman failed" in str(outcome.get("error"))
    assert not bucket.list_multipart_uploads(Bucket="archives").get("Uploads")
    assert "Contents" not in bucket.list_objects_v2(Bucket="archives")


def test_stale_uploads_of_a_key_are_aborted(bucket: s3.S3Client) -> None:
    bucket.create_multipart_upload(Bucket="archives", Key="k")
    bucket.create_multipart_upload(Bucket="archives", Key="other")
    assert s3.abort_stale_uploads(bucket, "archives", "k") == 1
    left = [u["Key"] for u in bucket.list_multipart_uploads(Bucket="archives").get("Uploads", [])]
    assert left == ["other"]


def test_rate_limiter_spaces_out_parts() -> None:
    import time

    limiter = s3.RateLimiter(10 * MiB)
    start = time.monotonic()
    for _ in range(3):
        limiter.take(MiB)
    assert time.monotonic() - start >= 0.18


def test_parts_go_as_soon_as_written_but_completion_waits_for_the_verdict(bucket: s3.S3Client, tmp_path: Path) -> None:
    spool = GrowingFile(tmp_path / "a")
    thread, outcome = start_upload(bucket, spool, concurrency=2)
    size = write_spool(chunks(payload(11 * MiB)), spool, Compression.NONE, 3)[0]
    # Every byte is written, podman has not exited yet: all parts are up, the object is not.
    uploads = bucket.list_multipart_uploads(Bucket="archives").get("Uploads") or []
    assert len(uploads) == 1
    deadline = 50
    while (
        deadline
        and sum(
            p["Size"]
            for p in bucket.list_parts(Bucket="archives", Key="k", UploadId=uploads[0]["UploadId"]).get("Parts", [])
        )
        < size
    ):
        deadline -= 1
        thread.join(0.1)
    assert deadline, "the parts were not uploaded before the verdict"
    assert thread.is_alive() and "k" not in [
        o["Key"] for o in bucket.list_objects_v2(Bucket="archives").get("Contents", [])
    ]
    spool.finish()
    thread.join()
    assert outcome["size"] == size
