"""What podman unpacks on the node may not reach outside the container (services/archive_policy.py):
hand-made archives whose rootfs-diff.tar (or the archive itself) holds absolute paths, `..`,
device files, escaping hard links or members below a symlink member are refused, naming the member;
what podman itself writes passes; reading the members is streamed and bounded."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpointer.archive.codec import CorruptArchive, Member, unpacked_members
from checkpointer.errors import Failure
from checkpointer.reasons import Reason
from checkpointer.services import archive_policy
from checkpointer.services.archive_policy import SYMLINKS_LIMIT, require_safe_unpacking, unpacking_refusal

MiB = 1024 * 1024


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def tar_of(*entries: tarfile.TarInfo, data: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            content = (data or {}).get(info.name, b"")
            info.size = len(content) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(content) if info.isreg() else None)
    return out.getvalue()


def archive(path: Path, rootfs: bytes | None, *extra: tarfile.TarInfo, data: dict[str, bytes] | None = None) -> Path:
    """A checkpoint archive as podman lays it out, with `rootfs` as its rootfs-diff.tar."""
    files = {
        "config.dump": json.dumps({"name": "web"}).encode(),
        "spec.dump": json.dumps({"ociVersion": "1.2.0"}).encode(),
        "checkpoint/pages-1.img": b"\0" * 4096,
        **(data or {}),
        **({"rootfs-diff.tar": rootfs} if rootfs is not None else {}),
    }
    entries = [entry("checkpoint", tarfile.DIRTYPE)] + [entry(name) for name in files] + list(extra)
    path.write_bytes(tar_of(*entries, data=files))
    return path


def refusal(path: Path) -> str | None:
    return unpacking_refusal(unpacked_members(path))


def test_what_podman_writes_passes(tmp_path: Path) -> None:
    rootfs = tar_of(
        entry("etc", tarfile.DIRTYPE),
        entry("etc/motd"),
        entry("etc/alternatives", tarfile.DIRTYPE),
        # A symlink may point anywhere: it is the container's, resolved inside it.
        entry("etc/alternatives/awk", tarfile.SYMTYPE, link="/usr/bin/mawk"),
        entry("usr/lib/libx.so", tarfile.SYMTYPE, link="../../lib/libx.so.1"),
        entry("var/run/app.fifo", tarfile.FIFOTYPE),
        entry("etc/motd.hard", tarfile.LNKTYPE, link="etc/motd"),
        entry("usr/bin/awk", tarfile.LNKTYPE, link="etc/alternatives/awk"),  # links the symlink itself
        data={"etc/motd": b"hello\n"},
    )
    assert refusal(archive(tmp_path / "a.tar", rootfs)) is None
    assert refusal(archive(tmp_path / "b.tar", None)) is None
    require_safe_unpacking(tmp_path / "a.tar")


@pytest.mark.parametrize(
    ("entries", "named"),
    [
        pytest.param([entry("/etc/cron.d/x")], "'/etc/cron.d/x', an absolute path", id="absolute"),
        pytest.param([entry("../../../etc/passwd")], "'../../../etc/passwd', a path with '..'", id="dotdot"),
        pytest.param([entry("a/../../b")], "'a/../../b', a path with '..'", id="dotdot-inside"),
        pytest.param([entry("dev/sda", tarfile.BLKTYPE)], "'dev/sda', a block device", id="block-device"),
        pytest.param([entry("dev/mem", tarfile.CHRTYPE)], "'dev/mem', a char device", id="char-device"),
        pytest.param(
            [entry("shadow", tarfile.LNKTYPE, link="/etc/shadow")],
            "'shadow', a hard link to '/etc/shadow' outside the tree",
            id="hardlink-absolute",
        ),
        pytest.param(
            [entry("shadow", tarfile.LNKTYPE, link="../../etc/shadow")],
            "'shadow', a hard link to '../../etc/shadow' outside the tree",
            id="hardlink-out",
        ),
        pytest.param(
            [entry("d", tarfile.SYMTYPE, link="/tmp"), entry("d/marker")],
            "'d/marker', below symlink member 'd'",
            id="below-symlink",
        ),
        pytest.param(
            [entry("./a/b", tarfile.SYMTYPE, link="/etc"), entry("a//b/c/d", tarfile.DIRTYPE)],
            "'a//b/c/d', below symlink member 'a/b'",
            id="below-symlink-spelt-otherwise",
        ),
        pytest.param(
            [entry("d", tarfile.SYMTYPE, link="/"), entry("d/etc/passwd", tarfile.SYMTYPE, link="x")],
            "'d/etc/passwd', below symlink member 'd'",
            id="symlink-below-symlink",
        ),
        pytest.param(
            [entry("d", tarfile.SYMTYPE, link="/etc"), entry("x", tarfile.LNKTYPE, link="d/shadow")],
            "'x', a hard link to 'd/shadow' below symlink member 'd'",
            id="hardlink-through-symlink",
        ),
    ],
)
def test_a_member_that_reaches_the_node_is_refused(tmp_path: Path, entries: list[tarfile.TarInfo], named: str) -> None:
    path = archive(tmp_path / "crafted.tar", tar_of(entry("etc", tarfile.DIRTYPE), *entries))
    assert refusal(path) == f"rootfs-diff.tar member {named}"
    with pytest.raises(Failure) as refused:
        require_safe_unpacking(path)
    assert refused.value.reason == Reason.ARCHIVE_NOT_PERMITTED
    assert named in refused.value.message and "nothing was restored" in refused.value.message


def test_the_archive_itself_is_judged_too(tmp_path: Path) -> None:
    escape = entry("checkpoint/x", tarfile.SYMTYPE, link="/etc")
    path = archive(tmp_path / "a.tar", None, escape, entry("checkpoint/x/y"))
    assert refusal(path) == "member 'checkpoint/x/y', below symlink member 'checkpoint/x'"
    # A tar podman unpacks must be one: a symlink would make podman unpack a file of the node.
    path = archive(tmp_path / "b.tar", None, entry("rootfs-diff.tar", tarfile.SYMTYPE, link="/var/backups/x.tar"))
    assert refusal(path) == "member 'rootfs-diff.tar', a tar podman unpacks that is a symlink, not a file"


def test_every_tar_inside_is_judged_in_its_own_tree(tmp_path: Path) -> None:
    shm = tar_of(entry("d", tarfile.SYMTYPE, link="/run"), entry("d/x"))
    path = archive(tmp_path / "a.tar", tar_of(), data={"devshm-checkpoint.tar": shm})
    assert refusal(path) == "devshm-checkpoint.tar member 'd/x', below symlink member 'd'"
    # A symlink of one tar does not stand above the members of another.
    path = archive(
        tmp_path / "b.tar",
        tar_of(entry("d", tarfile.DIRTYPE), entry("d/x")),
        data={"devshm-checkpoint.tar": tar_of(entry("d", tarfile.SYMTYPE, link="y"))},
    )
    assert refusal(path) is None


def test_deleted_files_may_not_remove_outside_the_container(tmp_path: Path) -> None:
    """Podman removes deleted.files' paths under the container's root after unpacking rootfs-diff.tar."""
    rootfs = tar_of(entry("w", tarfile.DIRTYPE), entry("w/d", tarfile.SYMTYPE, link="/etc"))
    listed = {"deleted.files": json.dumps(["/usr/share/doc", "/w/d"]).encode()}
    assert refusal(archive(tmp_path / "a.tar", rootfs, data=listed)) is None
    # Listed before rootfs-diff.tar in the archive, judged against its symlinks all the same.
    below = {"deleted.files": json.dumps(["/root/.cache", "/w/d/shadow"]).encode()}
    assert refusal(archive(tmp_path / "b.tar", rootfs, data=below)) == (
        "deleted.files path '/w/d/shadow', below rootfs-diff.tar symlink member 'w/d'"
    )
    up = {"deleted.files": json.dumps(["/../../etc/shadow"]).encode()}
    assert refusal(archive(tmp_path / "c.tar", rootfs, data=up)) == (
        "deleted.files path '/../../etc/shadow', a path with '..'"
    )
    assert refusal(archive(tmp_path / "d.tar", rootfs, data={"deleted.files": b"null"})) is None
    with pytest.raises(CorruptArchive, match="not a JSON list of paths"):
        refusal(archive(tmp_path / "e.tar", rootfs, data={"deleted.files": b'{"a": 1}'}))


def test_a_compressed_or_unreadable_tar_inside_is_corrupt(tmp_path: Path) -> None:
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as tar:
        tar.addfile(entry("x"), io.BytesIO(b""))
    with pytest.raises(CorruptArchive, match=r"rootfs-diff\.tar is not an uncompressed tar"):
        refusal(archive(tmp_path / "gz.tar", gz.getvalue()))
    with pytest.raises(Failure) as refused:
        require_safe_unpacking(archive(tmp_path / "junk.tar", b"not a tar" * 100))
    assert refused.value.reason == Reason.ARCHIVE_CORRUPT


def test_members_are_streamed_not_collected(tmp_path: Path) -> None:
    # 20,000 members in rootfs-diff.tar: the reader holds one at a time.
    count = 20_000
    rootfs = tar_of(*(entry(f"f{i}") for i in range(count)))
    path = archive(tmp_path / "many.tar", rootfs)
    tracemalloc.start()
    try:
        seen = sum(1 for m in unpacked_members(path) if m.tar)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == count
    assert peak < 1 * MiB, f"{peak} bytes"


def test_symlinks_held_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_policy, "SYMLINKS_LIMIT", 10)

    def symlinks() -> Iterator[Member]:
        for i in range(11):
            yield Member("rootfs-diff.tar", f"l{i}", "symlink", "/x")

    with pytest.raises(CorruptArchive, match="more than 10 symlinks"):
        unpacking_refusal(symlinks())
    assert SYMLINKS_LIMIT >= 10_000  # real containers' rootfs changes hold thousands (dpkg's alternatives)
