"""TTL expirations, the spool's bound and the sweep's decisions (docs/failure-semantics.md)."""

from __future__ import annotations

import datetime
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from checkpointer.adapters.podman import Container, Footprint, cgroup_memory_files
from checkpointer.archive.ledger import KeptCheckpoint, Ledger, OpenUpload
from checkpointer.archive.spool import SpoolUsage, spool_usage
from checkpointer.controller.expiry import Expiring, ExpiryClock
from checkpointer.services.space import Estimate, refusal
from checkpointer.services.sweep import ObjectState, Verdict, kept_checkpoint_verdict, orphan_uploads, upload_unowned
from checkpointer.ttl import desired_expiration, expiration, seconds_until

MiB = 1024 * 1024
NOW = datetime.datetime(2026, 1, 2, 12, 0, 0, tzinfo=datetime.UTC)


# --- TTL --------------------------------------------------------------------------------------------


def test_expiration_is_completion_plus_ttl_rounded_up_to_the_second() -> None:
    assert expiration("2026-01-02T12:00:00.250000Z", "90s") == "2026-01-02T12:01:31Z"
    assert expiration("2026-01-02T12:00:00Z", "1h30m") == "2026-01-02T13:30:00Z"
    assert expiration("2026-01-02T12:00:00Z", "168h") == "2026-01-09T12:00:00Z"


@pytest.mark.parametrize(("completion", "ttl"), [("", "1h"), ("2026-01-02T12:00:00Z", ""), ("soon", "1h")])
def test_no_expiration_without_a_completion_time_or_a_ttl(completion: str, ttl: str) -> None:
    assert expiration(completion, ttl) is None


def test_only_finished_objects_expire_and_spec_ttl_wins_over_the_default() -> None:
    done = {"spec": {"ttl": "10s"}, "status": {"phase": "Failed", "completionTime": "2026-01-02T12:00:00Z"}}
    assert desired_expiration(done, "1h") == "2026-01-02T12:00:10Z"
    defaulted = {"spec": {}, "status": {"phase": "Succeeded", "completionTime": "2026-01-02T12:00:00Z"}}
    assert desired_expiration(defaulted, "1h") == "2026-01-02T13:00:00Z"
    assert desired_expiration(defaulted, "") is None
    running = {"spec": {"ttl": "10s"}, "status": {"phase": "Uploading"}}
    assert desired_expiration(running, "1h") is None


def test_seconds_until_an_expiration() -> None:
    assert seconds_until("2026-01-02T12:00:30Z", NOW) == 30
    assert seconds_until("2026-01-02T11:59:00Z", NOW) == -60


# --- the spool's bound -----------------------------------------------------------------------------


def test_the_estimate_sums_every_containers_memory_and_rootfs_changes() -> None:
    estimate = Estimate.of([Footprint(100 * MiB, 5 * MiB), Footprint(50 * MiB, 0)])
    assert (estimate.memory, estimate.rootfs_diff, estimate.total) == (150 * MiB, 5 * MiB, 155 * MiB)


def test_room_beyond_the_reserve_and_under_the_cap_is_enough() -> None:
    usage = SpoolUsage(used_bytes=100 * MiB, free_bytes=1000 * MiB, cap_bytes=500 * MiB)
    assert refusal(Estimate(300 * MiB, 0), usage, 256 * MiB, Path("/spool")) is None


def test_free_space_less_the_reserve_short_of_the_estimate_refuses_with_the_numbers() -> None:
    usage = SpoolUsage(used_bytes=0, free_bytes=400 * MiB, cap_bytes=0)
    why = refusal(Estimate(120 * MiB, 30 * MiB), usage, 256 * MiB, Path("/spool"))
    assert why is not None
    assert "150 MiB" in why and "400 MiB free" in why and "144 MiB of it beyond the 256 MiB reserve" in why
    assert "keeps running" in why


def test_a_cap_refuses_what_would_pass_it_even_with_room_on_disk() -> None:
    usage = SpoolUsage(used_bytes=60 * MiB, free_bytes=10_000 * MiB, cap_bytes=100 * MiB)
    why = refusal(Estimate(50 * MiB, 0), usage, 256 * MiB, Path("/spool"))
    assert why is not None and "holds 60 MiB of its 100 MiB cap" in why
    assert refusal(Estimate(40 * MiB, 0), usage, 256 * MiB, Path("/spool")) is None


def test_less_free_than_the_reserve_refuses_even_an_empty_archive() -> None:
    usage = SpoolUsage(used_bytes=0, free_bytes=32 * MiB, cap_bytes=0)
    assert refusal(Estimate(0, 0), usage, 256 * MiB, Path("/spool")) is not None


def test_cgroup_memory_files_of_both_cgroup_versions_longest_path_first() -> None:
    files = cgroup_memory_files("4:memory:/outer/libpod-1\n0::/outer/libpod-1\n3:cpu,cpuacct:/outer\n")
    assert files == [
        "/sys/fs/cgroup/memory/outer/libpod-1/memory.usage_in_bytes",
        "/sys/fs/cgroup/memory/libpod-1/memory.usage_in_bytes",
        "/sys/fs/cgroup/outer/libpod-1/memory.current",
        "/sys/fs/cgroup/libpod-1/memory.current",
    ]


def test_spool_usage_counts_the_files_under_the_spool(tmp_path: Path) -> None:
    (tmp_path / "checkpoint_default_a_x").mkdir()
    (tmp_path / "checkpoint_default_a_x" / "c.tar").write_bytes(b"x" * 3 * MiB)
    usage = spool_usage(tmp_path, 7)
    assert 3 * MiB <= usage.used_bytes < 4 * MiB
    assert usage.free_bytes > 0 and usage.cap_bytes == 7


# --- sweeping ---------------------------------------------------------------------------------------

RUNNING = Container(id="c" * 64, name="app", state="running", static_dir="/userdata")
STOPPED = Container(id="c" * 64, name="app", state="exited", static_dir="/userdata")
DONE_LONG_AGO = ObjectState("Succeeded", NOW - datetime.timedelta(hours=25))
DONE_JUST_NOW = ObjectState("Failed", NOW - datetime.timedelta(minutes=5))


@pytest.mark.parametrize(
    ("state", "container", "verdict"),
    [
        (None, RUNNING, Verdict.REMOVE),  # the object is gone
        (DONE_LONG_AGO, RUNNING, Verdict.REMOVE),  # finished past the retention
        (DONE_JUST_NOW, RUNNING, Verdict.KEEP),  # CRIU's logs may still be read
        (ObjectState("Checkpointing"), RUNNING, Verdict.KEEP),  # in flight
        (None, STOPPED, Verdict.KEEP),  # the way back for a stopped container
        (DONE_LONG_AGO, None, Verdict.FORGET),  # the container and its folder are gone
    ],
)
def test_a_kept_local_checkpoint_goes_once_nobody_needs_it(
    state: ObjectState | None, container: Container | None, verdict: Verdict
) -> None:
    entry = KeptCheckpoint(uid="u", kind="checkpoint", container_id="c" * 64)
    assert kept_checkpoint_verdict(entry, state, container, NOW, 86400) == verdict


def test_the_local_checkpoint_of_a_checkpoint_without_export_stays_while_its_object_lives() -> None:
    entry = KeptCheckpoint(uid="u", kind="checkpoint", container_id="c" * 64, exported=False)
    assert kept_checkpoint_verdict(entry, DONE_LONG_AGO, RUNNING, NOW, 86400) == Verdict.KEEP
    assert kept_checkpoint_verdict(entry, None, RUNNING, NOW, 86400) == Verdict.REMOVE


def test_an_upload_is_unowned_once_its_object_is_gone_or_finished() -> None:
    upload = OpenUpload(uid="u1", storage="s", key="k", upload_id="i")
    assert upload_unowned(upload, {})
    assert upload_unowned(upload, {"u1": ObjectState("Failed")})
    assert not upload_unowned(upload, {"u1": ObjectState("Uploading")})


def test_only_archive_uploads_under_no_live_checkpoints_folder_are_orphans() -> None:
    uploads = [
        ("pre/default/gone-1234abcd/app.tar.zst", "1"),  # its checkpoint is gone
        ("pre/default/live-5678abcd/app.tar.zst", "2"),  # a live checkpoint (any node) writes there
        ("pre/default/shared/key/app.tar", "3"),  # under a live checkpoint's export.key
        ("pre/default/gone-1234abcd/notes.txt", "4"),  # no archive of ours
        ("other/default/gone-1234abcd/app.tar", "5"),  # outside the storage's prefix
        ("pre/app.tar", "6"),  # not in a checkpoint's folder
        ("pre/team/gone-9999abcd/app.tar.zst.age", "7"),  # encrypted, gone
    ]
    live = {"pre/default/live-5678abcd", "pre/default/shared"}
    assert orphan_uploads("pre", uploads, live) == [uploads[0], uploads[6]]


def test_the_ledger_survives_a_new_agent_and_forgets_what_was_dropped(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    upload = OpenUpload(uid="u1", storage="s", key="k", upload_id="i")
    kept = KeptCheckpoint(uid="u2", kind="checkpoint", container_id="c")
    ledger.add_upload(upload)
    ledger.add_upload(upload)
    ledger.add_kept(kept)
    again = Ledger(tmp_path)
    assert again.uploads() == [upload] and again.kept() == [kept]
    again.drop(uploads=[upload])
    assert Ledger(tmp_path).uploads() == [] and Ledger(tmp_path).kept() == [kept]


# --- the expiry clock --------------------------------------------------------------------------------


class _Kube:
    """The API server as the clock uses it: one finished checkpoint, status patches, deletes."""

    def __init__(self, obj: dict[str, Any]) -> None:
        self.obj: dict[str, Any] | None = obj
        self.deleted: list[str] = []

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.obj

    def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any], resource_version: str = ""
    ) -> dict[str, Any]:
        assert self.obj is not None
        self.obj = {**self.obj, "status": {**self.obj["status"], **status}}
        return self.obj

    def delete(self, plural: str, namespace: str, name: str, uid: str) -> bool:
        self.deleted.append(uid)
        self.obj = None
        return True


def _finished_checkpoint(completion: datetime.datetime, ttl: str | None) -> dict[str, Any]:
    return {
        "kind": "ContainerCheckpoint",
        "metadata": {"name": "c", "namespace": "default", "uid": "u1", "resourceVersion": "1"},
        "spec": {"ttl": ttl} if ttl else {},
        "status": {"phase": "Succeeded", "completionTime": completion.strftime("%Y-%m-%dT%H:%M:%SZ")},
    }


def test_the_clock_writes_a_default_expiration_and_deletes_once_it_passed() -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    kube = _Kube(_finished_checkpoint(past, None))
    announced: list[str] = []
    clock = ExpiryClock(kube, "1m", lambda obj, message: announced.append(message))  # type: ignore[arg-type]
    clock.observe("containercheckpoints", dict(kube.obj or {}))
    assert (kube.obj or {})["status"]["expiration"] == expiration(kube.obj["status"]["completionTime"], "1m")  # type: ignore[index]
    stop = threading.Event()
    runner = threading.Thread(target=clock.run, args=(stop,))
    runner.start()
    deadline = time.monotonic() + 5
    while not kube.deleted and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    clock.wake()
    runner.join(5)
    assert kube.deleted == ["u1"]
    assert announced and "ttl 1m" in announced[0] and "deleted" in announced[0]


def test_the_clock_leaves_objects_without_a_ttl_and_those_not_yet_due() -> None:
    now = datetime.datetime.now(datetime.UTC)
    kube = _Kube(_finished_checkpoint(now, "1h"))
    clock = ExpiryClock(kube, "", lambda obj, message: None)  # type: ignore[arg-type]
    clock.observe("containercheckpoints", dict(kube.obj or {}))
    assert len(clock) == 1
    clock.expire(Expiring("containercheckpoints", "default", "c", "u1"))
    assert kube.deleted == [] and len(clock) == 1
    untimed = _Kube(_finished_checkpoint(now, None))
    clock = ExpiryClock(untimed, "", lambda obj, message: None)  # type: ignore[arg-type]
    clock.observe("containercheckpoints", dict(untimed.obj or {}))
    assert len(clock) == 0 and "expiration" not in (untimed.obj or {})["status"]


def test_a_bad_default_ttl_stops_the_controller_at_start() -> None:
    with pytest.raises(ValueError):
        ExpiryClock(_Kube({}), "7d", lambda obj, message: None)  # type: ignore[arg-type]
