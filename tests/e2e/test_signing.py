"""Signed archives end to end: the controller signs every manifest, a restore trusts only what it signed.

Real API server, real podman and CRIU, real S3. A restore of an edited manifest, of swapped archive
bytes, or of an archive made by plain podman fails with ArchiveUntrusted and leaves no container on
the node; a storage with acceptUnsignedArchives admits the plain archive (docs/api.md, Signed
manifests).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import kubernetes
import pytest

from helpers import (
    PUBLIC_KEY,
    apply,
    checkpoint,
    counter,
    delete,
    exists,
    get,
    manifest_key,
    members,
    public_keys,
    ready,
    restore,
    state,
    storage_accepting_unsigned,
    unique,
    until,
    verify_manifest,
    wait_for,
    workload,
)
from invariants import check_invariants
from localenv.env import NAMESPACE, SECRET, STORAGE, LocalEnv
from localenv.images import read_count
from localenv.procs import run

pytestmark = pytest.mark.e2e

SIGNING_KEY = "checkpointer-signing-key"

AGENT_SA = "system:serviceaccount:checkpointer-system:checkpointer-agent"
CONTROLLER_SA = "system:serviceaccount:checkpointer-system:checkpointer-controller"


# --- helpers -------------------------------------------------------------------------------------


def local_checkpoint(env: LocalEnv, container: str, node: str = "node-a") -> bool:
    """podman's own checkpoint of the container (`<StaticDir>/checkpoint/`) is on the node."""
    static = env.nodes[node].podman("inspect", "--format", "{{.StaticDir}}", container).stdout.decode().strip()
    probe = run([*env.nodes[node].nsenter_argv(), "test", "-d", f"{static}/checkpoint"], check=False, timeout=30)
    return bool(static) and probe.returncode == 0


def s3_get(env: LocalEnv, key: str) -> bytes:
    body: bytes = env.s3.client().get_object(Bucket=env.s3.bucket, Key=key)["Body"].read()
    return body


def s3_put(env: LocalEnv, key: str, body: bytes) -> None:
    env.s3.client().put_object(Bucket=env.s3.bucket, Key=key, Body=body)


def plain_podman_export(env: LocalEnv, node: str, container: str) -> bytes:
    """A checkpoint archive made by hand with podman, as anyone with a node could make one."""
    path = f"/tmp/{unique('plain')}.tar.zst"
    env.nodes[node].podman("container", "checkpoint", "--export", path, "--compress", "zstd", container)
    nsenter = env.nodes[node].nsenter_argv()
    try:
        return bytes(run([*nsenter, "cat", path]).stdout)
    finally:
        run([*nsenter, "rm", "-f", path])


@contextmanager
def watch_phases(env: LocalEnv, name: str) -> Iterator[list[tuple[float, str, str]]]:
    """Every (monotonic time, phase, Ready reason) the API server sends for ContainerCheckpoint `name`."""
    api = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(str(env.kubeconfig)))
    seen: list[tuple[float, str, str]] = []
    watch = kubernetes.watch.Watch()

    def follow() -> None:
        for event in watch.stream(
            api.list_namespaced_custom_object,
            "checkpointer.dev",
            "v1alpha1",
            "default",
            "containercheckpoints",
            field_selector=f"metadata.name={name}",
            timeout_seconds=120,
        ):
            status = event["object"].get("status") or {}
            conditions = {c["type"]: c for c in status.get("conditions") or []}
            seen.append((time.monotonic(), str(status.get("phase")), str(conditions.get("Ready", {}).get("reason"))))
            if status.get("phase") in ("Succeeded", "Failed"):
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(0.5)  # the watch is open before the object exists
    try:
        yield seen
    finally:
        thread.join(timeout=120)
        watch.stop()


# --- tests ---------------------------------------------------------------------------------------


def test_checkpoint_is_signed_by_the_controller_and_restores(local_env: LocalEnv) -> None:
    env = local_env
    keys = public_keys(env)
    added: list[float] = []
    for _ in range(3):  # a few, for the added latency
        container = counter(env, "node-a", running_for=1)
        name = unique("ccp")
        with watch_phases(env, name) as seen:
            apply(env, "ContainerCheckpoint", name, {"nodeName": "node-a", "containers": [container], "export": {}})
            obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"])
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
        signing = [t for t, phase, reason in seen if phase == "Uploading" and reason == "Signing"]
        done = [t for t, phase, _ in seen if phase == "Succeeded"]
        assert signing and done, seen
        added.append(done[0] - signing[0])
        env.nodes["node-a"].podman("rm", "-f", container)
    print(f"\nfrom the agent's Signing status to Succeeded: {[f'{a * 1000:.0f} ms' for a in added]}")
    assert statistics.median(added) < 1.0, added

    status = obj["status"]
    archive = status["archives"][0]
    raw = s3_get(env, manifest_key(archive["key"]))
    manifest = json.loads(raw)
    verify_manifest(manifest, keys)
    assert manifest["namespace"] == "default" and manifest["nodeName"] == "node-a"
    assert manifest["uid"] == obj["metadata"]["uid"]
    [entry] = manifest["archives"]
    assert (entry["key"], entry["sha256"], entry["size"]) == (archive["key"], archive["sha256"], archive["size"])
    # The container configuration podman builds the restored container from, as in the archive.
    data = s3_get(env, archive["key"])
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    dumps = members(data)
    assert entry["configDumpSHA256"] == hashlib.sha256(dumps["config.dump"]).hexdigest()
    assert entry["specDumpSHA256"] == hashlib.sha256(dumps["spec.dump"]).hexdigest()
    # What the controller signed is what the agent handed over: the same manifest, unsigned.
    unsigned = json.dumps({k: v for k, v in manifest.items() if k != "signature"}, indent=2).encode()
    assert status["manifestSHA256"] == hashlib.sha256(unsigned).hexdigest()

    container = status["archives"][0]["container"]
    restored = restore(env, "node-b", {"checkpointRef": {"name": obj["metadata"]["name"]}})
    assert restored["status"]["phase"] == "Succeeded", restored["status"]
    assert exists(env, "node-b", container)
    env.nodes["node-b"].podman("rm", "-f", container)


def test_edited_manifest_and_swapped_bytes_are_untrusted_and_nothing_is_restored(local_env: LocalEnv) -> None:
    env = local_env
    # The victim holds more memory than the archive swapped in: that one inflates to less than the
    # signed manifest states, so the download's bound on inflation does not stop it first.
    container = workload(env, "node-a", mib=16)
    other = counter(env, "node-a", running_for=1)
    name = checkpoint(env, "node-a", containers=[container], export={})
    obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"])
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    archive = obj["status"]["archives"][0]
    key = manifest_key(archive["key"])
    original = s3_get(env, key)
    try:
        # An edited manifest, its signature kept: here it claims another node.
        edited = json.loads(original)
        edited["nodeName"] = "node-b"
        s3_put(env, key, json.dumps(edited, indent=2).encode())
        failed = restore(env, "node-b", {"checkpointRef": {"name": name}})
        assert (failed["status"]["phase"], ready(failed)["reason"]) == ("Failed", "ArchiveUntrusted"), failed["status"]
        assert "edited" in ready(failed)["message"]
        assert not exists(env, "node-b", container)

        # The manifest intact, the archive's bytes swapped for another real podman archive.
        s3_put(env, key, original)
        s3_put(env, archive["key"], plain_podman_export(env, "node-a", other))
        failed = restore(env, "node-b", {"checkpointRef": {"name": name}})
        assert (failed["status"]["phase"], ready(failed)["reason"]) == ("Failed", "ArchiveUntrusted"), failed["status"]
        assert "signed" in ready(failed)["message"]
        assert not exists(env, "node-b", container) and not exists(env, "node-b", other)
    finally:
        for c in (container, other):
            env.nodes["node-a"].podman("rm", "-f", c, check=False)
        # Its archive in the bucket is no longer what status reports: the object goes with it.
        delete(env, "ccp", name)
    check_invariants(env)


def test_plain_podman_archive_is_untrusted_unless_the_storage_accepts_unsigned(local_env: LocalEnv) -> None:
    env = local_env
    container = counter(env, "node-a", running_for=1)
    data = plain_podman_export(env, "node-a", container)
    env.nodes["node-a"].podman("rm", "-f", container)
    folder = unique("planted")
    s3_put(env, f"default/{folder}/counter.tar.zst", data)
    source = {"archive": {"key": f"{folder}/counter.tar.zst"}}

    failed = restore(env, "node-b", source)
    assert (failed["status"]["phase"], ready(failed)["reason"]) == ("Failed", "ArchiveUntrusted"), failed["status"]
    assert "acceptUnsignedArchives" in ready(failed)["message"]
    assert not exists(env, "node-b", container)

    with storage_accepting_unsigned(env) as storage:
        source["archive"]["storageRef"] = {"name": storage}
        restored = restore(env, "node-b", source)
        assert restored["status"]["phase"] == "Succeeded", restored["status"]
        assert exists(env, "node-b", container)
        time.sleep(1)
        assert read_count(env.nodes["node-b"], container) > 0
        env.nodes["node-b"].podman("rm", "-f", container)
    env.s3.client().delete_object(Bucket=env.s3.bucket, Key=f"default/{folder}/counter.tar.zst")
    check_invariants(env)


def test_the_signing_key_is_one_secret_that_agents_cannot_read(local_env: LocalEnv) -> None:
    env = local_env
    secrets = json.loads(env.kubectl("get", "secrets", "-n", NAMESPACE, "-o", "json").stdout)["items"]
    signing = [s for s in secrets if "ed25519.key" in (s.get("data") or {})]
    assert [s["metadata"]["name"] for s in signing] == [SIGNING_KEY]
    assert signing[0].get("immutable") is True
    # The public key it publishes is the private key's other half.
    assert len(public_keys(env)) >= 1

    if env.chart_objects is None:
        env.install_agent_access()  # the chart's agent RBAC, as the agents run with it in a cluster

    def can(who: str, verb: str, resource: str) -> bool:
        out = env.kubectl("auth", "can-i", verb, resource, "-n", NAMESPACE, f"--as={who}", check=False)
        assert out.stdout.strip() in ("yes", "no"), out.stderr
        return bool(out.stdout.strip() == "yes")

    assert can(AGENT_SA, "get", f"configmaps/{PUBLIC_KEY}")
    for verb in ("get", "list", "watch"):
        assert not can(AGENT_SA, verb, f"secrets/{SIGNING_KEY}"), verb
    assert not can(AGENT_SA, "patch", f"configmaps/{PUBLIC_KEY}")
    # A restarted controller uses the key there is: it does not make a second one.
    before = env.kubectl("get", "secret", SIGNING_KEY, "-n", NAMESPACE, "-o", "jsonpath={.metadata.uid}").stdout
    env.stop_controller()
    env.start_controller()
    env.wait_storage_available()
    after = env.kubectl("get", "secret", SIGNING_KEY, "-n", NAMESPACE, "-o", "jsonpath={.metadata.uid}").stdout
    assert before == after
    assert SECRET != SIGNING_KEY


def test_signing_waits_for_the_controller_and_a_restarted_agent_does_not_checkpoint_again(
    local_env: LocalEnv,
) -> None:
    """With the controller away, the agent stores, hands over and keeps the local checkpoint and the spool
    until the signing; a deletion before it, or a signing that fails, gives the container back."""
    env = local_env
    env.stop_controller()
    kept, dropped, untrusted = (
        counter(env, "node-a", running_for=1),
        counter(env, "node-a", running_for=1),
        counter(env, "node-a", running_for=1),
    )
    names: dict[str, str] = {}
    try:
        for container in (kept, dropped, untrusted):
            # Scheduled by hand, as the controller would have: status, then the node label.
            name = names[container] = unique("ccp")
            apply(env, "ContainerCheckpoint", name, {"nodeName": "node-a", "containers": [container], "export": {}})
            patch = {"status": {"phase": "Scheduled", "nodeName": "node-a", "storageRef": {"name": STORAGE}}}
            env.kubectl(
                "patch", "ccp", name, "-n", "default", "--subresource=status", "--type=merge", "-p", json.dumps(patch)
            )
            meta = {
                "metadata": {
                    "labels": {"checkpointer.dev/node": "node-a"},
                    "finalizers": ["controller.checkpointer.dev/finalizer"],
                }
            }
            env.kubectl("patch", "ccp", name, "-n", "default", "--type=merge", "-p", json.dumps(meta))
        handed = {
            c: wait_for(
                env,
                "ccp",
                n,
                "the hand-over for signing",
                lambda o: ready(o).get("reason") == "Signing" if o.get("status", {}).get("conditions") else False,
            )
            for c, n in names.items()
        }
        for container, obj in handed.items():
            assert obj["status"]["phase"] == "Uploading" and obj["status"]["manifestSHA256"]
            manifest = json.loads(s3_get(env, manifest_key(obj["status"]["archives"][0]["key"])))
            assert "signature" not in manifest
            # Stored, but not signed yet: podman's local checkpoint and the spool stay on the node.
            assert state(env, "node-a", container) == "exited"
            assert local_checkpoint(env, container), f"the local checkpoint of {container} went before the signing"
        spool = env.nodes["node-a"].spool_dir / "checkpointer"

        def folders() -> list[str]:
            return [p.name for p in spool.glob("checkpoint_*") if any(n in p.name for n in names.values())]

        assert len(folders()) == 3, folders()
        # A manifest changed in the bucket before the controller reads it is not signed.
        untrusted_manifest = manifest_key(handed[untrusted]["status"]["archives"][0]["key"])
        edited = json.loads(s3_get(env, untrusted_manifest)) | {"nodeName": "node-b"}
        s3_put(env, untrusted_manifest, json.dumps(edited).encode())

        env.stop_agent("node-a")
        env.start_agent("node-a")
        time.sleep(3)
        for container, name in names.items():
            obj = get(env, "ccp", name)
            assert obj is not None and ready(obj)["reason"] == "Signing", obj
            assert obj["status"]["archives"] == handed[container]["status"]["archives"], "checkpointed again"
        assert len(folders()) == 3, folders()
        env.kubectl("delete", "ccp", names[dropped], "-n", "default", "--wait=false")
        # Deleted before it was signed: its archive will never be restored, so the agent gives the
        # container back, restored in place from the local checkpoint it kept.
        until(
            f"{dropped} given back",
            lambda: state(env, "node-a", dropped) == "running",
            timeout=60,
            last=lambda: state(env, "node-a", dropped),
        )
    finally:
        env.start_controller()
    obj = env.wait_phase("ccp", names[kept], ["Succeeded", "Failed"], timeout=60)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    verify_manifest(json.loads(s3_get(env, manifest_key(obj["status"]["archives"][0]["key"]))), public_keys(env))
    dropped_key = handed[dropped]["status"]["archives"][0]["key"]
    deadline = time.monotonic() + 60
    while get(env, "ccp", names[dropped]) is not None:
        assert time.monotonic() < deadline, "the ContainerCheckpoint deleted while Signing stays"
        time.sleep(0.3)
    listed = env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=dropped_key.rsplit("/", 1)[0] + "/")
    assert listed.get("KeyCount", 0) == 0, listed.get("Contents")
    # Signed: the agent lets go of what it kept.
    while folders() or local_checkpoint(env, kept):
        assert time.monotonic() < deadline, f"still on the node after the signing: {folders()}"
        time.sleep(0.3)
    # Not signed: the checkpoint fails, and the agent gives the container back from what it kept; the
    # archive stays with its manifest until the object is deleted.
    failed = env.wait_phase("ccp", names[untrusted], ["Succeeded", "Failed"], timeout=60)
    assert (failed["status"]["phase"], ready(failed)["reason"]) == ("Failed", "ArchiveUntrusted"), failed["status"]
    while state(env, "node-a", untrusted) != "running":
        assert time.monotonic() < deadline + 30, f"{untrusted} was not given back: {state(env, 'node-a', untrusted)}"
        time.sleep(0.3)
    assert s3_get(env, failed["status"]["archives"][0]["key"]) and s3_get(env, untrusted_manifest)
    delete(env, "ccp", names[untrusted])
    for container in (kept, dropped, untrusted):
        env.nodes["node-a"].podman("rm", "-f", container)
    check_invariants(env)
