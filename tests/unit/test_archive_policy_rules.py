"""The archive policy on what real podman 5.4 wrote: fixtures/podman_archives.json holds the fields
the policy reads from config.dump and spec.dump of containers run with each option, then
checkpointed with `podman container checkpoint --export` (the `-v` host directory renamed /srv/hostdir)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from checkpointer.archive.codec import ContainerConfiguration
from checkpointer.services.archive_policy import DEFAULT_CAPABILITIES, foreign_owner, not_permitted

REAL: dict[str, dict[str, Any]] = json.loads((Path(__file__).parent / "fixtures" / "podman_archives.json").read_text())


def _archive(case: str) -> ContainerConfiguration:
    real = copy.deepcopy(REAL[case])
    return ContainerConfiguration(config=real["config"], spec=real["spec"])


@pytest.mark.parametrize(
    "case",
    [
        pytest.param("plain", id="podman run"),
        pytest.param("vol", id="a named volume"),
    ],
)
def test_an_ordinary_container_asks_for_nothing(case: str) -> None:
    assert not_permitted(_archive(case)) == []


@pytest.mark.parametrize(
    ("case", "asked"),
    [
        pytest.param(
            "priv",
            [
                "privileged mode",
                "all host devices",
                "capabilities CAP_AUDIT_CONTROL",
                "CAP_SYS_ADMIN",
                "a writable /sys",
                "unmasked /proc and /sys paths",
                "no seccomp filter",
                "host devices /dev/btrfs-control",
                "access to host devices",
            ],
            id="--privileged",
        ),
        pytest.param("bind", ["host path /srv/hostdir mounted at /mnt"], id="-v /host/dir:/mnt"),
        pytest.param("caps", ["capabilities CAP_NET_ADMIN, CAP_SYS_PTRACE"], id="--cap-add"),
        pytest.param("hostpid", ["the host's PID namespace"], id="--pid=host"),
        pytest.param("hostnet", ["the host's network namespace"], id="--network=host"),
        pytest.param(
            "hostipc",
            ["the host's IPC namespace", "host path /dev/shm mounted at /dev/shm", "host path /dev/shm as its ShmDir"],
            id="--ipc=host",
        ),
    ],
)
def test_a_container_with_host_privilege_is_named(case: str, asked: list[str]) -> None:
    found = not_permitted(_archive(case))
    text = "; ".join(found)
    for item in asked:
        assert item in text
    assert len(found) == len(set(found))


def test_podman_default_capabilities_are_what_a_plain_container_got() -> None:
    assert set(REAL["plain"]["spec"]["process"]["capabilities"]["bounding"]) == DEFAULT_CAPABILITIES


def _edited(edit: Any) -> list[str]:
    archive = _archive("plain")
    edit(archive.config, archive.spec)
    return not_permitted(archive)


def _mount(spec: dict[str, Any], destination: str) -> dict[str, Any]:
    return next(m for m in spec["mounts"] if m["destination"] == destination)


@pytest.mark.parametrize(
    ("edit", "asked"),
    [
        # podman's own mounts must come from this container's own folder in podman's storage
        pytest.param(
            lambda c, s: _mount(s, "/etc/hosts").update(source="/"), "host path / mounted at /etc/hosts", id="hosts"
        ),
        pytest.param(
            lambda c, s: _mount(s, "/dev/shm").update(
                source=_mount(s, "/dev/shm")["source"].replace(c["id"], "a" * 64)
            ),
            "mounted at /dev/shm",
            id="another container's shm",
        ),
        pytest.param(
            lambda c, s: _mount(s, "/dev/shm").update(source=_mount(s, "/dev/shm")["source"] + "/../../../../../.."),
            "mounted at /dev/shm",
            id="dotdot",
        ),
        pytest.param(
            lambda c, s: s["mounts"].append(
                {"destination": "/data", "type": "bind", "source": "/var/lib/containers/storage/volumes/v/_data"}
            ),
            "mounted at /data",
            id="a volume config.dump does not name",
        ),
        pytest.param(
            lambda c, s: s["mounts"].append({"destination": "/mnt", "type": "ext4", "source": "/dev/vda"}),
            "host path /dev/vda mounted at /mnt",
            id="a block device",
        ),
        pytest.param(lambda c, s: c.update(privileged=True), "privileged mode", id="privileged"),
        pytest.param(
            lambda c, s: s["process"]["capabilities"].update(ambient=["sys_admin"]),
            "capabilities CAP_SYS_ADMIN",
            id="ambient capability",
        ),
        pytest.param(
            lambda c, s: s["linux"]["namespaces"].__setitem__(0, {"type": "pid", "path": "/proc/1/ns/pid"}),
            "the PID namespace at /proc/1/ns/pid",
            id="pid namespace path",
        ),
        pytest.param(
            lambda c, s: s["linux"]["namespaces"].remove({"type": "mount"}), "the host's mount namespace", id="mount ns"
        ),
        pytest.param(
            lambda c, s: c.update(logPath="/etc/cron.d/x"), "host path /etc/cron.d/x as its logPath", id="log"
        ),
        pytest.param(lambda c, s: c.update(conmonPidFile="/etc/passwd"), "as its conmonPidFile", id="pidfile"),
        pytest.param(lambda c, s: c.update(exitCommand=["/bin/sh", "-c", "x"]), "exitCommand", id="exit command"),
        pytest.param(lambda c, s: c.update(runtime="/tmp/x"), "the runtime binary /tmp/x", id="runtime path"),
        pytest.param(lambda c, s: c.update(rootfs="/"), "the host path / as its root filesystem", id="rootfs"),
        pytest.param(lambda c, s: c.update(netNsCtr="a" * 64), "the net namespace of container", id="ns container"),
        pytest.param(
            lambda c, s: s.update(hooks={"prestart": [{"path": "/bin/sh"}]}), "OCI hooks", id="hooks run on the host"
        ),
        pytest.param(lambda c, s: s["linux"].pop("seccomp"), "no seccomp filter", id="no seccomp"),
        pytest.param(lambda c, s: s["linux"].pop("maskedPaths"), "unmasked /proc", id="unmasked"),
        pytest.param(
            lambda c, s: c.update(spec={"process": {"capabilities": {"bounding": ["CAP_SYS_MODULE"]}}}),
            "CAP_SYS_MODULE",
            id="the spec inside config.dump",
        ),
    ],
)
def test_a_crafted_archive_is_named(edit: Any, asked: str) -> None:
    assert asked in "; ".join(_edited(edit))


def test_a_podman_netns_path_is_an_own_namespace() -> None:
    def edit(c: dict[str, Any], s: dict[str, Any]) -> None:
        s["linux"]["namespaces"][1] = {"type": "network", "path": "/run/netns/netns-1234"}

    assert _edited(edit) == []


def test_a_container_labelled_for_another_namespace_is_named() -> None:
    plain = _archive("plain")
    labelled = ContainerConfiguration(
        config={**plain.config, "labels": {"checkpointer.dev/namespace": "team-b"}}, spec=plain.spec
    )
    assert foreign_owner(labelled, "team-b") == []
    assert foreign_owner(labelled, "team-a") == [
        "a container of namespace team-b (label checkpointer.dev/namespace=team-b)"
    ]
    assert foreign_owner(plain, "team-a") == []
