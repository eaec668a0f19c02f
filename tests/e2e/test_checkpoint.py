"""ContainerCheckpoint end to end: real API server, controller, agents, podman + CRIU nodes, S3."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
import urllib.request
from typing import Any

import pytest

from helpers import (
    checkpoint,
    condition,
    counter,
    create,
    members,
    node_name,
    ready,
    reason_of,
    remove,
    restore,
    state,
    unique,
    wait_storage,
)
from localenv.env import NAMESPACE, LocalEnv
from localenv.images import COUNTER, MEMORY, NAMESPACE_LABEL, TCP, owned_by, read_count, wait_for_log

NODES = ["node-a", "node-b"]  # node-a's agent uses the REST API, node-b's the CLI


def stored(env: LocalEnv, key: str) -> bytes:
    return bytes(env.s3.client().get_object(Bucket=env.s3.bucket, Key=key)["Body"].read())


def no_stray_uploads(env: LocalEnv) -> None:
    uploads = env.s3.client().list_multipart_uploads(Bucket=env.s3.bucket).get("Uploads", [])
    assert uploads == [], f"stray multipart uploads: {uploads}"


@pytest.mark.parametrize("node", NODES)
def test_checkpoint_exports_to_s3_and_restores_with_plain_podman(local_env: LocalEnv, node: str) -> None:
    env = local_env
    container = counter(env, node)
    name = checkpoint(env, node, containers=[container], export={})
    obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"])
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["storageRef"] == {"name": "local"}
    assert status["nodeName"] == node_name(env, node)
    [archive] = status["archives"]
    assert archive["container"] == container
    assert archive["compression"] == "zstd"
    assert archive["key"] == f"default/{name}-{obj['metadata']['uid'][:8]}/{container}.tar.zst"
    assert archive["uri"] == f"s3://{env.s3.bucket}/{archive['key']}"
    data = stored(env, archive["key"])
    assert data[:4] == b"\x28\xb5\x2f\xfd"
    assert len(data) == archive["size"]
    assert hashlib.sha256(data).hexdigest() == archive["sha256"]
    assert "config.dump" in members(data)
    manifest = json.loads(stored(env, archive["key"].rsplit("/", 1)[0] + "/manifest.json"))
    assert manifest["archives"][0]["sha256"] == archive["sha256"]
    assert manifest["nodeName"] == node_name(env, node)
    assert manifest["host"]["podman"].startswith("5.")
    done = ready(obj)
    assert (done["status"], done["reason"]) == ("True", "Succeeded")
    assert status["progress"]["bytesDone"] == archive["size"]
    assert state(env, node, container) == "exited"
    no_stray_uploads(env)

    # The archive alone restores on the other node with plain podman, and the count goes on.
    counted = int(env.nodes[node].podman("logs", container).stdout.decode().split()[-1])
    other = env.nodes[NODES[1 - NODES.index(node)]]
    path = other.spool_dir / f"{name}.tar.zst"
    path.write_bytes(data)
    other.podman("container", "restore", f"--import={path}")
    time.sleep(1)
    assert read_count(other, container) > counted
    other.podman("rm", "-f", container)
    env.kubectl("delete", "ccp", name, "--wait=true", "--timeout=60s")
    listed = env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=archive["key"].rsplit("/", 1)[0])
    assert listed.get("KeyCount", 0) == 0, "the finalizer deletes the archives with the resource"


@pytest.mark.parametrize("node", NODES)
def test_leave_running_keeps_the_container_running(local_env: LocalEnv, node: str) -> None:
    container = counter(local_env, node)
    name = checkpoint(local_env, node, containers=[container], leaveRunning=True, export={}, compress="none")
    status = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    assert state(local_env, node, container) == "running"
    data = stored(local_env, status["archives"][0]["key"])
    assert status["archives"][0]["key"].endswith(".tar")
    assert "rootfs-diff.tar" in members(data)


def test_gzip_and_ignore_rootfs(local_env: LocalEnv) -> None:
    container = counter(local_env, "node-a")
    name = checkpoint(local_env, "node-a", containers=[container], export={}, compress="gzip", ignoreRootfs=True)
    status = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    data = stored(local_env, status["archives"][0]["key"])
    assert data[:2] == b"\x1f\x8b"
    assert "rootfs-diff.tar" not in members(data)
    assert "checkpoint/pages-1.img" in members(data) or any(m.startswith("checkpoint/") for m in members(data))
    # The parallel gzip writes several gzip members; podman's import reads them as one stream.
    other = local_env.nodes["node-b"]
    path = other.spool_dir / f"{name}.tar.gz"
    path.write_bytes(data)
    other.podman("container", "restore", f"--import={path}")
    assert state(local_env, "node-b", container) == "running"
    other.podman("rm", "-f", container)


@pytest.mark.parametrize("node", NODES)
def test_several_containers_one_archive_each(local_env: LocalEnv, node: str) -> None:
    first, second = counter(local_env, node), counter(local_env, node)
    name = checkpoint(local_env, node, containers=[first, second], export={})
    status = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    assert sorted(a["container"] for a in status["archives"]) == sorted([first, second])
    assert len({a["key"] for a in status["archives"]}) == 2


def test_latest_and_all_expand_to_actual_containers(local_env: LocalEnv) -> None:
    node = "node-b"
    env = local_env
    counter(env, node)
    latest = counter(env, node)
    name = checkpoint(env, node, latest=True, leaveRunning=True, export={})
    status = env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    assert [a["container"] for a in status["archives"]] == [latest]

    # `all` takes the running containers of the checkpoint's namespace: other tenants' run on the node too.
    mine = f"label={NAMESPACE_LABEL}=default"
    running = set(env.nodes[node].podman("ps", "--filter", mine, "--format", "{{.Names}}").stdout.decode().split())
    name = checkpoint(env, node, all=True, leaveRunning=True, export={}, compress="none")
    status = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=300)["status"]
    assert status["phase"] == "Succeeded", status
    assert {a["container"] for a in status["archives"]} == running


def test_checkpoint_without_export_stays_on_the_node(local_env: LocalEnv) -> None:
    container = counter(local_env, "node-a")
    name = checkpoint(local_env, "node-a", containers=[container])
    status = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    assert "uri" not in status["archives"][0]
    assert state(local_env, "node-a", container) == "exited"
    local_env.nodes["node-a"].podman("container", "restore", container)
    assert state(local_env, "node-a", container) == "running"


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"nodeName": "no-such-node", "containers": ["x"]}, "NodeNotFound"),
        (
            {"nodeName": "node-a", "containers": ["x"], "export": {"storageRef": {"name": "missing"}}},
            "StorageNotFound",
        ),
        ({"nodeName": "node-a", "containers": ["no-such-container"], "export": {}}, "ContainerNotFound"),
        ({"nodeName": "node-b", "containers": ["no-such-container"]}, "ContainerNotFound"),
    ],
)
def test_failures_end_in_failed_with_a_reason(local_env: LocalEnv, spec: dict[str, Any], reason: str) -> None:
    spec = {**spec, "nodeName": node_name(local_env, spec["nodeName"])}
    name = create(local_env, "ContainerCheckpoint", spec, prefix="bad")
    obj = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=60)
    assert obj["status"]["phase"] == "Failed"
    assert reason_of(obj) == reason


@pytest.mark.parametrize("node", NODES)
def test_stopped_container_is_not_running(local_env: LocalEnv, node: str) -> None:
    container = counter(local_env, node)
    local_env.nodes[node].podman("stop", "-t", "0", container)
    name = checkpoint(local_env, node, containers=[container], export={})
    obj = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"])
    assert reason_of(obj) == "ContainerNotRunning"


def recorded_facts(env: LocalEnv, node: str, timeout: float = 30) -> dict[str, str]:
    """What the node's agent recorded on its Lease at start: versions and CRIU's feature checks."""
    lease = f"checkpointer-agent-{node_name(env, node)}"
    deadline = time.monotonic() + timeout
    while True:
        out = env.kubectl("get", "lease", "-n", NAMESPACE, lease, "-o", "jsonpath={.metadata.annotations}")
        annotations: dict[str, str] = json.loads(out.stdout or "{}")
        facts = {
            k.removeprefix("checkpointer.dev/"): v for k, v in annotations.items() if k.startswith("checkpointer.dev/")
        }
        if "criu-version" in facts:
            return facts
        assert time.monotonic() < deadline, f"the agent of {node} recorded nothing on Lease {lease}: {annotations}"
        time.sleep(0.5)


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def checkpoint_events(env: LocalEnv, node: str, container: str) -> int:
    out = env.nodes[node].podman(
        "events", "--stream=false", "--filter", f"container={container}", "--filter", "event=checkpoint"
    )
    return len(out.stdout.decode().splitlines())


@pytest.mark.parametrize("node", NODES)
def test_agent_records_its_node_versions_and_criu_features_on_its_lease(local_env: LocalEnv, node: str) -> None:
    facts = recorded_facts(local_env, node)
    sandbox = local_env.nodes[node]
    assert facts["criu-version"] == run_on(local_env, node, "criu", "--version").removeprefix("Version:").strip()
    assert version(facts["criu-version"]) >= (4, 2), facts
    assert (
        facts["podman-version"] == sandbox.podman("version", "--format", "{{.Client.Version}}").stdout.decode().strip()
    )
    assert facts["runc-version"] and facts["runc-version"] in run_on(local_env, node, "runc", "--version")
    assert facts["kernel-version"] == os.uname().release
    supported = set(facts["criu-features"].split(","))
    missing = set(filter(None, facts["criu-features-missing"].split(",")))
    assert not supported & missing
    # CRIU's own verdict, asked again here: the recorded one is the node's.
    for feature in ("mem_dirty_track", "timens", "tcp_half_closed"):
        asked = sandbox_criu_check(local_env, node, feature)
        assert (feature in supported, feature in missing) == (asked, not asked), (feature, facts)


def run_on(env: LocalEnv, node: str, *argv: str) -> str:
    out = run_argv([*env.nodes[node].nsenter_argv(), *argv])
    return out.stdout.decode().strip()


def sandbox_criu_check(env: LocalEnv, node: str, feature: str) -> bool:
    return run_argv([*env.nodes[node].nsenter_argv(), "criu", "check", "--feature", feature]).returncode == 0


def run_argv(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("node", NODES)
def test_pre_checkpoint_is_refused_up_front_with_criu_feature_missing_and_leaves_it_running(
    local_env: LocalEnv, node: str
) -> None:
    """This kernel has no memory dirty tracking, which CRIU's own check on the node reports."""
    facts = recorded_facts(local_env, node)
    assert "mem_dirty_track" in facts["criu-features-missing"].split(","), facts
    container = counter(local_env, node)
    name = checkpoint(local_env, node, containers=[container], preCheckpoint=True, export={}, keep=True)
    obj = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"])
    assert obj["status"]["phase"] == "Failed"
    assert reason_of(obj) == "CRIUFeatureMissing", obj["status"]
    # Refused by the controller: never handed to the agent, and CRIU never touched the container.
    scheduled = condition(obj, "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("False", "CRIUFeatureMissing"), scheduled
    assert "checkpointer.dev/node" not in (obj["metadata"].get("labels") or {})
    message = scheduled["message"]
    assert "mem_dirty_track" in message
    assert f"CRIU {facts['criu-version']}" in message and f"Linux {os.uname().release}" in message, message
    assert f"podman {facts['podman-version']}" in message and f"runc {facts['runc-version']}" in message, message
    assert checkpoint_events(local_env, node, container) == 0
    assert state(local_env, node, container) == "running"
    no_stray_uploads(local_env)


def test_node_without_agent_is_agent_unavailable(local_env: LocalEnv) -> None:
    local_env.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-without-agent"}})
    name = checkpoint(local_env, "node-without-agent", containers=["x"])
    obj = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=60)
    assert reason_of(obj) == "AgentUnavailable"


def test_unreachable_storage_is_storage_unavailable(local_env: LocalEnv) -> None:
    local_env.apply(
        {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": "CheckpointStorage",
            "metadata": {"name": "unreachable"},
            "spec": {
                "bucket": "nowhere",
                "endpoint": "http://127.0.0.1:9",
                "forcePathStyle": True,
                "credentialsSecretRef": {"namespace": NAMESPACE, "name": "local-s3"},
            },
        }
    )
    wait_storage(local_env, "unreachable", "Unavailable")
    name = checkpoint(local_env, "node-a", containers=["x"], export={"storageRef": {"name": "unreachable"}})
    obj = local_env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=60)
    assert reason_of(obj) == "StorageUnavailable"


@pytest.mark.parametrize("node", NODES)
def test_agent_killed_mid_upload_resumes_from_the_spool(local_env: LocalEnv, node: str) -> None:
    env = local_env
    # A slow uplink keeps the upload running long enough to kill the agent in the middle of it.
    env.stop_agent(node)
    env.start_agent(node, {"CHECKPOINTER_UPLOAD_BYTES_PER_SECOND": str(4 * 1024 * 1024)})
    container = unique("memory")
    env.nodes[node].podman("run", "-d", *owned_by("default"), "--name", container, MEMORY, "96")
    wait_for_log(env.nodes[node], container, "ready")
    name = checkpoint(env, node, containers=[container], export={}, compress="none")
    try:
        env.wait_phase("ccp", name, ["Uploading", "Succeeded", "Failed"], timeout=120)
        env.stop_agent(node, kill=True)
        uploads = env.s3.client().list_multipart_uploads(Bucket=env.s3.bucket).get("Uploads", [])
        assert uploads, "the agent was killed while its multipart upload was open"
    finally:
        env.start_agent(node, {})
    status = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=180)["status"]
    assert status["phase"] == "Succeeded", status
    [archive] = status["archives"]
    data = stored(env, archive["key"])
    assert hashlib.sha256(data).hexdigest() == archive["sha256"]
    no_stray_uploads(env)
    # Checkpointed once: the container stopped and was not started and checkpointed again.
    assert state(env, node, container) == "exited"
    starts = env.nodes[node].podman(
        "events",
        "--stream=false",
        "--filter",
        f"container={container}",
        "--filter",
        "event=checkpoint",
        "--format",
        "{{.Status}}",
    )
    assert starts.stdout.decode().split().count("checkpoint") == 1


# --- tcpEstablished: hack/images/tcp.c holds an established TCP connection to itself on 127.0.0.1 and
# echoes a counter over it every 0.2 s; it exits on any error on that connection and never reconnects,
# so a count that goes on after a checkpoint or a restore proves the connection survived.


def run_tcp(env: LocalEnv, node: str, name: str | None = None, netns: str | None = None) -> str:
    name = name or unique("tcp")
    network = ["--network", f"ns:/run/netns/{netns}"] if netns else []
    env.nodes[node].podman("run", "-d", *owned_by("default"), "--name", name, *network, TCP)
    wait_for_log(env.nodes[node], name, "ready")
    read_count(env.nodes[node], name)
    return name


def wait_count(env: LocalEnv, node: str, container: str, at_least: int, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while (count := read_count(env.nodes[node], container)) < at_least:
        assert time.monotonic() < deadline, f"{container} on {node} stopped counting at {count}"
        time.sleep(0.2)
    return count


def counts_on(env: LocalEnv, node: str, container: str) -> None:
    """The count goes on, so the connection is alive: the workload exits on any error on it."""
    wait_count(env, node, container, read_count(env.nodes[node], container) + 3)
    assert state(env, node, container) == "running"


def established(env: LocalEnv, node: str, container: str) -> set[tuple[str, str]]:
    """The ESTABLISHED TCP connections in the container's network namespace, as (local, remote) in /proc's hex."""
    out = env.nodes[node].podman("exec", container, "cat", "/proc/net/tcp").stdout.decode()
    rows = [line.split() for line in out.splitlines()[1:]]
    return {(row[1], row[2]) for row in rows if len(row) > 3 and row[3] == "01"}


def add_netns(env: LocalEnv, node: str, netns: str) -> None:
    """A network namespace with loopback up, kept by the node at /run/netns/<netns> (its own /run)."""
    result = run_argv(
        [*env.nodes[node].nsenter_argv(), "sh", "-c", f"ip netns add {netns} && ip -n {netns} link set lo up"]
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def delete_netns(env: LocalEnv, node: str, netns: str) -> None:
    run_argv([*env.nodes[node].nsenter_argv(), "ip", "netns", "delete", netns])


def criu_log(env: LocalEnv, node: str, container: str) -> str:
    """CRIU's dump.log of the container's last checkpoint, which stays on the node after a failure.

    Read with a throwaway container, so that only podman is needed on the node.
    """
    podman = env.nodes[node].podman
    static_dir = podman("inspect", "--format", "{{.StaticDir}}", container).stdout.decode().strip()
    out = podman("run", "--rm", "-v", f"{static_dir}/dump.log:/dump.log:ro", COUNTER, "cat", "/dump.log")
    return out.stdout.decode(errors="replace")


@pytest.mark.parametrize("node", NODES)
def test_established_tcp_connection_without_tcp_established_fails_and_keeps_running(
    local_env: LocalEnv, node: str
) -> None:
    env = local_env
    container = run_tcp(env, node)
    try:
        name = checkpoint(env, node, containers=[container], export={})
        obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"])
        assert obj["status"]["phase"] == "Failed", obj["status"]
        assert reason_of(obj) == "CheckpointFailed", obj["status"]
        assert "Connected TCP socket, consider using --tcp-established option" in criu_log(env, node, container)
        # CRIU let go of the process and unlocked the network: the same connection still carries the count.
        counts_on(env, node, container)
        no_stray_uploads(env)
    finally:
        remove(env, node, container)


@pytest.mark.parametrize("node", NODES)
def test_tcp_established_checkpoint_restores_on_the_other_node_and_the_connection_goes_on(
    local_env: LocalEnv, node: str
) -> None:
    """Checkpoint with tcpEstablished on one node, restore with tcpEstablished on the other.

    CRIU 4.2 is needed on this kernel (Linux >= 6.16); the nodes have it (hack/node/rootfs.sh). The
    count crosses the connection before the checkpoint and after the restore, and the restored
    connection has the same two ends, ephemeral port included: it is the one that was checkpointed.

    The workload joins a network namespace that each node keeps at the same path with loopback up,
    as a Kubernetes container joins the one its runtime made for the pod's sandbox; the restore on
    the other node joins that node's. Not the container's own (netns "none"): runc creates that with
    loopback up, but a restore recreates it with loopback down, and CRIU's TCP repair then fails with
    `Can't connect inet socket back: Network is unreachable`. Not a podman pod either: its containers
    join its infra container's namespaces, which only a restore in an admin namespace may ask for
    (docs/security.md).
    """
    env = local_env
    other = NODES[1 - NODES.index(node)]
    netns, container = unique("tcpnet"), unique("tcp")
    try:
        add_netns(env, node, netns)
        add_netns(env, other, netns)
        run_tcp(env, node, container, netns=netns)
        # Far enough that a process started afresh could not show this count right after the restore.
        wait_count(env, node, container, 10)
        connection = established(env, node, container)
        assert len(connection) == 2, connection  # the client's end and the server's end of one connection
        assert version(recorded_facts(env, node)["criu-version"]) >= (4, 2)
        name = checkpoint(env, node, containers=[container], tcpEstablished=True, export={})
        status = env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
        assert status["phase"] == "Succeeded", status
        assert state(env, node, container) == "exited"
        counted = int(env.nodes[node].podman("logs", container).stdout.decode().split()[-1])

        restored = restore(env, other, {"checkpointRef": {"name": name}}, tcpEstablished=True)["status"]
        assert restored["phase"] == "Succeeded", restored
        assert restored["containerName"] == container
        assert read_count(env.nodes[other], container) >= counted, "the count went on from memory"
        counts_on(env, other, container)
        assert established(env, other, container) == connection
    finally:
        remove(env, node, container)
        remove(env, other, container)
        delete_netns(env, node, netns)
        delete_netns(env, other, netns)


def test_tcp_established_is_refused_up_front_on_a_node_whose_criu_cannot_dump_inet_sockets(
    local_env: LocalEnv,
) -> None:
    """CRIU 4.1 on Linux >= 6.16, as trixie's CRIU on this kernel: the controller refuses, CRIU is never run.

    The nodes run CRIU 4.2, so the Lease is given what an agent on a CRIU 4.1 node records (the
    controller reads nothing else), and its own record is put back after.
    """
    env, node = local_env, "node-a"
    lease = f"checkpointer-agent-{node_name(env, node)}"
    facts = recorded_facts(env, node)
    container = run_tcp(env, node)
    try:
        env.kubectl("annotate", "lease", "-n", NAMESPACE, lease, "--overwrite", "checkpointer.dev/criu-version=4.1.1")
        name = checkpoint(env, node, containers=[container], tcpEstablished=True, export={})
        obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=60)
        assert obj["status"]["phase"] == "Failed", obj["status"]
        assert reason_of(obj) == "CRIUFeatureMissing", obj["status"]
        scheduled = condition(obj, "Scheduled")
        assert (scheduled["status"], scheduled["reason"]) == ("False", "CRIUFeatureMissing"), scheduled
        message = scheduled["message"]
        assert "tcpEstablished" in message and "cannot dump inet sockets" in message, message
        assert f"CRIU 4.1.1, podman {facts['podman-version']}, runc {facts['runc-version']}" in message, message
        assert f"Linux {os.uname().release}" in message, message
        assert checkpoint_events(env, node, container) == 0
        counts_on(env, node, container)
    finally:
        env.kubectl(
            "annotate",
            "lease",
            "-n",
            NAMESPACE,
            lease,
            "--overwrite",
            f"checkpointer.dev/criu-version={facts['criu-version']}",
        )
        remove(env, node, container)
    # The node's own record is back for the tests after this one.
    assert recorded_facts(env, node)["criu-version"] == facts["criu-version"]


def test_controller_and_agents_answer_their_liveness_probe(local_env: LocalEnv) -> None:
    """The chart's livenessProbe is GET /healthz on each process's health port."""
    for name, port in local_env.health_ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            assert reply.status == 200, name
