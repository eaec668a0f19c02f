"""What the fault tests share: a workload whose checkpoint lasts long enough to be hit, and watching it."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from localenv.cluster import Cluster
from localenv.env import STORAGE, LocalEnv
from localenv.images import MEMORY, owned_by, wait_for_log

MiB = 1024 * 1024


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def workload(env: Cluster, node: str, mib: int = 48) -> str:
    """A running container holding `mib` MiB of incompressible memory."""
    name = unique("memory")
    env.nodes[node].podman("run", "-d", *owned_by("default"), "--name", name, MEMORY, str(mib))
    wait_for_log(env.nodes[node], name, "ready")
    return name


def apply(env: Cluster, kind: str, name: str, spec: dict[str, Any]) -> None:
    env.apply(
        {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": "default"},
            "spec": spec,
        }
    )


def checkpoint(env: LocalEnv, node: str, container: str, **spec: Any) -> str:
    name = unique("ccp")
    spec = {"nodeName": node, "containers": [container], "export": {}, "compress": "none", **spec}
    apply(env, "ContainerCheckpoint", name, spec)
    return name


def assert_stored_as_reported(env: Cluster, archive: dict[str, Any]) -> None:
    """The archive downloads with the size and sha256 that status reports."""
    body = env.s3.client().get_object(Bucket=env.s3.bucket, Key=archive["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == archive["sha256"]
    assert len(body) == archive["size"]


def get(env: LocalEnv, kind: str, name: str) -> dict[str, Any] | None:
    out = env.kubectl("get", kind, name, "-n", "default", "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status") or {}
    return next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})


def wait_for(env: LocalEnv, kind: str, name: str, what: str, test: Any, timeout: float = 120) -> dict[str, Any]:
    """The object once `test(obj)` holds; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        obj = get(env, kind, name)
        if obj is not None and test(obj):
            return obj
        time.sleep(0.2)
    raise AssertionError(f"{kind} {name}: {what} did not happen in {timeout:.0f}s; last: {obj and obj.get('status')}")


def finished(obj: dict[str, Any]) -> bool:
    return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def uploading(obj: dict[str, Any], at_least: int = 1) -> bool:
    status = obj.get("status") or {}
    return status.get("phase") == "Uploading" and int((status.get("progress") or {}).get("bytesDone") or 0) >= at_least


def state(env: LocalEnv, node: str, container: str) -> str:
    out = env.nodes[node].podman("inspect", "--format", "{{.State.Status}}", container)
    return out.stdout.decode().strip()


def remove(env: LocalEnv, node: str, container: str) -> None:
    env.nodes[node].podman("rm", "-f", "-t", "0", container, check=False)


def delete(env: LocalEnv, kind: str, name: str, timeout: float = 120) -> None:
    env.kubectl("delete", kind, name, "-n", "default", "--wait=false", check=False)
    deadline = time.monotonic() + timeout
    while get(env, kind, name) is not None:
        assert time.monotonic() < deadline, f"{kind} {name} was not deleted in {timeout:.0f}s"
        time.sleep(0.3)


def events(env: LocalEnv, name: str, reason: str) -> list[str]:
    selector = f"involvedObject.name={name},reason={reason}"
    out = env.kubectl("get", "events", "-n", "default", "--field-selector", selector, "-o", "json")
    return [str(e.get("message")) for e in json.loads(out.stdout)["items"]]


def wait_storage(env: LocalEnv, name: str) -> None:
    deadline = time.monotonic() + 60
    while env.kubectl("get", "cks", name, "-o", "jsonpath={.status.phase}").stdout != "Available":
        assert time.monotonic() < deadline, f"CheckpointStorage {name} is not Available"
        time.sleep(0.5)


@contextmanager
def extra_storage(env: LocalEnv, **spec: Any) -> Iterator[str]:
    """A second, non-default storage on the environment's bucket, once Available; deleted after.

    Storages are cluster-wide: the environment keeps exactly one default, which every other test uses.
    """
    name = unique("storage")
    local = json.loads(env.kubectl("get", "cks", STORAGE, "-o", "json").stdout)["spec"]
    env.apply(
        {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": "CheckpointStorage",
            "metadata": {"name": name},
            "spec": {**local, "default": False, **spec},
        }
    )
    try:
        wait_storage(env, name)
        yield name
    finally:
        env.kubectl("delete", "cks", name, "--wait=true")
        defaults = [
            s for s in json.loads(env.kubectl("get", "cks", "-o", "json").stdout)["items"] if s["spec"].get("default")
        ]
        assert [s["metadata"]["name"] for s in defaults] == [STORAGE]


def storage_accepting_unsigned(env: LocalEnv) -> AbstractContextManager[str]:
    """An extra storage that admits unsigned archives (made by plain podman), and keeps them."""
    return extra_storage(env, acceptUnsignedArchives=True, deletionPolicy="Retain")
