"""Tenancy decisions: whose containers a checkpoint may take, where keys resolve, who may use a storage."""

from __future__ import annotations

from typing import Any

import pytest

from checkpointer import layout
from checkpointer.adapters.podman import Container, _container
from checkpointer.controller import agent_may_be_at_work, recorded_keys
from checkpointer.errors import Failure
from checkpointer.models import (
    ArchiveRef,
    CheckpointSpec,
    CheckpointStatus,
    CheckpointStorage,
    ContainerCheckpoint,
    NameRef,
)
from checkpointer.reasons import Reason
from checkpointer.services.checkpoint import select_targets
from checkpointer.services.scheduling import choose_storage
from checkpointer.settings import Settings

ADMINS = frozenset({"checkpointer-system"})
LABEL = "checkpointer.dev/namespace"


def container(name: str, namespace: str | None, created: float, state: str = "running") -> Container:
    labels = ((LABEL, namespace),) if namespace else ()
    return Container(id=name * 12, name=name, state=state, labels=labels, created=created)


OURS_OLD = container("a", "team-a", 100)
OURS_NEW = container("b", "team-a", 200)
THEIRS = container("c", "team-b", 300)  # the newest on the node
UNLABELLED = container("d", None, 400)
NODE = [OURS_OLD, THEIRS, OURS_NEW, UNLABELLED]


def spec(**fields: object) -> CheckpointSpec:
    return CheckpointSpec.model_validate({"nodeName": "n", **fields})


def test_a_namespace_checkpoints_its_own_labelled_container() -> None:
    assert select_targets(spec(containers=["a"]), NODE, "team-a", ADMINS) == [OURS_OLD]


@pytest.mark.parametrize("ref", ["c", "c" * 12, "d"])
def test_another_namespaces_or_an_unlabelled_container_is_not_permitted(ref: str) -> None:
    with pytest.raises(Failure) as e:
        select_targets(spec(containers=["a", ref]), NODE, "team-a", ADMINS)
    assert e.value.reason == Reason.CONTAINER_NOT_PERMITTED
    # Says what to change, and nothing about whose the container is.
    assert f"{LABEL}=team-a" in e.value.message
    assert "team-b" not in e.value.message


def test_all_and_latest_see_only_the_namespaces_containers() -> None:
    assert select_targets(spec(all=True), NODE, "team-a", ADMINS) == [OURS_OLD, OURS_NEW]
    assert select_targets(spec(latest=True), NODE, "team-a", ADMINS) == [OURS_NEW]


def test_all_and_latest_without_a_permitted_container_say_which_label_they_need() -> None:
    for fields in ({"all": True}, {"latest": True}):
        with pytest.raises(Failure) as e:
            select_targets(spec(**fields), NODE, "team-z", ADMINS)
        assert e.value.reason == Reason.CONTAINER_NOT_FOUND
        assert f"labelled {LABEL}=team-z" in e.value.message


def test_an_admin_namespace_takes_any_container() -> None:
    assert select_targets(spec(containers=["c", "d"]), NODE, "checkpointer-system", ADMINS) == [THEIRS, UNLABELLED]
    assert select_targets(spec(all=True), NODE, "checkpointer-system", ADMINS) == NODE
    assert select_targets(spec(latest=True), NODE, "checkpointer-system", ADMINS) == [UNLABELLED]


def test_latest_of_equal_times_is_the_last_listed() -> None:
    # The CLI lists the oldest first, in whole seconds: of two made in one second, the last is newer.
    first, second = container("x", "team-a", 500), container("y", "team-a", 500)
    assert select_targets(spec(latest=True), [first, second], "team-a", ADMINS) == [second]


def test_both_runtimes_creation_times_are_read() -> None:
    cli = _container({"Id": "1", "Names": ["a"], "State": "running", "Created": 1700000000})
    api = _container({"Id": "1", "Names": ["a"], "State": "running", "Created": "2023-11-14T22:13:20.5+00:00"})
    inspect = _container({"Id": "1", "Name": "a", "State": {"Status": "running"}, "Created": "2023-11-14T22:13:20Z"})
    assert cli.created == inspect.created == 1700000000.0
    assert api.created == 1700000000.5


def ref(key: str, namespace: str | None = None) -> ArchiveRef:
    return ArchiveRef(key=key, namespace=namespace)


def test_restore_keys_resolve_in_the_restores_namespace() -> None:
    assert (
        layout.resolve_archive_key("backups", "team-a", ref("x/web.tar.zst"), ADMINS) == "backups/team-a/x/web.tar.zst"
    )
    # A key that names another namespace's folder is a folder inside one's own.
    assert layout.resolve_archive_key("", "team-a", ref("team-b/x/web.tar"), ADMINS) == "team-a/team-b/x/web.tar"
    assert layout.resolve_archive_key("", "team-a", ref("web.tar", "team-a"), ADMINS) == "team-a/web.tar"


def test_only_an_admin_namespace_reads_another_namespaces_folder() -> None:
    with pytest.raises(Failure) as e:
        layout.resolve_archive_key("p", "team-a", ref("x/web.tar", "team-b"), ADMINS)
    assert e.value.reason == Reason.ARCHIVE_NOT_PERMITTED
    assert layout.resolve_archive_key("p", "checkpointer-system", ref("x/web.tar", "team-b"), ADMINS) == (
        "p/team-b/x/web.tar"
    )


def checkpoint(key: str | None = None, **status: object) -> ContainerCheckpoint:
    return ContainerCheckpoint.model_validate(
        {
            "metadata": {"name": "cp", "namespace": "team-a", "uid": "0123456789abcdef"},
            "spec": {"nodeName": "n", "containers": ["web", "db"], "keep": True, "export": {"key": key} if key else {}},
            "status": status,
        }
    )


def test_export_key_is_a_folder_inside_the_namespaces_folder_and_the_checkpoints_own() -> None:
    assert layout.archive_dir("backups", checkpoint()) == "backups/team-a/cp-01234567"
    assert layout.archive_dir("backups", checkpoint("team-b/x")) == "backups/team-a/team-b/x-01234567"
    assert layout.archive_dir("", checkpoint("x")) == "team-a/x-01234567"


def test_two_checkpoints_given_the_same_key_never_share_a_folder() -> None:
    first = checkpoint("shared", phase="Succeeded")
    second = first.model_copy(update={"metadata": first.metadata.model_copy(update={"uid": "fedcba9876543210"})})
    assert layout.archive_dir("", first) == "team-a/shared-01234567"
    assert layout.archive_dir("", second) == "team-a/shared-fedcba98"
    # Nothing one of them writes, deletes or aborts is the other's.
    first_keys, second_keys = (set.union(*recorded_keys("", c)) for c in (first, second))
    assert not first_keys & second_keys


def test_deleting_a_checkpoint_removes_only_what_it_recorded() -> None:
    folder = "team-a/shared-01234567"
    stored = {"container": "web", "key": f"{folder}/web.tar.zst"}
    objects, uploads = recorded_keys("", checkpoint("shared", phase="Succeeded", archives=[stored]))
    assert objects == {f"{folder}/web.tar.zst", f"{folder}/manifest.json"}
    # Whether its storage encrypted or not: an open upload at either key is this checkpoint's.
    assert uploads == objects | {f"{folder}/db.tar.zst", f"{folder}/db.tar.zst.age", f"{stored['key']}.age"}
    # Failed after the first archive, with keep: CRIU's logs, but no manifest it never wrote.
    objects, _ = recorded_keys("", checkpoint("shared", phase="Failed", archives=[stored]))
    assert objects == {f"{folder}/web.tar.zst", f"{folder}/db.criu-dump.log"}
    # Nothing stored: no object is deleted, only its own uploads are aborted.
    objects, uploads = recorded_keys("", checkpoint("shared", phase="Failed"))
    assert objects == {f"{folder}/web.criu-dump.log", f"{folder}/db.criu-dump.log"}
    assert f"{folder}/db.tar.zst" in uploads and f"{folder}/manifest.json" not in uploads


def test_a_deleted_checkpoints_archives_wait_only_for_an_agent_that_may_be_at_work() -> None:
    signing = {"type": "Ready", "status": "False", "reason": "Signing"}

    def at_work(status: dict[str, Any]) -> bool:
        return agent_may_be_at_work(CheckpointStatus.model_validate(status))

    for phase in ("Checkpointing", "Uploading"):
        assert at_work({"phase": phase})
    # Not begun (and never will: kopf runs no agent handler for an object deleting when first seen),
    # handed over for signing, or finished: the archives go at once.
    assert not at_work({})
    assert not at_work({"phase": "Scheduled"})
    assert not at_work({"phase": "Uploading", "conditions": [signing]})
    for phase in ("Succeeded", "Failed"):
        assert not at_work({"phase": phase})


def storage(name: str, allowed: list[str] | None, default: bool = False) -> CheckpointStorage:
    spec: dict[str, object] = {"bucket": "b", "default": default}
    if allowed is not None:
        spec["allowedNamespaces"] = allowed
    return CheckpointStorage.model_validate(
        {"metadata": {"name": name}, "spec": spec, "status": {"phase": "Available"}}
    )


def test_allowed_namespaces_limit_who_uses_a_storage() -> None:
    storages = [storage("open", None, default=True), storage("team-a-only", ["team-a"]), storage("nobody", [])]
    assert choose_storage(None, storages, namespace="team-b").metadata.name == "open"
    assert choose_storage(NameRef(name="team-a-only"), storages, namespace="team-a").metadata.name == "team-a-only"
    for name, namespace in (("team-a-only", "team-b"), ("nobody", "team-a")):
        with pytest.raises(Failure) as e:
            choose_storage(NameRef(name=name), storages, namespace=namespace)
        assert e.value.reason == Reason.STORAGE_NOT_PERMITTED
        assert namespace in e.value.message


def test_the_admin_namespaces_setting_is_a_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHECKPOINTER_NAMESPACE", "ops")
    assert Settings().admins == {"ops"}
    monkeypatch.setenv("CHECKPOINTER_ADMIN_NAMESPACES", '["ops", "platform"]')
    assert Settings().admins == {"ops", "platform"}


def test_previous_checkpoint_is_looked_up_in_the_own_namespace() -> None:
    from checkpointer.services.scheduling import require_previous

    class Asked:
        def __init__(self) -> None:
            self.gets: list[tuple[str, str, str]] = []

        def get(self, plural: str, namespace: str, name: str) -> dict[str, object] | None:
            self.gets.append((plural, namespace, name))
            return {"status": {"phase": "Succeeded"}} if namespace == "team-a" else None

    ccp = ContainerCheckpoint.model_validate(
        {
            "metadata": {"name": "second", "namespace": "team-a", "uid": "u"},
            "spec": {
                "nodeName": "n",
                "containers": ["web"],
                "withPrevious": True,
                "previousCheckpointRef": {"name": "first"},
            },
        }
    )
    kube = Asked()
    require_previous(kube, ccp)  # type: ignore[arg-type]
    assert kube.gets == [("containercheckpoints", "team-a", "first")]
    elsewhere = ccp.model_copy(update={"metadata": ccp.metadata.model_copy(update={"namespace": "team-b"})})
    with pytest.raises(Failure) as refused:
        require_previous(kube, elsewhere)  # type: ignore[arg-type]
    assert refused.value.reason is Reason.PREVIOUS_CHECKPOINT_NOT_READY
    assert kube.gets[-1] == ("containercheckpoints", "team-b", "first")
