"""A Pod's container checkpointed through its node's container runtime into the same signed archives.

One environment for the whole file: the nodes with a kubelet (kubelet.running), the operator
installed by Helm alone, its agents reaching their node's containerd over its CRI socket. A counter
Pod runs on node-a from the registry's image; a ContainerCheckpoint names it by `podRef` and no node,
and its archive lands in the bucket as any other: zstd, encrypted when the storage says so, listed
in a manifest the controller signs, which also keeps the Pod's spec and the image's repository
digest. The Pod keeps running and counting. What the runtime cannot honour is refused at admission;
a checkpoint reaches only Pods of its own namespace, and only on their own node. Nothing the runtime
wrote stays on the node.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyrage import decrypt, x25519
from test_plugin import ok, plugin

from helpers import (
    Agent,
    apply,
    assert_stored_as_reported,
    describe_pod,
    describe_release,
    extra_storage,
    get_pod,
    install_release,
    manifest_key,
    members,
    pod_count,
    public_keys,
    reason_and_message,
    refused,
    release_values,
    run_pod,
    unique,
    until,
    verify_manifest,
)
from invariants import check_invariants, runtime_files_left
from localenv import kubelet
from localenv.env import ENCRYPTION_SECRET, NAMESPACE
from localenv.faults import s3_down
from localenv.images import COUNTER, MEMORY
from localenv.kubelet import KubeletCluster
from localenv.procs import require, run

pytestmark = pytest.mark.e2e
NODE, OTHER = "node-a", "node-b"
NODE_LABEL = "checkpointer.dev/node"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
AGE_MAGIC = b"age-encryption.org/v1\n"
UPLOAD_BYTES_PER_SECOND = 32 * 2**20
# Incompressible memory: the runtime writes a tar about this large, which uploads for about 8 s.
FAULT_MIB = 256


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeletCluster]:
    """The kubelet nodes with the operator installed by Helm, and an encrypting storage beside the chart's."""
    missing = kubelet.missing()
    require(not missing, missing)
    # Down, it fails if any process, cgroup or mount of its nodes is left, or the machine's network changed.
    with kubelet.running(Path(tmp_path_factory.mktemp("pod-checkpoint"))) as env:
        # Uploads at a bounded rate, so that a fault test finds a checkpoint still uploading; a counter's
        # archive of a few MiB takes a fraction of a second at it.
        install_release(env, release_values(env, upload__bytesPerSecond=UPLOAD_BYTES_PER_SECOND))
        identity = x25519.Identity.generate()
        env.apply(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": ENCRYPTION_SECRET, "namespace": NAMESPACE},
                "stringData": {"recipients": f"{identity.to_public()}\n", "identity": f"{identity}\n"},
            }
        )
        env.identity = identity  # type: ignore[attr-defined]
        encryption = {"secretRef": {"namespace": NAMESPACE, "name": ENCRYPTION_SECRET}}
        with extra_storage(env.env, encryption=encryption) as storage:
            env.encrypted_storage = storage  # type: ignore[attr-defined]
            yield env


@pytest.fixture(scope="module")
def counter(pods: KubeletCluster) -> str:
    """A counter Pod on node-a, shared by the file's tests (none of them stops it)."""
    name = unique("counter")
    run_pod(pods, NODE, name)
    return name


def checkpoint_pod(env: KubeletCluster, pod: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    """A ContainerCheckpoint of `pod` by podRef, exported, once it is Succeeded or Failed."""
    name = unique("ccp")
    apply(env, "ContainerCheckpoint", name, {"podRef": {"name": pod}, "export": {}, **spec}, namespace)
    return env.wait_phase("ccp", name, ["Succeeded", "Failed"], namespace=namespace, timeout=180)


def s3_get(env: KubeletCluster, key: str) -> bytes:
    body: bytes = env.s3.client().get_object(Bucket=env.s3.bucket, Key=key)["Body"].read()
    return body


def assert_nothing_left(env: KubeletCluster) -> None:
    """Nothing the runtime wrote for a Pod's checkpoint stays on a node (a removal may trail the last status write)."""
    until(
        "the runtime's files gone",
        lambda: not runtime_files_left(env),
        timeout=30,
        last=lambda: runtime_files_left(env),
    )


def test_a_counter_pod_is_checkpointed_into_s3_signed_and_keeps_counting(pods: KubeletCluster, counter: str) -> None:
    env = pods
    before = pod_count(env, counter)
    obj = checkpoint_pod(env, counter)
    status = obj["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{describe_release(env)}"
    # No node named: the controller took the Pod's.
    assert status["nodeName"] == NODE and "nodeName" not in obj["spec"]

    [archive] = status["archives"]
    assert archive["container"] == "counter" and archive["compression"] == "zstd", archive
    assert archive["key"].endswith("/counter.tar.zst"), archive
    pod = get_pod(env, counter)
    [container] = pod["status"]["containerStatuses"]
    assert archive["containerID"] == container["containerID"].split("://", 1)[1]
    assert_stored_as_reported(env, archive)
    stored = s3_get(env, archive["key"])
    assert stored.startswith(ZSTD_MAGIC)
    # What containerd's CheckpointContainer writes: CRIU's images, the container's configuration, its
    # root file system's changes.
    found = {name.removeprefix("./"): data for name, data in members(stored).items()}
    assert {"config.dump", "spec.dump", "rootfs-diff.tar"} <= set(found), sorted(found)
    assert any(name.startswith("checkpoint/") for name in found), sorted(found)

    # The manifest beside it is signed by the controller and keeps what a restore will need.
    manifest = json.loads(s3_get(env, manifest_key(archive["key"])))
    verify_manifest(manifest, public_keys(env))
    assert manifest["nodeName"] == NODE and manifest["flags"]["podRef"] == {"name": counter}
    assert manifest["pod"]["name"] == counter and manifest["pod"]["uid"] == pod["metadata"]["uid"]
    assert manifest["pod"]["spec"]["containers"][0]["image"] == env.registry.reference(COUNTER)
    [entry] = manifest["archives"]
    digest = env.registry.manifest_digest(env.registry.reference(COUNTER))
    assert entry["imageID"] == f"{env.registry.host}/checkpointer/counter@{digest}" == container["imageID"]
    assert entry["configDumpSHA256"] == hashlib.sha256(found["config.dump"]).hexdigest()
    assert entry["specDumpSHA256"] == hashlib.sha256(found["spec.dump"]).hexdigest()
    assert manifest["host"]["criRuntime"] == "containerd" and "2.1" in manifest["host"]["criVersion"], manifest["host"]
    assert manifest["host"]["criu"], manifest["host"]

    # The Pod kept running: never restarted, and its count goes on from where it was.
    assert get_pod(env, counter)["status"]["containerStatuses"][0]["restartCount"] == 0
    until(f"{counter} counting on", lambda: pod_count(env, counter) > before + 1, timeout=15)
    assert_nothing_left(env)

    # Deleted with its object: the archive and its manifest leave the bucket.
    env.kubectl("delete", "ccp", obj["metadata"]["name"], "--timeout=60s")
    listed = env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=archive["key"].rsplit("/", 1)[0])
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")


def test_a_pods_checkpoint_is_encrypted_when_its_storage_says_so(pods: KubeletCluster, counter: str) -> None:
    env = pods
    storage = env.encrypted_storage  # type: ignore[attr-defined]
    obj = checkpoint_pod(env, counter, export={"storageRef": {"name": storage}}, compress="gzip")
    status = obj["status"]
    assert status["phase"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{describe_release(env)}"
    [archive] = status["archives"]
    assert archive["key"].startswith("default/") and archive["key"].endswith("/counter.tar.gz.age"), archive
    assert_stored_as_reported(env, archive)
    stored = s3_get(env, archive["key"])
    assert stored.startswith(AGE_MAGIC) and b"config.dump" not in stored
    identity = env.identity  # type: ignore[attr-defined]
    found = members(decrypt(stored, [identity]))
    assert "config.dump" in found, sorted(found)
    manifest = json.loads(s3_get(env, manifest_key(archive["key"])))
    verify_manifest(manifest, public_keys(env))
    assert manifest["archives"][0]["encryption"] == {"format": "age", "recipients": [str(identity.to_public())]}
    assert_nothing_left(env)


def refusal(env: KubeletCluster, spec: dict[str, Any]) -> str:
    """The API server's answer to a ContainerCheckpoint with `spec` (it must refuse it)."""
    obj = {
        "apiVersion": "checkpointer.dev/v1alpha1",
        "kind": "ContainerCheckpoint",
        "metadata": {"name": unique("refused"), "namespace": "default"},
        "spec": spec,
    }
    out = env.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode != 0, f"admitted: {spec}"
    return str(out.stderr)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ({"all": True}, "set exactly one of containers, all: true, latest: true or podRef"),
        ({"containers": ["counter"]}, "set exactly one of containers, all: true, latest: true or podRef"),
        ({"preCheckpoint": True}, "preCheckpoint, withPrevious and previousCheckpointRef are podman's"),
        ({"tcpEstablished": True}, "tcpEstablished and keep are podman's and cannot be used with podRef"),
        ({"keep": True}, "tcpEstablished and keep are podman's and cannot be used with podRef"),
        ({"ignoreRootfs": True}, "ignoreRootfs and ignoreVolumes are podman's and cannot be used with podRef"),
        ({"leaveRunning": False}, "a Pod's container always keeps running"),
        ({"export": None}, "a Pod's checkpoint is always exported"),
    ],
)
def test_podmans_flags_with_pod_ref_are_refused_at_admission(
    pods: KubeletCluster, flags: dict[str, Any], words: str
) -> None:
    spec = {"podRef": {"name": "counter"}, "export": {}, **flags}
    message = refusal(pods, {k: v for k, v in spec.items() if v is not None})
    assert words in message, message


def test_a_checkpoint_reaches_only_its_namespaces_pods_on_their_own_node(pods: KubeletCluster, counter: str) -> None:
    env = pods
    # Another namespace names the counter of default: there is no such Pod in its own.
    tenant = unique("tenant")
    env.kubectl("create", "namespace", tenant)
    try:
        obj = checkpoint_pod(env, counter, namespace=tenant)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "PodNotFound"), obj["status"]
        assert f"namespace {tenant}" in message, message
    finally:
        env.kubectl("delete", "namespace", tenant, "--wait=false")
    # Naming another node than the Pod's is no way to its runtime: nothing is checkpointed there.
    obj = checkpoint_pod(env, counter, nodeName=OTHER)
    reason, message = reason_and_message(obj)
    assert (obj["status"]["phase"], reason) == ("Failed", "PodOnAnotherNode"), obj["status"]
    assert "archives" not in obj["status"] and obj["status"].get("nodeName") in (None, ""), obj["status"]
    # A container the Pod does not have.
    obj = checkpoint_pod(env, counter, podRef={"name": counter, "containers": ["web"]})
    assert reason_and_message(obj)[0] == "ContainerNotInPod", obj["status"]


def test_the_agent_of_another_node_may_not_write_a_pods_checkpoint(pods: KubeletCluster, counter: str) -> None:
    """The admission policy takes a Pod's checkpoint's node from status.nodeName, which the controller wrote."""
    env = pods
    obj = checkpoint_pod(env, counter)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    name = obj["metadata"]["name"]
    other = Agent(agent_kubeconfig(env, OTHER))
    # Neither a write of its status nor one that moves it onto node-b's own node.
    for status in ({"startTime": "2020-01-01T00:00:00Z"}, {"nodeName": OTHER}):
        message = refused(lambda status=status: other.patch(name, {"status": status}, status=True))
        assert message.startswith("the checkpointer agent of node node-b may write only"), message
    # Relabelled for node-b by someone who may edit it: node-b's agent still may not write it, for its
    # node is the Pod's, node-a, in the status only the controller wrote.
    env.kubectl("label", "ccp", name, f"{NODE_LABEL}={OTHER}", "--overwrite")
    message = refused(lambda: other.patch(name, {"metadata": {"annotations": {"test.checkpointer.dev/by": "b"}}}))
    assert (
        "has no spec.nodeName, and its status.nodeName (the Pod's node, written by the controller) is node-a" in message
        or (
            "labelled checkpointer.dev/node=node-a" in message  # the controller put the label back first
        )
    ), message
    # Its own node's agent may write it, with no spec.nodeName to go by.
    own = Agent(agent_kubeconfig(env, NODE))
    until(f"{name} labelled for {NODE} again", lambda: label_of(env, name) == NODE, timeout=30)
    own.patch(name, {"metadata": {"annotations": {"test.checkpointer.dev/by": "a"}}})
    env.kubectl("delete", "ccp", name, "--timeout=60s")


def label_of(env: KubeletCluster, name: str) -> str:
    return str(env.kubectl("get", "ccp", name, "-o", "jsonpath={.metadata.labels.checkpointer\\.dev/node}").stdout)


def agent_kubeconfig(env: KubeletCluster, node: str) -> Path:
    """A kubeconfig of the agent's ServiceAccount bound to the agent Pod of `node`, as the kubelet projects it."""
    selector = "app.kubernetes.io/component=agent"
    listed = json.loads(env.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout)
    [pod] = [p for p in listed["items"] if p["spec"]["nodeName"] == node]
    account = pod["spec"]["serviceAccountName"]
    return env.env.control_plane.kubeconfig_for_serviceaccount(NAMESPACE, account, "10m", pod=pod["metadata"]["name"])


def test_the_plugin_checkpoints_a_pod_by_name(pods: KubeletCluster, counter: str) -> None:
    """`kubectl checkpointer checkpoint pod/NAME -c CONTAINER --wait`, through kubectl itself."""
    env = pods
    name = unique("plugin")
    out = ok(
        plugin(env.env, "checkpoint", f"pod/{counter}", "-c", "counter", "--name", name, "--wait", via_kubectl=True)
    )
    assert f"ContainerCheckpoint {name}: Succeeded" in out, out
    obj = json.loads(env.kubectl("get", "ccp", name, "-o", "json").stdout)
    assert obj["spec"] == {"podRef": {"name": counter, "containers": ["counter"]}, "export": {}}
    assert obj["status"]["nodeName"] == NODE
    env.kubectl("delete", "ccp", name, "--timeout=60s")


# --- faults ------------------------------------------------------------------------------------


def memory_pod(env: KubeletCluster) -> str:
    """A Pod on node-a holding FAULT_MIB MiB of incompressible memory, once it holds it."""
    name = unique("memory")
    run_pod(env, NODE, name, MEMORY, (str(FAULT_MIB),))
    until(f"{name} ready", lambda: "ready" in env.kubectl("logs", name, check=False).stdout, timeout=60)
    return name


def checkpoint_in_flight(env: KubeletCluster, pod: str, phase: str) -> str:
    """A checkpoint of `pod`, uncompressed, once it is in `phase` (and, Uploading, has bytes in the bucket)."""
    name = unique("ccp")
    apply(env, "ContainerCheckpoint", name, {"podRef": {"name": pod}, "export": {}, "compress": "none"})

    def there() -> bool:
        status = json.loads(env.kubectl("get", "ccp", name, "-o", "json").stdout).get("status") or {}
        done = int((status.get("progress") or {}).get("bytesDone") or 0)
        return status.get("phase") == phase and (phase != "Uploading" or done > 0)

    until(f"{name} {phase}", there, timeout=120, interval=0.1, last=lambda: describe_release(env))
    return name


def kill_agent(env: KubeletCluster, node: str) -> None:
    """SIGKILL to the agent's process on `node`; the kubelet starts its container again in the same Pod."""
    selector = "app.kubernetes.io/component=agent"
    listed = json.loads(env.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout)
    [pod] = [p for p in listed["items"] if p["spec"]["nodeName"] == node]
    [status] = pod["status"]["containerStatuses"]
    container_id = status["containerID"].split("://", 1)[1]
    runtime = env.env.kubelets[node]
    tasks = runtime.ctr("task", "ls").stdout.decode().splitlines()[1:]
    [pid] = [line.split()[1] for line in tasks if line.split()[0] == container_id]
    run([*env.nodes[node].nsenter_argv(), "kill", "-KILL", pid])

    def restarted() -> bool:
        again = json.loads(env.kubectl("get", "pod", pod["metadata"]["name"], "-n", NAMESPACE, "-o", "json").stdout)
        [now] = again["status"]["containerStatuses"]
        return bool(now["restartCount"] > status["restartCount"] and now.get("ready"))

    until(f"the agent on {node} restarted", restarted, timeout=120, last=lambda: describe_release(env))


def assert_runs_on(env: KubeletCluster, pod: str) -> None:
    found = get_pod(env, pod)
    assert found["status"]["phase"] == "Running", describe_pod(env, pod)
    assert found["status"]["containerStatuses"][0]["restartCount"] == 0, describe_pod(env, pod)


def test_an_agent_killed_mid_checkpoint_fails_it_and_the_pod_runs_on(pods: KubeletCluster) -> None:
    env = pods
    pod = memory_pod(env)
    name = checkpoint_in_flight(env, pod, "Checkpointing")
    kill_agent(env, NODE)
    obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=240)
    reason, message = reason_and_message(obj)
    # The restarted agent never checkpoints twice; a Pod's container was never stopped.
    assert (obj["status"]["phase"], reason) == ("Failed", "CheckpointInterrupted"), obj["status"]
    assert "kept running" in message, message
    assert_runs_on(env, pod)
    check_invariants(env)
    assert_nothing_left(env)
    env.kubectl("delete", "ccp", name, "--timeout=60s")
    env.kubectl("delete", "pod", pod, "--timeout=60s")


def test_an_agent_killed_mid_upload_resumes_from_its_spool(pods: KubeletCluster) -> None:
    env = pods
    pod = memory_pod(env)
    name = checkpoint_in_flight(env, pod, "Uploading")
    kill_agent(env, NODE)
    obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=240)
    assert obj["status"]["phase"] == "Succeeded", f"{obj['status']}\n{describe_release(env)}"
    [archive] = obj["status"]["archives"]
    assert archive["size"] > FAULT_MIB * 2**20, archive
    assert_stored_as_reported(env, archive)
    assert_runs_on(env, pod)
    check_invariants(env)
    assert_nothing_left(env)
    env.kubectl("delete", "ccp", name, "--timeout=60s")
    env.kubectl("delete", "pod", pod, "--timeout=60s")


def test_s3_stopped_mid_upload_is_retried_and_succeeds(pods: KubeletCluster) -> None:
    env = pods
    pod = memory_pod(env)
    name = checkpoint_in_flight(env, pod, "Uploading")
    with s3_down(env.env):
        until(
            f"{name} retrying its upload",
            lambda: (
                reason_and_message(env.wait_phase("ccp", name, ["Uploading", "Succeeded", "Failed"]))[0]
                == "UploadRetrying"
            ),
            timeout=60,
        )
    obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=300)
    assert obj["status"]["phase"] == "Succeeded", f"{obj['status']}\n{describe_release(env)}"
    assert_stored_as_reported(env, obj["status"]["archives"][0])
    assert_runs_on(env, pod)
    check_invariants(env)
    assert_nothing_left(env)
    env.kubectl("delete", "ccp", name, "--timeout=60s")
    env.kubectl("delete", "pod", pod, "--timeout=60s")


def test_invariants_hold_and_no_runtime_file_is_left(pods: KubeletCluster, counter: str) -> None:
    env = pods
    check_invariants(env)
    assert_nothing_left(env)
    assert get_pod(env, counter)["status"]["phase"] == "Running", describe_pod(env, counter)
