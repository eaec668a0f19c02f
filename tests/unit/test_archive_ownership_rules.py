"""An archive's keys belong to one checkpoint for its whole life: its own folder, its own uploads, a
storage's prefix that no other storage's nests with, and what the agent keeps until the signing."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from checkpointer import layout
from checkpointer.archive.ledger import Ledger, OpenUpload
from checkpointer.archive.store import ArchiveStore
from checkpointer.archive.workfolder import Target, UploadState, WorkFolder
from checkpointer.models import CheckpointStorage, ContainerCheckpoint, Metadata
from checkpointer.services.checkpoint import Checkpoint
from checkpointer.services.node import Node
from checkpointer.services.sweep import ObjectState, Verdict, folder_verdict, live_folders, orphan_uploads
from checkpointer.services.validation import nested_with, nesting_message, prefixes_nest
from checkpointer.status import StatusWriter

ENDPOINT = "http://s3.example:9000"


def storage(name: str, prefix: str, created: str, bucket: str = "b", endpoint: str = ENDPOINT) -> CheckpointStorage:
    return CheckpointStorage.model_validate(
        {
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"bucket": bucket, "prefix": prefix, "endpoint": endpoint},
        }
    )


def checkpoint(name: str, uid: str, key: str | None = None, phase: str = "Uploading") -> ContainerCheckpoint:
    return ContainerCheckpoint.model_validate(
        {
            "metadata": {"name": name, "namespace": "team-b", "uid": uid},
            "spec": {"nodeName": "n", "containers": ["web"], "export": {"key": key} if key else {}},
            "status": {"phase": phase},
        }
    )


# --- storages may not nest -----------------------------------------------------------------------


def test_prefixes_nest_when_one_lies_strictly_inside_the_other() -> None:
    assert prefixes_nest("", "team-a")
    assert prefixes_nest("team-a", "")
    assert prefixes_nest("a", "a/b") and prefixes_nest("a/b/", "a")
    # Equal prefixes share each namespace's folder, so no namespace reaches another's through them.
    assert not prefixes_nest("", "") and not prefixes_nest("a", "a/")
    assert not prefixes_nest("a", "ab") and not prefixes_nest("team-a", "team-b")


def test_the_later_of_two_nesting_storages_is_refused_naming_the_other() -> None:
    outer = storage("outer", "", "2026-01-01T00:00:00Z")
    inner = storage("inner", "team-a", "2026-01-02T00:00:00Z")
    every = [outer, inner]
    assert nested_with(outer, every) is None, "the storage in use keeps working"
    assert nested_with(inner, every) == outer
    message = nesting_message(inner, outer)
    assert "outer" in message and "'team-a'" in message and "the whole bucket" in message
    # The same prefixes on another bucket or endpoint are other keys.
    assert nested_with(storage("elsewhere", "team-a", "2026-01-03T00:00:00Z", bucket="c"), every) is None
    assert nested_with(storage("far", "team-a", "2026-01-03T00:00:00Z", endpoint="http://other"), every) is None
    # The endpoint as written does not make another bucket of the same one.
    same = storage("same", "x", "2026-01-03T00:00:00Z", endpoint=ENDPOINT.upper() + "/")
    assert nested_with(same, every) == outer
    # An equal prefix is fine; created in the same second, the name decides.
    assert nested_with(storage("twin", "", "2026-01-03T00:00:00Z"), [outer]) is None
    a, b = storage("a", "x", "2026-01-01T00:00:00Z"), storage("b", "x/y", "2026-01-01T00:00:00Z")
    assert (nested_with(a, [a, b]), nested_with(b, [a, b])) == (None, a)


# --- the bucket sweep judges against every storage ------------------------------------------------


def test_an_upload_of_a_live_checkpoint_of_a_nested_storage_is_no_orphan() -> None:
    outer = storage("outer", "", "2026-01-01T00:00:00Z")
    inner = storage("inner", "team-a", "2026-01-02T00:00:00Z")
    live = checkpoint("x", "0123456789abcdef")  # writes through the inner storage
    done = checkpoint("y", "fedcba9876543210", phase="Succeeded")
    folders = live_folders([live, done], [outer, inner])
    assert set(folders) == {(ENDPOINT, "b")}
    # As the outer storage lists it: the inner storage's folder of the live checkpoint.
    uploads = [
        ("team-a/team-b/x-01234567/web.tar.zst", "1"),  # the live one's, through the inner storage
        ("team-b/y-fedcba98/web.tar.zst", "2"),  # a finished checkpoint never uploads again
    ]
    assert orphan_uploads("", uploads, folders[(ENDPOINT, "b")]) == [uploads[1]]
    # Judged against its own storage's folders only, the live upload was taken for an orphan.
    own = {layout.archive_dir("", live)}
    assert orphan_uploads("", uploads, own) == uploads


# --- what stays on the node ----------------------------------------------------------------------


def test_a_held_spool_stays_whatever_becomes_of_its_object() -> None:
    for state in (None, ObjectState("Failed"), ObjectState("Succeeded"), ObjectState("Failed", deleting=True)):
        assert folder_verdict(state, held=True, handed_over=False) == Verdict.KEEP


def test_a_handed_over_folder_waits_for_the_controllers_word() -> None:
    def verdict(state: ObjectState | None) -> Verdict:
        return folder_verdict(state, held=False, handed_over=True)

    assert verdict(ObjectState("Uploading")) == Verdict.KEEP  # Signing: podman's local checkpoint stays
    assert verdict(ObjectState("Succeeded")) == Verdict.SETTLE  # released
    assert verdict(ObjectState("Failed")) == Verdict.SETTLE  # the containers are given back
    assert verdict(ObjectState("Uploading", deleting=True)) == Verdict.SETTLE
    # Gone: whether it was signed and restored elsewhere is unknown; its container is not restored.
    assert verdict(None) == Verdict.REMOVE


def test_other_folders_go_with_their_object_or_its_success() -> None:
    assert folder_verdict(None, held=False, handed_over=False) == Verdict.REMOVE
    assert folder_verdict(ObjectState("Succeeded"), held=False, handed_over=False) == Verdict.REMOVE
    assert folder_verdict(ObjectState("Failed"), held=False, handed_over=False) == Verdict.KEEP
    assert folder_verdict(ObjectState("Checkpointing"), held=False, handed_over=False) == Verdict.KEEP


def test_the_folders_own_markers_are_no_containers(tmp_path: Path) -> None:
    folder = WorkFolder.of(tmp_path, "checkpoint", Metadata(name="x", namespace="n", uid="u"))
    folder.mark("held")  # a container named so
    folder.mark("handed-over")
    assert not folder.held() and not folder.handed_over()
    folder.hand_over()
    folder.hold()
    assert folder.held() and folder.handed_over()
    folder.drop_hand_over()
    assert not folder.handed_over() and folder.marked("handed-over")


# --- an upload aborts only what it started --------------------------------------------------------


class Bucket:
    """The two calls of ArchiveStore an abort makes, recorded."""

    def __init__(self) -> None:
        self.aborted: list[tuple[str, str]] = []

    def abort_upload(self, key: str, upload_id: str) -> bool:
        self.aborted.append((key, upload_id))
        return True

    def abort_uploads(self, key: str) -> int:
        raise AssertionError(f"every upload of {key} aborted: the agent aborts only its own")


class Agent:
    def __init__(self, root: Path) -> None:
        self.ledger = Ledger(root)


def test_the_agent_aborts_only_the_uploads_it_recorded(tmp_path: Path) -> None:
    ccp = checkpoint("x", "0123456789abcdef")
    folder = WorkFolder.of(tmp_path, "checkpoint", ccp.metadata)
    agent = Agent(tmp_path)
    key = "team-b/x-01234567/web.tar.zst"
    folder.save_upload_state("web", UploadState(key=key, storage="s", upload_id="mine"))
    agent.ledger.add_upload(OpenUpload(ccp.metadata.uid, "s", key, "mine-before-a-restart"))
    agent.ledger.add_upload(OpenUpload("another-object", "s", key, "theirs"))
    job = Checkpoint(cast(Node, agent), ccp, cast(StatusWriter, None), folder)
    bucket = Bucket()
    assert job.abort_own(cast(ArchiveStore, bucket), Target("web", "c" * 64), key) == 2
    assert sorted(bucket.aborted) == [(key, "mine"), (key, "mine-before-a-restart")]
    assert [u.upload_id for u in agent.ledger.uploads()] == ["theirs"]
