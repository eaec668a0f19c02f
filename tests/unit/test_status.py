"""The status writer against an API server stand-in that enforces resourceVersion as the real one does."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import ApiException

from checkpointer.models import CheckpointStatus, Metadata, Progress, ScheduleStatus, StorageStatus
from checkpointer.reasons import Phase, Reason
from checkpointer.status import Conflict, StatusWriter, _Event, _Poster


class FakeKube:
    """One object; a write with a stale resourceVersion gets 409, as from kube-apiserver."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.obj: dict[str, Any] | None = {
            "metadata": {"name": "o", "namespace": "ns", "uid": "u1", "resourceVersion": "1", "generation": 1},
            "status": status,
        }
        self.writes = 0
        self.refusals = 0  # writes the admission policy refuses (403) before one goes through

    def bump(self, **status: Any) -> None:
        """Another writer (or a metadata change) moves the object on."""
        assert self.obj is not None
        self.obj["status"].update(status)
        self.obj["metadata"]["resourceVersion"] = str(int(self.obj["metadata"]["resourceVersion"]) + 1)

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.obj

    def patch_status(
        self, plural: str, namespace: str, name: str, status: dict[str, Any], resource_version: str = ""
    ) -> dict[str, Any]:
        if self.obj is None:
            raise ApiException(status=404)
        if resource_version and resource_version != self.obj["metadata"]["resourceVersion"]:
            raise ApiException(status=409)
        if self.refusals:
            self.refusals -= 1
            if not self.refusals:  # the controller puts the label back
                self.obj["metadata"]["labels"] = {"checkpointer.dev/node": "node-a"}
                self.bump()
            raise ApiException(status=403)
        self.writes += 1
        self.bump(**status)
        return self.obj


def writer(kube: FakeKube) -> StatusWriter:
    assert kube.obj is not None
    return StatusWriter(kube, "containercheckpoints", kube.obj)  # type: ignore[arg-type]


def test_a_write_after_a_metadata_change_is_retried_on_the_fresh_version() -> None:
    kube = FakeKube({"phase": "Uploading"})
    status = writer(kube)
    kube.bump()  # kopf's annotations, a label: the phase is still ours
    status.progress(5, 10, force=True)
    assert kube.obj is not None and kube.obj["status"]["progress"] == {"bytesDone": 5, "bytesTotal": 10}


def test_a_write_after_someone_else_moved_the_phase_is_refused() -> None:
    kube = FakeKube({"phase": "Scheduled"})
    status = writer(kube)
    kube.bump(phase="Failed")  # the controller's pickup deadline won the race
    with pytest.raises(Conflict):
        status.phase(Phase.CHECKPOINTING, Reason.CHECKPOINTING, "checkpointing web")
    assert kube.obj is not None and kube.obj["status"]["phase"] == "Failed"


def test_a_deleted_object_is_a_conflict_and_deletion_is_seen_in_answers() -> None:
    kube = FakeKube({"phase": "Uploading"})
    status = writer(kube)
    assert kube.obj is not None
    kube.obj["metadata"]["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    status.write(CheckpointStatus(progress=Progress(bytes_done=1)))
    assert status.deleting
    kube.obj = None
    with pytest.raises(Conflict):
        status.write(CheckpointStatus(progress=Progress(bytes_done=2)))


def test_phase_keeps_conditions_in_the_metav1_shape() -> None:
    kube = FakeKube({})
    writer(kube).phase(
        Phase.SCHEDULED, Reason.SCHEDULED, "handed over", scheduled=True, patch=CheckpointStatus(node_name="n")
    )
    assert kube.obj is not None
    conditions = {c["type"]: c for c in kube.obj["status"]["conditions"]}
    assert conditions["Scheduled"]["status"] == "True" and conditions["Ready"]["status"] == "False"
    assert kube.obj["status"]["nodeName"] == "n"


def test_a_write_after_the_object_was_made_anew_under_its_name_is_refused() -> None:
    """A writer that waited (a schedule's checkpoint, a retry) must not write into a new object of the same name."""
    kube = FakeKube({"phase": "Scheduled"})
    status = writer(kube)
    assert kube.obj is not None
    # Deleted and created again by its owner, in the same phase the writer believes in.
    kube.obj = {**kube.obj, "metadata": {**kube.obj["metadata"], "uid": "u2", "resourceVersion": "7"}}
    with pytest.raises(Conflict, match="made anew"):
        status.phase(Phase.CHECKPOINTING, Reason.CHECKPOINTING, "checkpointing web")
    assert kube.obj["status"]["phase"] == "Scheduled" and kube.writes == 0


def test_a_write_refused_while_the_label_was_changed_waits_for_the_controller_to_put_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("checkpointer.status.time.sleep", lambda _: None)
    kube = FakeKube({"phase": "Checkpointing"})
    assert kube.obj is not None
    kube.obj["metadata"]["labels"] = {"checkpointer.dev/node": "node-a"}
    status = writer(kube)
    # Its owner relabels it for node-b: the agent of node-a may not write it until the label is back.
    kube.obj["metadata"]["labels"] = {"checkpointer.dev/node": "node-b"}
    kube.bump()
    kube.refusals = 2
    status.phase(Phase.UPLOADING, Reason.UPLOADING, "uploading web")
    assert kube.obj["status"]["phase"] == "Uploading" and kube.writes == 1


def test_a_write_refused_for_another_reason_is_not_retried() -> None:
    kube = FakeKube({"phase": "Checkpointing"})
    assert kube.obj is not None
    kube.obj["metadata"]["labels"] = {"checkpointer.dev/node": "node-a"}
    status = writer(kube)
    kube.refusals = 5
    with pytest.raises(ApiException):
        status.phase(Phase.UPLOADING, Reason.UPLOADING, "uploading web")
    assert kube.refusals == 4


def test_a_patch_writes_the_fields_it_sets_and_removes_those_set_to_none() -> None:
    patch = ScheduleStatus(last_cordon_time=None, active_count=0, active=[])
    assert patch.patch() == {"lastCordonTime": None, "activeCount": 0, "active": []}
    written = ScheduleStatus.model_validate({"activeCount": 0, "lastScheduleTime": "2026-01-01T00:00:00Z"})
    now = ScheduleStatus(active_count=0, active=[], last_schedule_time="2026-01-01T00:00:00Z", last_cordon_time=None)
    # What `written` lacks counts as None: `active` is written, the unset lastCordonTime is not.
    assert now.changed_since(written).patch() == {"active": []}


def test_a_storage_or_schedule_status_has_no_phase_to_guard_and_is_written_on_the_fresh_version() -> None:
    kube = FakeKube({"phase": "Available"})
    assert kube.obj is not None
    del kube.obj["metadata"]["namespace"]  # a CheckpointStorage is cluster-scoped
    status = StatusWriter(kube, "checkpointstorages", kube.obj)  # type: ignore[arg-type]
    kube.bump(phase="Unavailable")  # the timer's own write, a moment before
    status.write(StorageStatus(phase="Available", message="bucket 'b' is reachable"))
    assert kube.obj["status"]["phase"] == "Available" and kube.writes == 1
    with pytest.raises(TypeError):
        status.write(CheckpointStatus(phase="Failed"))


def test_events_go_out_in_order_from_the_posters_thread_a_storages_to_the_operators_namespace() -> None:
    class Events:
        def __init__(self) -> None:
            self.posted: list[tuple[str, str, str, str]] = []

        def create_event(
            self, kind: str, meta: Metadata, namespace: str, type_: str, reason: str, message: str
        ) -> None:
            if reason == "Broken":
                raise ApiException(status=500)  # logged; the next one goes out all the same
            self.posted.append((kind, namespace, type_, reason))

    kube = Events()
    poster = _Poster(kube, "checkpointer-system")  # type: ignore[arg-type]
    poster.thread.start()
    poster.post(_Event("ContainerCheckpoint", Metadata(name="c", namespace="team-a"), "Normal", "Broken", "m"))
    poster.post(_Event("ContainerCheckpoint", Metadata(name="c", namespace="team-a"), "Normal", "Scheduled", "m"))
    poster.post(_Event("CheckpointStorage", Metadata(name="s"), "Warning", "Unavailable", "m"))
    poster.stop()
    poster.thread.join(5)
    assert kube.posted == [
        ("ContainerCheckpoint", "team-a", "Normal", "Scheduled"),
        ("CheckpointStorage", "checkpointer-system", "Warning", "Unavailable"),
    ]
