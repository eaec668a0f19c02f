"""An archive judged while it streams: the same verdicts as on a file, and bytes cleared only once judged."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from checkpointer.archive.codec import CorruptArchive, configuration_of, configuration_tar, streamed_members
from checkpointer.services.archive_policy import UnpackingJudge


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, b""


def _archive(rootfs: bytes) -> bytes:
    return _tar(
        [
            _file("devshm-checkpoint.tar", _tar([])),
            _file("config.dump", json.dumps({"name": "web"}).encode()),
            _file("spec.dump", json.dumps({"process": {}}).encode()),
            _file("checkpoint/pages-1.img", b"\x01" * 300_000),
            _file("rootfs-diff.tar", rootfs),
            _file("deleted.files", b'["/tmp/x"]'),
        ]
    )


def _judge(data: bytes) -> tuple[str | None, list[int], dict[str, bytes]]:
    judge = UnpackingJudge()
    dumps: dict[str, bytes] = {}
    offsets = []
    # As the growing file reads: whole reads, seeks that skip.
    for member, end in streamed_members(io.BytesIO(data), dumps):
        if member is not None and (why := judge.member(member)) is not None:
            return why, offsets, dumps
        offsets.append(end)
    return judge.finish(), offsets, dumps


def test_a_podman_archive_is_cleared_member_by_member_to_its_end() -> None:
    data = _archive(_tar([_file("etc/motd", b"hello")]))
    why, offsets, dumps = _judge(data)
    assert why is None
    assert offsets == sorted(offsets) and offsets[-1] <= len(data)
    # What is never cleared is the tar's end: the tail the restore holds back until the whole is verified.
    assert len(data) - offsets[-1] >= 2 * tarfile.BLOCKSIZE
    assert configuration_of(dumps).config == {"name": "web"}
    head = configuration_tar(dumps)
    with tarfile.open(fileobj=io.BytesIO(head)) as tar:
        assert tar.getnames() == ["config.dump", "spec.dump"]


def test_a_member_below_a_symlink_of_rootfs_diff_is_refused_before_its_bytes_are_cleared() -> None:
    rootfs = _tar([_symlink("etc", "/etc"), _file("etc/cron.d/evil", b"* * * * * root sh")])
    data = _archive(rootfs)
    why, offsets, _ = _judge(data)
    assert why is not None and "below symlink member 'etc'" in why
    rootfs_at = data.index(b"etc/cron.d/evil")
    assert max(offsets) <= rootfs_at  # the refused member's header never went on


def test_deleted_files_below_a_symlink_are_refused_at_the_end() -> None:
    rootfs = _tar([_symlink("tmp", "/")])
    data = _archive(rootfs)
    why, _, _ = _judge(data)
    assert why is not None and "deleted.files path '/tmp/x'" in why


def test_an_archive_cut_short_or_without_its_configuration_is_corrupt() -> None:
    data = _archive(_tar([]))
    with pytest.raises(CorruptArchive):
        _judge(data[: len(data) // 2])
    with pytest.raises(CorruptArchive):
        _judge(_tar([_file("checkpoint/core-1.img", b"x")]))
