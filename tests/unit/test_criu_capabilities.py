"""The up-front refusal of checkpoints a node's CRIU or podman cannot take safely (services/capabilities.py)."""

from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from checkpointer.archive.workfolder import WorkFolder
from checkpointer.errors import Failure
from checkpointer.models import CheckpointSpec, ContainerCheckpoint
from checkpointer.reasons import Reason
from checkpointer.services.capabilities import (
    ANNOTATIONS,
    NodeFacts,
    dumps_inet_sockets,
    live_export_refusal,
    missing_for_checkpoint,
    version_of,
)
from checkpointer.services.checkpoint import Checkpoint
from checkpointer.settings import Settings

# This project's test machines: Debian's CRIU on kernel 6.18, which has no soft-dirty tracking.
TRIXIE = NodeFacts(
    criu="4.1.1",
    podman="5.4.2",
    runc="1.1.15+ds1",
    kernel="6.18.0-1-amd64",
    supported=frozenset({"timens", "tcp_half_closed"}),
    missing=frozenset({"mem_dirty_track"}),
)
FORKY = replace(TRIXIE, criu="4.2.1", supported=frozenset({"mem_dirty_track", "timens"}), missing=frozenset())


def spec(**fields: Any) -> CheckpointSpec:
    return CheckpointSpec.model_validate({"nodeName": "node-a", "containers": ["web"], **fields})


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("4.2.1", (4, 2, 1)),
        ("4.1", (4, 1)),
        ("6.18.0-1-amd64", (6, 18, 0)),
        ("6.16.0+deb14-amd64", (6, 16, 0)),
        ("v1.3.6", (1, 3, 6)),
        ("", None),
        ("unknown", None),
    ],
)
def test_versions_are_read_from_their_leading_numbers(text: str, version: tuple[int, ...] | None) -> None:
    assert version_of(text) == version


@pytest.mark.parametrize(
    ("criu", "kernel", "dumps"),
    [
        ("4.1.1", "6.18.0-1-amd64", False),
        ("4.1.1", "6.16.0", False),
        ("3.17", "6.16.1", False),
        ("4.1.1", "6.15.9", True),  # the kernel still gives every socket SO_PASSCRED
        ("4.2.1", "6.18.0-1-amd64", True),
        ("4.2", "6.16.0", True),
        ("5.0", "7.1", True),
        ("", "6.18.0", None),
        ("4.1.1", "", None),
    ],
)
def test_criu_dumps_inet_sockets_from_4_2_on_linux_6_16_and_newer(criu: str, kernel: str, dumps: bool | None) -> None:
    assert dumps_inet_sockets(NodeFacts(criu=criu, kernel=kernel)) is dumps


def test_tcp_established_is_refused_on_criu_4_1_and_linux_6_18_naming_the_versions() -> None:
    why = missing_for_checkpoint(spec(tcpEstablished=True), "node-a", TRIXIE)
    assert why is not None
    assert "node node-a" in why and "tcpEstablished" in why
    assert "CRIU 4.1.1, podman 5.4.2, runc 1.1.15+ds1, Linux 6.18.0-1-amd64" in why


def test_tcp_established_is_taken_on_criu_4_2() -> None:
    assert missing_for_checkpoint(spec(tcpEstablished=True), "node-a", FORKY) is None


@pytest.mark.parametrize(
    "fields", [{"preCheckpoint": True}, {"withPrevious": True, "previousCheckpointRef": {"name": "p"}}]
)
def test_dumps_needing_dirty_tracking_are_refused_without_it(fields: dict[str, Any]) -> None:
    without = replace(FORKY, supported=FORKY.supported - TRIXIE.missing, missing=TRIXIE.missing)
    why = missing_for_checkpoint(spec(**fields), "node-a", without)
    assert why is not None
    assert "mem_dirty_track" in why and "CRIU 4.2.1" in why
    assert missing_for_checkpoint(spec(**fields), "node-a", FORKY) is None


def test_plain_checkpoints_need_no_feature() -> None:
    assert missing_for_checkpoint(spec(), "node-a", TRIXIE) is None
    assert missing_for_checkpoint(spec(leaveRunning=True), "node-a", TRIXIE) is None


def test_nothing_recorded_refuses_nothing() -> None:
    """An agent that recorded nothing (yet) leaves the word to CRIU, and to the agent's own check."""
    assert missing_for_checkpoint(spec(tcpEstablished=True), "node-a", None) is None
    assert missing_for_checkpoint(spec(preCheckpoint=True), "node-a", None) is None
    unknown = NodeFacts(podman="5.4.2")
    assert missing_for_checkpoint(spec(tcpEstablished=True), "node-a", unknown) is None
    assert missing_for_checkpoint(spec(preCheckpoint=True), "node-a", unknown) is None


def test_facts_survive_the_lease_annotations() -> None:
    annotations = TRIXIE.annotations()
    assert annotations[ANNOTATIONS["criu"]] == "4.1.1"
    assert annotations[ANNOTATIONS["missing"]] == "mem_dirty_track"
    assert annotations[ANNOTATIONS["supported"]] == "tcp_half_closed,timens"
    assert all(key.startswith("checkpointer.dev/") for key in annotations)
    assert NodeFacts.from_annotations({**annotations, "other.example/x": "y"}) == TRIXIE
    assert NodeFacts.from_annotations({}) is None
    assert NodeFacts.from_annotations(None) is None


LIVE_EXPORT = {"leaveRunning": True, "export": {"storageRef": {"name": "s3"}}}


@pytest.mark.parametrize("podman", ["5.4.2", "5.8.1", "5.8", "4.9.3", "", "unknown"])
def test_a_live_export_is_refused_on_podman_before_5_8_2_naming_both_versions(podman: str) -> None:
    why = live_export_refusal(spec(**LIVE_EXPORT), "node-a", podman, admin=False)
    assert why is not None
    assert f"node node-a runs podman {podman or '(unknown)'}" in why and "5.8.2" in why
    assert "the container keeps running" in why


@pytest.mark.parametrize("podman", ["5.8.2", "5.8.3", "5.9.0", "6.0.0-rc1"])
def test_a_live_export_is_taken_on_podman_5_8_2_and_newer(podman: str) -> None:
    assert live_export_refusal(spec(**LIVE_EXPORT), "node-a", podman, admin=False) is None


@pytest.mark.parametrize(
    "fields",
    [
        {"leaveRunning": True},  # nothing leaves the node
        {"export": {}},  # the container is stopped while podman copies
        {**LIVE_EXPORT, "ignoreRootfs": True},  # no root file system is copied
    ],
)
def test_only_a_live_export_of_the_root_file_system_is_refused(fields: dict[str, Any]) -> None:
    assert live_export_refusal(spec(**fields), "node-a", "5.4.2", admin=False) is None


def test_an_admin_namespace_may_export_live_on_any_podman() -> None:
    assert live_export_refusal(spec(**LIVE_EXPORT), "node-a", "5.4.2", admin=True) is None


class _Host:
    """What the agent's check asks of its node: the versions podman reports (Node.host)."""

    def __init__(self, podman: str) -> None:
        self.settings = Settings(node_name="node-a", namespace="checkpointer-system")
        self.podman = podman
        self.asked = 0

    def host(self) -> dict[str, str]:
        self.asked += 1
        return {"podman": self.podman}


def agent_check(namespace: str, podman: str, **fields: Any) -> tuple[Reason | None, int]:
    node = _Host(podman)
    spec = {"nodeName": "node-a", "containers": ["web"], **fields}
    ccp = ContainerCheckpoint.model_validate({"metadata": {"name": "c", "namespace": namespace}, "spec": spec})
    job = Checkpoint(cast(Any, node), ccp, cast(Any, None), WorkFolder(Path("/nonexistent")))
    try:
        job.require_safe_live_export()
    except Failure as e:
        assert "node node-a runs podman" in e.message
        return e.reason, node.asked
    return None, node.asked


def test_the_agent_asks_its_own_podman_when_the_lease_says_nothing() -> None:
    assert agent_check("team-a", "5.4.2", **LIVE_EXPORT) == (Reason.LIVE_EXPORT_NOT_PERMITTED, 1)
    assert agent_check("team-a", "", **LIVE_EXPORT) == (Reason.LIVE_EXPORT_NOT_PERMITTED, 1)
    assert agent_check("team-a", "5.8.6", **LIVE_EXPORT) == (None, 1)
    # Neither a checkpoint that is no live export nor an admin namespace's asks podman at all.
    assert agent_check("team-a", "5.4.2", leaveRunning=True) == (None, 0)
    assert agent_check("checkpointer-system", "5.4.2", **LIVE_EXPORT) == (None, 0)
