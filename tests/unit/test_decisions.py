import datetime
from typing import Any, cast

import pytest

from checkpointer import layout
from checkpointer.adapters.podman import Container, PodmanError
from checkpointer.conditions import set_condition
from checkpointer.errors import Failure
from checkpointer.models import CheckpointSpec, CheckpointStorage, Compression, ContainerCheckpoint, NameRef
from checkpointer.reasons import ConditionType, Reason
from checkpointer.services.checkpoint import select_targets
from checkpointer.services.node import classify
from checkpointer.services.scheduling import AgentLeases, choose_storage, lease_alive, pickup_overdue


def storage(name: str, default: bool = False, phase: str = "Available") -> CheckpointStorage:
    return CheckpointStorage.model_validate(
        {"metadata": {"name": name}, "spec": {"bucket": "b", "default": default}, "status": {"phase": phase}}
    )


def test_named_storage_wins_over_default() -> None:
    chosen = choose_storage(NameRef(name="a"), [storage("a"), storage("b", default=True)], namespace="ns")
    assert chosen.metadata.name == "a"


def test_default_storage_is_used_when_none_is_named() -> None:
    assert choose_storage(None, [storage("a"), storage("b", default=True)], namespace="ns").metadata.name == "b"


@pytest.mark.parametrize(
    ("storages", "reason"),
    [
        ([], Reason.STORAGE_NOT_FOUND),
        ([storage("a", default=True), storage("b", default=True)], Reason.STORAGE_NOT_FOUND),
        ([storage("a", default=True, phase="Unavailable")], Reason.STORAGE_UNAVAILABLE),
    ],
)
def test_storage_problems_have_reasons(storages: list[CheckpointStorage], reason: Reason) -> None:
    with pytest.raises(Failure) as e:
        choose_storage(None, storages, namespace="ns")
    assert e.value.reason == reason


def test_lease_alive_only_within_its_duration() -> None:
    assert lease_alive((3.0, 20))
    assert not lease_alive((21.0, 20))
    assert not lease_alive(None)


class Leases:
    """A Kube stand-in that answers lease_age from a dict and counts the reads."""

    def __init__(self, leases: dict[str, tuple[float, int] | None]) -> None:
        self.leases = leases
        self.reads = 0

    def lease_age(self, namespace: str, name: str) -> tuple[float, int] | None:
        self.reads += 1
        return self.leases[name]


def test_a_lease_read_alive_is_not_read_again_until_it_may_have_run_out() -> None:
    kube = Leases({"checkpointer-agent-a": (5.0, 20), "checkpointer-agent-b": (20.0, 20)})
    leases = AgentLeases(cast(Any, kube), "ns")
    assert leases.alive("a") and leases.alive("a") and kube.reads == 1
    assert leases.alive("b")
    kube.leases["checkpointer-agent-b"] = None  # its agent is gone
    assert not leases.alive("b") and kube.reads == 3  # b's Lease ran out at once: read again


def test_a_missing_or_expired_lease_is_read_every_time() -> None:
    kube = Leases({"checkpointer-agent-a": None, "checkpointer-agent-b": (21.0, 20)})
    leases = AgentLeases(cast(Any, kube), "ns")
    assert not leases.alive("a") and not leases.alive("a")
    assert not leases.alive("b")
    kube.leases["checkpointer-agent-b"] = (0.5, 20)  # its agent came back
    assert leases.alive("b") and kube.reads == 4


OWN = (("checkpointer.dev/namespace", "ns"),)
RUNNING = Container(id="a" * 64, name="web", state="running", labels=OWN)
STOPPED = Container(id="b" * 64, name="db", state="exited", labels=OWN)
AGENT = Container(id="c" * 64, name="agent", state="running", labels=(("checkpointer.dev/exclude", "true"), *OWN))

ADMINS = frozenset({"checkpointer-system"})


def spec(**fields: object) -> CheckpointSpec:
    return CheckpointSpec.model_validate({"nodeName": "n", **fields})


def test_all_expands_to_running_containers_but_not_excluded_ones() -> None:
    assert select_targets(spec(all=True), [RUNNING, STOPPED, AGENT], "ns", ADMINS) == [RUNNING]


def test_names_ids_and_id_prefixes_resolve() -> None:
    assert select_targets(spec(containers=["web"]), [RUNNING], "ns", ADMINS) == [RUNNING]
    assert select_targets(spec(containers=["a" * 12]), [RUNNING], "ns", ADMINS) == [RUNNING]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"containers": ["nope"]}, Reason.CONTAINER_NOT_FOUND),
        ({"containers": ["db"]}, Reason.CONTAINER_NOT_RUNNING),
        ({"latest": True}, Reason.CONTAINER_NOT_RUNNING),  # the newest container is a stopped one
        ({"all": True}, Reason.CONTAINER_NOT_FOUND),
    ],
)
def test_target_problems_have_reasons(fields: dict[str, object], reason: Reason) -> None:
    with pytest.raises(Failure) as e:
        select_targets(spec(**fields), [STOPPED], "ns", ADMINS)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ('no container with name or ID "x" found: no such container', Reason.CONTAINER_NOT_FOUND),
        ('"x" is not running, cannot checkpoint: container state improper', Reason.CONTAINER_NOT_RUNNING),
        ("CRIU checking for pre-dump support failed: missing features", Reason.CRIU_FEATURE_MISSING),
        ("something else broke", Reason.CHECKPOINT_FAILED),
    ],
)
def test_podman_messages_classify(message: str, reason: Reason) -> None:
    assert classify(PodmanError(message, 125), Reason.CHECKPOINT_FAILED) == reason


def checkpoint(key: str | None = None) -> ContainerCheckpoint:
    return ContainerCheckpoint.model_validate(
        {
            "metadata": {"name": "cp", "namespace": "ns", "uid": "0123456789abcdef"},
            "spec": {"nodeName": "n", "all": True, "export": {"key": key} if key else {}},
        }
    )


def test_archive_layout_follows_the_contract() -> None:
    directory = layout.archive_dir("backups/", checkpoint())
    assert directory == "backups/ns/cp-01234567"
    assert layout.archive_key(directory, "web", Compression.ZSTD) == "backups/ns/cp-01234567/web.tar.zst"
    assert layout.archive_dir("", checkpoint("team/migrations/x")) == "ns/team/migrations/x-01234567"
    assert layout.compression_of("a/b.tar.gz") == Compression.GZIP
    assert layout.compression_of("a/b.tar") == Compression.NONE


def test_condition_transition_time_moves_only_when_status_flips() -> None:
    [first] = set_condition([], ConditionType.READY, False, Reason.CHECKPOINTING, "a", 1)
    first = first.model_copy(update={"last_transition_time": "2000-01-01T00:00:00Z"})
    same = set_condition([first], ConditionType.READY, False, Reason.UPLOADING, "b", 1)
    assert same[0].last_transition_time == "2000-01-01T00:00:00Z"
    assert same[0].reason == "Uploading"
    flipped = set_condition(same, ConditionType.READY, True, Reason.SUCCEEDED, "c", 1)
    assert flipped[0].last_transition_time != "2000-01-01T00:00:00Z"
    assert len(flipped) == 1


def test_pickup_is_overdue_only_for_a_scheduled_object_handed_over_long_enough_ago() -> None:
    now = datetime.datetime(2026, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)

    def body(phase: str, since: str) -> dict[str, Any]:
        condition = {"type": "Scheduled", "status": "True", "lastTransitionTime": since}
        return {
            "metadata": {"creationTimestamp": "2026-03-01T11:00:00Z"},
            "status": {"phase": phase, "conditions": [condition]},
        }

    assert pickup_overdue(body("Scheduled", "2026-03-01T11:58:59Z"), now, 60)
    assert not pickup_overdue(body("Scheduled", "2026-03-01T11:59:30Z"), now, 60)
    assert not pickup_overdue(body("Checkpointing", "2026-03-01T11:00:00Z"), now, 60)
    without = {"metadata": {"creationTimestamp": "2026-03-01T11:00:00Z"}, "status": {"phase": "Scheduled"}}
    assert pickup_overdue(without, now, 60)
