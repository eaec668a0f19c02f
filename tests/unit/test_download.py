"""A restore's download against an in-process S3 (moto): ordered concurrent ranges, zstd stored
decompressed, the sha256 of the downloaded bytes, and CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND pacing."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import cast

import boto3
import pytest
import zstandard
from moto import mock_aws

from checkpointer.archive import manifest
from checkpointer.archive.store import ArchiveStore, RateLimiter, Transfer
from checkpointer.errors import Failure
from checkpointer.reasons import Reason
from checkpointer.services import restore
from checkpointer.settings import Settings
from checkpointer.status import StatusWriter

MiB = 1024 * 1024


class Progress:
    def __init__(self) -> None:
        self.last: tuple[int, int | None] = (0, None)

    def progress(self, done: int, total: int | None = None, force: bool = False) -> None:
        self.last = (done, total)


def download(tmp_path: Path, data: bytes, bytes_per_second: int, key: str = "k.tar") -> tuple[float, bytes]:
    """Fetch `data` as the agent does, in 5 MiB ranges fetched concurrently; returns the seconds taken
    and what was stored on the node."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="archives")
        client.put_object(Bucket="archives", Key=key, Body=data)
        progress = Progress()
        start = time.monotonic()
        transfer = Transfer(5 * MiB, 4, RateLimiter(0), RateLimiter(bytes_per_second))
        store = ArchiveStore(client, "archives", "", transfer)
        unsigned = manifest.Trust(None, signed=False)
        digest = restore._fetch(
            Settings(), store, None, key, tmp_path / "stored", cast(StatusWriter, progress), unsigned
        )
        elapsed = time.monotonic() - start
    assert digest == hashlib.sha256(data).hexdigest()
    assert progress.last == (len(data), len(data))
    return elapsed, (tmp_path / "stored").read_bytes()


def test_ranges_are_stored_in_order(tmp_path: Path) -> None:
    data = os.urandom(23 * MiB)  # five ranges, the last one short
    assert download(tmp_path, data, 0)[1] == data


def test_zstd_archive_is_stored_decompressed_and_hashed_as_downloaded(tmp_path: Path) -> None:
    raw = os.urandom(6 * MiB) + b"compressible " * MiB
    # Two frames, as a concatenation of zstd outputs would have: both must be decompressed.
    frames = zstandard.ZstdCompressor().compress(raw[: 3 * MiB]) + zstandard.ZstdCompressor().compress(raw[3 * MiB :])
    assert download(tmp_path, frames, 0, key="k.tar.zst")[1] == raw


def test_corrupt_zstd_fails_as_corrupt(tmp_path: Path) -> None:
    # With a content checksum, as the agent writes its frames, any damage is caught.
    data = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(MiB)))
    data[100:200] = b"\0" * 100
    with pytest.raises(Failure) as failed:
        download(tmp_path, bytes(data), 0, key="k.tar.zst")
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT


def test_download_is_paced_across_its_concurrent_ranges(tmp_path: Path) -> None:
    data = os.urandom(12 * MiB)  # three ranges, fetched by three threads at once
    # 12 MiB at 16 MiB/s: about 0.75 s however the threads share the bytes; unlimited, far less.
    assert download(tmp_path, data, 16 * MiB)[0] >= 0.6


def test_download_rate_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND", raising=False)
    assert Settings().download_bytes_per_second == 0
    monkeypatch.setenv("CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND", str(8 * MiB))
    assert Settings().download_bytes_per_second == 8 * MiB
