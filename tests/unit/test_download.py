"""A restore's download against an in-process S3 (moto): CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND paces it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import cast

import boto3
import pytest
from moto import mock_aws

from checkpointer.adapters import storage as s3
from checkpointer.services import restore
from checkpointer.services.agent import StatusWriter
from checkpointer.settings import Settings

MiB = 1024 * 1024


class Progress:
    def __init__(self) -> None:
        self.last: tuple[int, int | None] = (0, None)

    def progress(self, done: int, total: int | None = None, force: bool = False) -> None:
        self.last = (done, total)


def download(tmp_path: Path, data: bytes, bytes_per_second: int) -> float:
    """Download `data` as the agent does, with 5 MiB ranges fetched concurrently; returns the seconds taken."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="archives")
        client.put_object(Bucket="archives", Key="k.tar", Body=data)
        progress = Progress()
        start = time.monotonic()
        restore._download(
            s3.Bucket(client, "archives", ""),
            "k.tar",
            tmp_path / "k.tar",
            cast(StatusWriter, progress),
            5 * MiB,
            s3.RateLimiter(bytes_per_second),
        )
        elapsed = time.monotonic() - start
    assert (tmp_path / "k.tar").read_bytes() == data
    assert progress.last == (len(data), len(data))
    return elapsed


def test_download_is_paced_across_its_concurrent_ranges(tmp_path: Path) -> None:
    data = os.urandom(12 * MiB)  # three ranges, fetched by three threads at once
    # 12 MiB at 16 MiB/s: about 0.75 s however the threads share the bytes; unlimited, far less.
    assert download(tmp_path, data, 16 * MiB) >= 0.6


def test_download_rate_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND", raising=False)
    assert Settings().download_bytes_per_second == 0
    monkeypatch.setenv("CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND", str(8 * MiB))
    assert Settings().download_bytes_per_second == 8 * MiB
