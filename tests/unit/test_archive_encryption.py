"""Encryption at rest and the bounded download: the spool encrypts after compression (what is hashed
and checked is the age file), the download decrypts and decompresses on the way, and what it writes
on the node is capped, against an in-process S3 (moto)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import boto3
import pyrage
import pytest
import zstandard
from moto import mock_aws
from pyrage import x25519

from checkpointer import layout
from checkpointer.archive import encryption, manifest
from checkpointer.archive import spool as spooling
from checkpointer.archive.encryption import Keys
from checkpointer.archive.spool import GrowingFile
from checkpointer.archive.store import ArchiveStore, RateLimiter, Transfer
from checkpointer.archive.workfolder import SpoolRecord, WorkFolder
from checkpointer.errors import Failure
from checkpointer.models import Compression
from checkpointer.reasons import Reason
from checkpointer.services import restore
from checkpointer.settings import Settings
from checkpointer.status import StatusWriter

MiB = 1024 * 1024
IDENTITY = x25519.Identity.generate()
RECIPIENT = str(IDENTITY.to_public())
KEYS = Keys((RECIPIENT,), str(IDENTITY))


class Progress:
    def progress(self, done: int, total: int | None = None, force: bool = False) -> None:
        pass


def workload(size: int) -> bytes:
    """Half incompressible, half compressible, as the benchmark's memory."""
    return os.urandom(size // 2) + b"checkpoint " * (size // 2 // 11) + b"x" * (size // 2 % 11)


def spool_write(tmp_path: Path, raw: bytes, recipients: tuple[str, ...]) -> tuple[spooling.Digest, int, Path]:
    path = tmp_path / "web.tar.zst.age"
    spool = GrowingFile(path, 4 * MiB)
    chunks = (raw[i : i + MiB] for i in range(0, len(raw), MiB))
    digest, size = spooling.write(chunks, spool, Compression.ZSTD, 3, recipients)
    return digest, size, path


def test_spool_encrypts_after_compression_and_digests_the_stored_bytes(tmp_path: Path) -> None:
    raw = workload(9 * MiB)
    digest, size, path = spool_write(tmp_path, raw, (RECIPIENT,))
    stored = path.read_bytes()
    assert size == len(raw)
    assert stored.startswith(encryption.MAGIC)
    assert digest.size == len(stored)
    assert digest.sha256 == hashlib.sha256(stored).hexdigest()
    assert digest == spooling.hashed_file(path, 4 * MiB)[0]  # the part CRC32s are of the age file
    compressed = pyrage.decrypt(stored, [IDENTITY])
    assert compressed.startswith(b"\x28\xb5\x2f\xfd")
    assert zstandard.ZstdDecompressor().stream_reader(compressed).read() == raw


def test_spool_without_recipients_is_not_encrypted(tmp_path: Path) -> None:
    raw = workload(2 * MiB)
    digest, _, path = spool_write(tmp_path, raw, ())
    assert zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read() == raw
    assert digest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_spool_raises_what_podman_or_the_disk_raised_through_the_encryption(tmp_path: Path) -> None:
    def export() -> Iterator[bytes]:
        yield os.urandom(MiB)
        raise OSError(errno.ENOSPC, "No space left on device")

    spool = GrowingFile(tmp_path / "web.tar.zst.age", MiB)
    with pytest.raises(OSError) as raised:
        spooling.write(export(), spool, Compression.ZSTD, 3, (RECIPIENT,))
    assert raised.value.errno == errno.ENOSPC  # the checkpoint fails InsufficientSpace, as without encryption


def test_age_tool_decrypts_what_the_spool_wrote(tmp_path: Path) -> None:
    # The by-hand path of docs/usage.md: the standard age tool reads the stored object.
    raw = workload(3 * MiB)
    _, _, path = spool_write(tmp_path, raw, (RECIPIENT,))
    key = tmp_path / "key.txt"
    key.write_text(str(IDENTITY) + "\n")
    assert shutil.which("age"), "the age tool is missing (hack/install.sh installs it)"
    subprocess.run(["age", "-d", "-i", str(key), "-o", str(tmp_path / "web.tar.zst"), str(path)], check=True)
    assert zstandard.ZstdDecompressor().stream_reader((tmp_path / "web.tar.zst").read_bytes()).read() == raw


def fetch(
    tmp_path: Path,
    data: bytes,
    key: str,
    keys: Keys | None = None,
    stated: int | None = None,
    settings: Settings | None = None,
) -> tuple[str, Path]:
    """Fetch `data` as a restore does, its manifest stating `stated` as the size it inflates to;
    returns the sha256 and where it was stored on the node."""
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="archives")
        client.put_object(Bucket="archives", Key=key, Body=data)
        transfer = Transfer(5 * MiB, 4, RateLimiter(0), RateLimiter(0))
        store = ArchiveStore(client, "archives", "", transfer)
        path = tmp_path / "restore" / restore._local_name(key)
        path.parent.mkdir(exist_ok=True)
        progress = cast(StatusWriter, Progress())
        trust = manifest.Trust(None, signed=False, uncompressed_size=stated)
        return restore._fetch(settings or Settings(), store, keys, key, path, progress, trust), path


def test_encrypted_zstd_archive_is_stored_decrypted_and_decompressed(tmp_path: Path) -> None:
    raw = workload(12 * MiB)
    stored = pyrage.encrypt(zstandard.ZstdCompressor().compress(raw), [IDENTITY.to_public()])
    digest, path = fetch(tmp_path, stored, "ns/cp/web.tar.zst.age", KEYS)
    assert digest == hashlib.sha256(stored).hexdigest()  # of the stored bytes, as status and manifest say
    assert path.name == "web.tar"
    assert path.read_bytes() == raw


def test_encrypted_plain_tar_is_stored_decrypted(tmp_path: Path) -> None:
    raw = os.urandom(7 * MiB)
    stored = pyrage.encrypt(raw, [IDENTITY.to_public()])
    assert fetch(tmp_path, stored, "ns/cp/web.tar.age", KEYS)[1].read_bytes() == raw


@pytest.mark.parametrize(
    "keys",
    [None, Keys((RECIPIENT,)), Keys((RECIPIENT,), str(x25519.Identity.generate()))],
    ids=["no-encryption", "no-identity", "another-identity"],
)
def test_encrypted_archive_without_its_identity_is_corrupt_and_leaves_nothing(tmp_path: Path, keys: Keys) -> None:
    stored = pyrage.encrypt(zstandard.ZstdCompressor().compress(os.urandom(MiB)), [IDENTITY.to_public()])
    with pytest.raises(Failure) as failed:
        fetch(tmp_path, stored, "ns/cp/web.tar.zst.age", keys)
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT
    assert "cannot be decrypted" in failed.value.message or "no identity" in failed.value.message
    assert str(IDENTITY) not in failed.value.message
    assert not list((tmp_path / "restore").iterdir())


def test_tampered_encrypted_archive_is_corrupt(tmp_path: Path) -> None:
    stored = bytearray(pyrage.encrypt(os.urandom(3 * MiB), [IDENTITY.to_public()]))
    stored[2 * MiB] ^= 1
    with pytest.raises(Failure) as failed:
        fetch(tmp_path, bytes(stored), "ns/cp/web.tar.age", KEYS)
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT


def bomb(inflated: int) -> bytes:
    """A small zstd object that inflates to `inflated` bytes: one frame of 64 MiB of zeros, repeated."""
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(64 * MiB))
    return frame * (inflated // (64 * MiB))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_zstd_bomb_past_its_manifest_size_is_corrupt_with_memory_and_disk_bounded(tmp_path: Path) -> None:
    small = bomb(64 * 1024 * MiB)  # 64 GiB from a few MiB
    assert len(small) < 4 * MiB
    before = peak_rss()
    with pytest.raises(Failure) as failed:
        fetch(tmp_path, small, "ns/cp/web.tar.zst", stated=8 * MiB)
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT
    assert "inflates past 8388608 bytes" in failed.value.message
    assert not list((tmp_path / "restore").iterdir())  # the partial file is removed
    assert peak_rss() - before < 64 * MiB


def test_zstd_bomb_past_the_settings_cap_is_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHECKPOINTER_MAX_ARCHIVE_BYTES", str(16 * MiB))
    with pytest.raises(Failure) as failed:
        fetch(tmp_path, bomb(1024 * MiB), "ns/cp/web.tar.zst", settings=Settings())
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT
    assert not list((tmp_path / "restore").iterdir())


def test_encrypted_zstd_bomb_is_corrupt(tmp_path: Path) -> None:
    stored = pyrage.encrypt(bomb(1024 * MiB), [IDENTITY.to_public()])
    with pytest.raises(Failure) as failed:
        fetch(tmp_path, stored, "ns/cp/web.tar.zst.age", KEYS, stated=MiB)
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT
    assert not list((tmp_path / "restore").iterdir())


def test_zstd_frame_asking_for_a_huge_window_is_corrupt(tmp_path: Path) -> None:
    # Without a content size, the frame header's window is what the decoder must allocate.
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=30)
    writer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = writer.compress(os.urandom(MiB)) + writer.flush()
    with pytest.raises(Failure) as failed:
        fetch(tmp_path, frame, "ns/cp/web.tar.zst")
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT


def test_archive_within_its_stated_size_is_stored(tmp_path: Path) -> None:
    raw = workload(6 * MiB)
    _, path = fetch(tmp_path, zstandard.ZstdCompressor().compress(raw), "ns/cp/web.tar.zst", stated=len(raw))
    assert path.read_bytes() == raw


def test_download_limit_is_the_smallest_cap() -> None:
    settings = Settings(spool_min_free_bytes=100, max_archive_bytes=0)
    assert restore.download_limit(settings, 1000, None) == 900  # the spool's free space less its reserve
    assert restore.download_limit(settings, 1000, 500) == 500  # what the manifest states
    assert restore.download_limit(settings, 50, None) == 0
    capped = Settings(spool_min_free_bytes=100, max_archive_bytes=300)
    assert restore.download_limit(capped, 1000, 500) == 300  # CHECKPOINTER_MAX_ARCHIVE_BYTES


def test_encrypted_keys_and_compression() -> None:
    directory = "backups/ns/cp-01234567"
    assert layout.archive_key(directory, "web", Compression.ZSTD, True) == f"{directory}/web.tar.zst.age"
    assert layout.compression_of("a/web.tar.zst.age") == Compression.ZSTD
    assert layout.compression_of("a/web.tar.age") == Compression.NONE
    assert restore._local_name("a/web.tar.zst.age") == "web.tar"


def test_secret_keys_are_checked_and_never_shown() -> None:
    other = str(x25519.Identity.generate().to_public())
    assert encryption.parse_recipients(f"# ops\n{RECIPIENT}\n\n{other}\n") == (RECIPIENT, other)
    with pytest.raises(ValueError, match="line 2"):
        encryption.parse_recipients(f"{RECIPIENT}\nage1notakey\n")
    written = f"# created: 2026-01-01\n# public key: {RECIPIENT}\n{IDENTITY}\n"
    assert encryption.parse_identity(written) == str(IDENTITY)
    with pytest.raises(ValueError) as bad:
        encryption.parse_identity(str(IDENTITY)[:-4] + "QQQQ")
    assert str(IDENTITY)[:-4] not in str(bad.value)
    assert str(IDENTITY) not in repr(KEYS)


def test_spool_record_keeps_recipients_and_uncompressed_size(tmp_path: Path) -> None:
    folder = WorkFolder(tmp_path / "checkpoint_ns_cp_0")
    folder.create()
    digest = spooling.Digest(10, "0" * 64, MiB, (1,))
    record = SpoolRecord("web", "id", Compression.ZSTD, 100, digest, {}, (RECIPIENT,), 100)
    folder.save_spool_record(record)
    assert folder.spool_record("web") == record
    # A record written before encryption existed reads as not encrypted, size unknown.
    legacy = json.loads((folder.path / "web.spool.json").read_text())
    del legacy["recipients"], legacy["uncompressed_size"]
    (folder.path / "web.spool.json").write_text(json.dumps(legacy))
    assert folder.spool_record("web") == SpoolRecord("web", "id", Compression.ZSTD, 100, digest, {})
