"""The ContainerRestore fields that reach the node, judged outside admin namespaces: publish, pod, the
archive's named volumes, and a failed restore's cleanup of its name (docs/security.md)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest.mock import patch

import pytest

from checkpointer.adapters.podman import Container, Labelled, _container, _labelled, restore_in_progress
from checkpointer.archive.workfolder import PodmanRestore, WorkFolder
from checkpointer.errors import Failure
from checkpointer.models import ContainerRestore
from checkpointer.reasons import Reason
from checkpointer.services import restore as restore_service
from checkpointer.services.restore import (
    RESTORING,
    Claims,
    created_by_restore,
    joined_networks,
    named_volumes,
    network_refusal,
    pod_refusal,
    volume_refusal,
)
from checkpointer.services.scheduling import (
    allowed_host_ports,
    publish_not_permitted,
    published_host_ports,
    require_publish_permitted,
)
from checkpointer.settings import Settings

LABEL = "checkpointer.dev/namespace"
NODE_PORTS = [(30000, 32767)]


@pytest.mark.parametrize(
    ("entry", "ports"),
    [
        ("8080", None),
        ("8080/udp", None),
        ("30080:8080", (30080, 30080)),
        ("30080:8080/tcp", (30080, 30080)),
        ("0.0.0.0:22:8080", (22, 22)),
        ("127.0.0.1::8080", None),
        ("127.0.0.1:30080:8080/sctp", (30080, 30080)),
        ("[::1]:30080:8080", (30080, 30080)),
        ("[::1]::8080", None),
        ("30000-30009:8000-8009", (30000, 30009)),
        ("10.0.0.1:30000-30009:8000-8009/udp", (30000, 30009)),
    ],
)
def test_the_host_ports_of_a_publish_entry_in_podmans_syntax(entry: str, ports: tuple[int, int] | None) -> None:
    assert published_host_ports(entry) == ports


@pytest.mark.parametrize("entry", ["", "http", "127.0.0.1:8080", "x:8080", "9-1:80", "0:80", "70000:80", "[::1:80:8"])
def test_what_is_not_podmans_syntax_is_not_understood(entry: str) -> None:
    with pytest.raises(ValueError):
        published_host_ports(entry)


def test_the_allowed_host_ports_setting() -> None:
    assert allowed_host_ports("") == []
    assert allowed_host_ports("30000-32767") == [(30000, 32767)]
    assert allowed_host_ports(" 8080 , 30000-32767 ") == [(8080, 8080), (30000, 32767)]
    for wrong in ("30000-", "a-b", "32767-30000", "0", "65536", "1-2-3"):
        with pytest.raises(ValueError, match="CHECKPOINTER_PUBLISH_HOST_PORTS"):
            allowed_host_ports(wrong)


def test_publish_only_within_the_allowed_host_ports() -> None:
    assert publish_not_permitted(["30080:8080", "127.0.0.1:32767:80/udp", "30000-30009:8000-8009"], NODE_PORTS) == []
    assert publish_not_permitted(["0.0.0.0:22:8080"], NODE_PORTS) == ["'0.0.0.0:22:8080' (host port 22)"]
    assert publish_not_permitted(["32760-32770:80-90"], NODE_PORTS) == ["'32760-32770:80-90' (host port 32760-32770)"]
    # Without a host port podman takes any free port of the node: no range bounds it.
    [why] = publish_not_permitted(["8080"], NODE_PORTS)
    assert "podman would choose" in why
    [why] = publish_not_permitted(["127.0.0.1::8080"], NODE_PORTS)
    assert "podman would choose" in why
    # Nothing allowed: no host port at all.
    assert len(publish_not_permitted(["30080:8080", "8080"], [])) == 2


def restore(namespace: str, **spec: object) -> ContainerRestore:
    return ContainerRestore.model_validate(
        {
            "metadata": {"name": "r", "namespace": namespace, "uid": "u"},
            "spec": {"nodeName": "n", "source": {"checkpointRef": {"name": "c"}}, **spec},
        }
    )


def test_the_controller_refuses_publish_naming_the_rule_the_entry_and_the_range() -> None:
    settings = Settings(namespace="checkpointer-system", publish_host_ports="30000-32767")
    require_publish_permitted(restore("team-a", publish=["30080:8080"]), settings)
    with pytest.raises(Failure) as refused:
        require_publish_permitted(restore("team-a", publish=["30080:8080", "0.0.0.0:22:8080"]), settings)
    assert refused.value.reason is Reason.PUBLISH_NOT_PERMITTED
    message = refused.value.message
    assert "'0.0.0.0:22:8080' (host port 22)" in message and "30000-32767" in message
    assert "tenancy.publishHostPorts" in message and "30080:8080" not in message
    # An admin namespace is free of the rule.
    require_publish_permitted(restore("checkpointer-system", publish=["0.0.0.0:22:8080", "80"]), settings)
    with pytest.raises(Failure, match=r"\(none;"):
        require_publish_permitted(restore("team-a", publish=["30080:8080"]), Settings(publish_host_ports=""))


def labelled(name: str, namespace: str | None) -> Labelled:
    return Labelled(id=f"{name}-id", name=name, labels=((LABEL, namespace),) if namespace else ())


def test_a_restore_joins_only_a_pod_of_its_namespace() -> None:
    assert pod_refusal("web", labelled("web", "team-a"), "team-a", "n") is None
    for pod in (labelled("web", "team-b"), labelled("web", None)):
        refusal = pod_refusal("web", pod, "team-a", "n")
        assert refusal is not None and refusal.reason is Reason.POD_NOT_PERMITTED
        assert f"{LABEL}=team-a" in refusal.message and "team-b" not in refusal.message
    missing = pod_refusal("web", None, "team-a", "n")
    assert missing is not None and missing.reason is Reason.POD_NOT_FOUND


def test_named_volumes_absent_or_labelled_for_the_namespace() -> None:
    config = {
        "namedVolumes": [
            {"volumeName": "data", "dest": "/data"},
            {"volumeName": "cache", "dest": "/cache"},
            {"volumeName": "data", "dest": "/again"},
            {"dest": "/nameless"},
            "junk",
        ]
    }
    assert named_volumes(config) == ["data", "cache"]
    assert named_volumes({}) == []
    ours = {"data": labelled("data", "team-a"), "cache": None}
    assert volume_refusal(["data", "cache"], ours, "team-a", "n") is None
    theirs = {"data": labelled("data", "team-b"), "cache": labelled("cache", None)}
    refusal = volume_refusal(["data", "cache"], theirs, "team-a", "n")
    assert refusal is not None and refusal.reason is Reason.VOLUME_NOT_PERMITTED
    assert "'data', 'cache'" in refusal.message and "team-b" not in refusal.message
    odd = volume_refusal(["--help"], {}, "team-a", "n")
    assert odd is not None and "not a podman volume name" in odd.message


def test_networks_only_the_default_or_labelled_for_the_namespace() -> None:
    config = {"newNetworks": {"shared": {"interface_name": "eth0"}, "podman": {}}, "networkMode": "bridge"}
    assert joined_networks(config) == ["shared", "podman"]
    assert joined_networks({"networkMode": "none"}) == []
    assert network_refusal(["shared"], {"shared": labelled("shared", "team-a")}, "team-a", "n") is None
    theirs = network_refusal(["shared"], {"shared": labelled("shared", "team-b")}, "team-a", "n")
    assert theirs is not None and theirs.reason is Reason.NETWORK_NOT_PERMITTED
    assert "'shared'" in theirs.message and "team-b" not in theirs.message and "nothing was restored" in theirs.message
    absent = network_refusal(["gone"], {"gone": None}, "team-a", "n")
    assert absent is not None and "'gone' (absent)" in absent.message
    odd = network_refusal(["--help"], {}, "team-a", "n")
    assert odd is not None and "not a network name" in odd.message


def test_a_networks_inspection_is_read_with_netavarks_keys() -> None:
    network = {"name": "shared", "id": "f00", "driver": "bridge", "labels": {LABEL: "team-a"}}
    assert _labelled([network]) == Labelled("f00", "shared", ((LABEL, "team-a"),))


def test_both_runtimes_pod_and_volume_inspections_are_read() -> None:
    # The REST API and podman 4 answer with one object, podman 5's CLI with a list; volumes have no Id.
    pod = {"Id": "abc", "Name": "web", "Labels": {LABEL: "team-a"}}
    assert _labelled(pod) == _labelled([pod]) == Labelled("abc", "web", ((LABEL, "team-a"),))
    assert _labelled([{"Name": "data", "Labels": None}]) == Labelled("data", "data", ())
    assert _labelled([]) is None and _labelled(None) is None


def container(id: str, name: str = "web") -> Container:
    return Container(id=id, name=name, state="created")


def test_a_failed_restore_removes_only_the_container_it_created() -> None:
    assert created_by_restore(container("new"), set(), None)
    assert created_by_restore(container("archived"), set(), "archived")
    assert not created_by_restore(None, set(), None)
    # One that held the name (or its ID prefix) before podman was called is not this restore's.
    assert not created_by_restore(container("old"), {"old"}, None)
    # Without a new name podman keeps the archive's ID: a container with another ID is someone else's.
    assert not created_by_restore(container("other"), set(), "archived")


def test_claims_hold_a_name_for_one_restore_at_a_time() -> None:
    claims = Claims()
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with claims.hold(["container web", "volume data"]):
            first_in.set()
            time.sleep(0.2)
            order.append("first out")

    def second() -> None:
        first_in.wait()
        with claims.hold(["volume data", "container web"]):  # another order: the same locks, no deadlock
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert order == ["first out", "second in"]
    with claims.hold(["container other"]):  # another name does not wait
        pass
    assert claims._claims == {}, "a claim nobody holds is forgotten"


def test_a_restarted_agent_sees_the_podman_that_outlived_it_by_the_import_it_names(tmp_path: Path) -> None:
    folder = tmp_path / "restore_default_r_0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert not restore_in_progress(str(folder))
    # A process with podman's command line: `... container restore --print-stats --import=<folder>/<file>`.
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "container", "restore", f"--import={folder}/a.tar"]
    outlived = subprocess.Popen(argv)
    try:
        until = time.monotonic() + 10
        while not restore_in_progress(str(folder)) and time.monotonic() < until:
            time.sleep(0.05)
        assert restore_in_progress(str(folder))
        assert not restore_in_progress(str(tmp_path / "restore_default_other"))
    finally:
        outlived.kill()
        outlived.wait()
    assert not restore_in_progress(str(folder))


def test_a_running_container_says_when_podman_restored_it() -> None:
    state = {"Status": "running", "Running": True, "StartedAt": "2026-12-07T22:00:00.5Z"}
    restored = _container({"Id": "a", "Name": "web", "State": {**state, "RestoredAt": "2026-12-07T22:00:01.25Z"}})
    assert restored.started_at == "2026-12-07T22:00:01.25Z"
    started = _container({"Id": "a", "Name": "web", "State": {**state, "RestoredAt": "0001-01-01T00:00:00Z"}})
    assert started.started_at == "2026-12-07T22:00:00.5Z"
    created = _container({"Id": "a", "Name": "web", "State": {"Status": "created", "Running": False}})
    assert not created.running and created.started_at == ""


class _Podman:
    """A node's podman as a restarted agent finds it: one container holding the name, or none."""

    def __init__(self, found: Container | None) -> None:
        self.found = found
        self.removed: list[str] = []

    def inspect(self, name: str) -> Container | None:
        return self.found if self.found is not None and self.found.name == name else None

    def remove(self, container: Container) -> None:
        self.removed.append(container.id)


class _Status:
    def __init__(self) -> None:
        self.written: list[tuple[str, str, Any]] = []

    def phase(self, phase: str, reason: str, message: str, *, patch: Any = None) -> None:
        self.written.append((phase, reason, patch))


def _after_restart(tmp_path: Path, podman: _Podman, record: bool = True) -> _Status:
    status = _Status()
    node = SimpleNamespace(runtime=podman, settings=Settings(namespace="checkpointer-system"))
    folder = WorkFolder(tmp_path / "restore_default_r_u")
    if record:
        folder.save_podman_restore(PodmanRestore("web", "a" * 64, ("old",)))
    folder.mark(RESTORING)
    with patch.object(restore_service, "SETTLE_SECONDS", 0.0):
        restore_service.interrupted(node, restore("team-a"), status, folder)  # type: ignore[arg-type]
    return status


def test_a_restarted_agent_finds_podman_finished_and_the_restore_succeeded(tmp_path: Path) -> None:
    running = Container("a" * 64, "web", "running", started_at="2026-12-07T22:00:01.25Z")
    podman = _Podman(running)
    status = _after_restart(tmp_path, podman)
    [(phase, reason, fields)] = status.written
    assert (phase, reason, podman.removed) == ("Succeeded", "Succeeded", [])
    assert fields.running_time == "2026-12-07T22:00:01.250000Z" and fields.container_id == "a" * 64


def test_a_restarted_agent_removes_what_podman_made_and_never_started(tmp_path: Path) -> None:
    made = _Podman(Container("a" * 64, "web", "created"))
    with pytest.raises(Failure) as undone:
        _after_restart(tmp_path, made)
    assert undone.value.reason == Reason.RESTORE_UNDONE and "removed" in undone.value.message
    assert made.removed == ["a" * 64]
    with pytest.raises(Failure) as nothing:
        _after_restart(tmp_path, _Podman(None))
    assert nothing.value.reason == Reason.RESTORE_UNDONE and "made no container" in nothing.value.message
    # The name's holder from before the restore is not this restore's: left alone.
    before = _Podman(Container("old", "web", "running"))
    with pytest.raises(Failure) as other:
        _after_restart(tmp_path, before)
    assert other.value.reason == Reason.RESTORE_UNDONE and before.removed == []


def test_without_the_record_of_what_podman_was_asked_the_agent_cannot_tell(tmp_path: Path) -> None:
    with pytest.raises(Failure) as unknown:
        _after_restart(tmp_path, _Podman(Container("a" * 64, "web", "running")), record=False)
    assert unknown.value.reason == Reason.RESTORE_INTERRUPTED
