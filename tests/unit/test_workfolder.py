"""The node's work folder: records survive a crash whole or not at all, and backoff is bounded."""

from __future__ import annotations

from pathlib import Path

from checkpointer.archive.spool import Digest
from checkpointer.archive.store import composite_checksum
from checkpointer.archive.workfolder import PodmanRestore, SpoolRecord, Target, UploadState, WorkFolder
from checkpointer.models import Compression, Metadata
from checkpointer.services.checkpoint import retry_delay

META = Metadata(name="ccp", namespace="team-a", uid="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


def test_records_round_trip(tmp_path: Path) -> None:
    folder = WorkFolder.of(tmp_path, "checkpoint", META)
    folder.save_targets([Target("web", "a" * 64)])
    record = SpoolRecord("web", "a" * 64, Compression.ZSTD, 10, Digest(4, "ab", 16, (1, 2)), {"x": 1})
    folder.save_spool_record(record)
    folder.save_upload_state("web", UploadState(key="k", storage="s", upload_id="u"))
    folder.mark("web")
    folder.save_podman_restore(PodmanRestore("web", "a" * 64, ("b" * 64,)))
    assert folder.podman_restore() == PodmanRestore("web", "a" * 64, ("b" * 64,))
    assert folder.targets() == [Target("web", "a" * 64)]
    assert folder.spool_record("web") == record
    assert folder.upload_states() == {"web": UploadState(key="k", storage="s", upload_id="u")}
    assert folder.marked("web") and not folder.marked("db")
    assert WorkFolder.uid_of(folder.path) == META.uid
    assert not list(folder.path.glob("*.tmp")), "every write replaced its record atomically"


def test_a_record_a_crash_left_empty_or_cut_loads_as_absent(tmp_path: Path) -> None:
    folder = WorkFolder.of(tmp_path, "checkpoint", META)
    folder.create()
    folder.file("targets.json").write_text("")
    folder.file("web.spool.json").write_text('{"container": "we')
    folder.file("web.upload.json").write_text("{}")
    assert folder.targets() is None
    assert folder.spool_record("web") is None
    assert folder.upload_state("web") is None
    folder.file("podman-restore.json").write_text('{"name": "web"}')
    assert folder.podman_restore() is None


def test_only_work_folders_name_an_object() -> None:
    assert WorkFolder.uid_of(Path("restore_ns_name_" + META.uid)) == META.uid
    assert WorkFolder.uid_of(Path("lost+found")) is None


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [retry_delay(n, 5, 60) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_composite_checksum_is_s3s() -> None:
    # The form S3 reports for a two-part object: CRC32 over the parts' big-endian CRC32s, "-2".
    assert composite_checksum([0, 0]).endswith("-2")
    assert composite_checksum([1]) != composite_checksum([2])
