"""The invariants that hold after any fault, once the environment is whole again.

`check_invariants` is the last step of every fault test and of the soak; it checks what
docs/failure-semantics.md promises:

1. every Succeeded archive is in the bucket with the size and sha256 in status (downloaded and hashed);
2. the bucket has no open multipart upload;
3. no container stopped by a checkpoint lacks its archive: it runs again, or its archive is in the
   bucket (the object Succeeded), or on the node (a complete spool, or podman's local checkpoint);
4. no ContainerCheckpoint, ContainerRestore or ContainerMigration stays non-terminal past `timeout`;
5. no work folder in a node's spool exists without a live object whose uid it names.

Every violation found is reported together, in one AssertionError.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localenv.cluster import Cluster
from localenv.faults import small_spools
from localenv.procs import run

CHECKPOINTS = "containercheckpoints.checkpointer.dev"
RESTORES = "containerrestores.checkpointer.dev"
MIGRATIONS = "containermigrations.checkpointer.dev"
TERMINAL = ("Succeeded", "Failed")
UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
# Failures that end a checkpoint before podman is asked to stop anything.
BEFORE_PODMAN = {
    "NodeNotFound",
    "AgentUnavailable",
    "StorageNotFound",
    "StorageUnavailable",
    "PreviousCheckpointNotReady",
    "ContainerNotFound",
    "ContainerNotRunning",
    "ContainerNotPermitted",
    "StorageNotPermitted",
}
# An abort or a folder removal may trail the object's last status write by a moment.
SETTLE_SECONDS = 20.0


@dataclass(frozen=True)
class Container:
    """A container that a checkpoint stopped (or may have stopped), on a node of the environment."""

    node: str
    name: str


def check_invariants(
    env: Cluster,
    timeout: float = 120,
    *,
    stopped: Iterable[Container | tuple[str, str]] = (),
) -> None:
    """Assert the five invariants; wait up to `timeout` seconds for every object to be terminal.

    `stopped` adds containers that a checkpoint may have stopped although no object names them any
    more (the ContainerCheckpoint was deleted): they too must run again or keep their archive.
    """
    extra = [c if isinstance(c, Container) else Container(*c) for c in stopped]
    violations: list[str] = []
    objects = _wait_terminal(env, timeout)
    for obj in objects:
        phase = (obj.get("status") or {}).get("phase")
        if phase not in TERMINAL:
            violations.append(f"4. {_describe(obj)} is not terminal after {timeout:.0f}s: {_status(obj)}")
    # Uploads and work folders are judged once the objects have settled; what is then still there
    # stays, so a short grace only covers an abort or a removal that trails the last status write.
    violations += settled(lambda: _open_uploads(env))
    violations += settled(lambda: _part_objects(env))
    violations += archives_in_bucket(env, objects)
    violations += stopped_containers_keep_their_archive(env, objects, extra)
    violations += settled(lambda: _orphan_work_folders(env))
    if violations:
        raise AssertionError(
            f"{len(violations)} invariant violation(s) (see docs/failure-semantics.md):\n- " + "\n- ".join(violations)
        )


# --- objects -------------------------------------------------------------------------------------


def _all_objects(env: Cluster) -> list[dict[str, Any]]:
    return env.list_objects(CHECKPOINTS) + env.list_objects(RESTORES) + env.list_objects(MIGRATIONS)


def _wait_terminal(env: Cluster, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        objects = _all_objects(env)
        if all((o.get("status") or {}).get("phase") in TERMINAL for o in objects) or time.monotonic() > deadline:
            return objects
        time.sleep(0.25)


def _describe(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['kind']} {meta.get('namespace')}/{meta['name']} (uid {meta['uid']})"


def _reason(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return str(ready.get("reason") or "")


def _status(obj: dict[str, Any]) -> str:
    status = obj.get("status") or {}
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    deleting = obj["metadata"].get("deletionTimestamp")
    return (
        f"phase {status.get('phase')!r}, Ready {ready.get('status')}/{ready.get('reason')}: {ready.get('message')!r}"
        + (f", deleting since {deleting} (finalizers {obj['metadata'].get('finalizers')})" if deleting else "")
    )


def settled(check: Callable[[], list[str]], grace: float = SETTLE_SECONDS) -> list[str]:
    deadline = time.monotonic() + grace
    while True:
        violations = check()
        if not violations or time.monotonic() > deadline:
            return violations
        time.sleep(0.25)


# --- the bucket ----------------------------------------------------------------------------------


def _open_uploads(env: Cluster) -> list[str]:
    s3 = env.s3.client()
    uploads: list[Any] = []
    kwargs: dict[str, Any] = {"Bucket": env.s3.bucket}
    while True:
        page = s3.list_multipart_uploads(**kwargs)
        uploads += page.get("Uploads", [])
        if not page.get("IsTruncated"):
            break
        kwargs.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
    return [
        f"2. open multipart upload {u['Key']} (upload {u['UploadId']}, since {u.get('Initiated')})" for u in uploads
    ]


def _part_objects(env: Cluster) -> list[str]:
    """A streamed checkpoint's part objects (layout.part_key) go once its archive is completed or aborted."""
    s3 = env.s3.client()
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env.s3.bucket):
        found += [str(o["Key"]) for o in page.get("Contents", []) if ".part-" in str(o["Key"]).rsplit("/", 1)[-1]]
    return [f"2. temporary part object {key} left in the bucket" for key in found]


def _key_of(archive: dict[str, Any], bucket: str) -> tuple[str, str] | None:
    """(bucket, key) of an exported archive; None for a checkpoint that stays on the node."""
    uri = str(archive.get("uri") or "")
    if uri.startswith("s3://"):
        found_bucket, _, key = uri[len("s3://") :].partition("/")
        return found_bucket, str(archive.get("key") or key)
    if archive.get("key"):
        return bucket, str(archive["key"])
    return None


@dataclass(frozen=True)
class Stored:
    """An object in a bucket as its listing shows it: what says whether its bytes are the ones hashed."""

    size: int
    etag: str
    modified: str


# sha256 of each object's bytes as downloaded, by (endpoint, bucket, key) and what its listing showed
# then: an archive is downloaded and hashed once a session, and again only once its object changed.
_hashed: dict[tuple[str, str, str, Stored], str] = {}


def _listing(env: Cluster, bucket: str) -> dict[str, Stored] | str:
    """Every object of the bucket by key, or why the bucket cannot be listed."""
    try:
        found = {}
        for page in env.s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for o in page.get("Contents", []):
                found[str(o["Key"])] = Stored(int(o["Size"]), str(o["ETag"]), str(o["LastModified"]))
        return found
    except Exception as e:  # NoSuchBucket and the like: nothing in it can be read
        return f"{type(e).__name__}: {e}"


def _sha256(env: Cluster, bucket: str, key: str, stored: Stored) -> tuple[int, str] | str:
    """(size, sha256) of the object's bytes as downloaded (once per version), or why they could not be read."""
    cached = (env.s3.endpoint, bucket, key, stored)
    if cached in _hashed:
        return stored.size, _hashed[cached]
    try:
        reply = env.s3.client().get_object(Bucket=bucket, Key=key)
    except Exception as e:  # NoSuchKey, NoSuchBucket and the like all mean: not there
        return f"{type(e).__name__}: {e}"
    body = reply["Body"]
    digest = hashlib.sha256()
    size = 0
    for chunk in body.iter_chunks(1024 * 1024):
        digest.update(chunk)
        size += len(chunk)
    if size == stored.size and str(reply.get("ETag")) == stored.etag:  # the version listed: known from now on
        _hashed[cached] = digest.hexdigest()
    return size, digest.hexdigest()


class Listings:
    """Each bucket's listing, taken once per check."""

    def __init__(self, env: Cluster) -> None:
        self.env = env
        self._taken: dict[str, dict[str, Stored] | str] = {}

    def __call__(self, bucket: str) -> dict[str, Stored] | str:
        if bucket not in self._taken:
            self._taken[bucket] = _listing(self.env, bucket)
        return self._taken[bucket]


def archives_in_bucket(env: Cluster, objects: Sequence[dict[str, Any]]) -> list[str]:
    violations = []
    listings = Listings(env)
    for obj in objects:
        status = obj.get("status") or {}
        if obj["kind"] != "ContainerCheckpoint" or status.get("phase") != "Succeeded":
            continue
        for archive in status.get("archives") or []:
            where = _key_of(archive, env.s3.bucket)
            if where is None:
                continue
            bucket, key = where
            what = f"1. {_describe(obj)}: archive s3://{bucket}/{key}"
            listing = listings(bucket)
            listed = listing.get(key) if isinstance(listing, dict) else None
            if listed is None:
                why = listing if isinstance(listing, str) else "NoSuchKey: not in the bucket's listing"
                violations.append(f"{what} cannot be read: {why}")
                continue
            stored = _sha256(env, bucket, key, listed)
            if isinstance(stored, str):
                violations.append(f"{what} cannot be read: {stored}")
                continue
            size, sha256 = stored
            if size != archive.get("size"):
                violations.append(f"{what} has {size} bytes, status says {archive.get('size')}")
            if sha256 != archive.get("sha256"):
                violations.append(f"{what} has sha256 {sha256}, status says {archive.get('sha256')}")
    return violations


# --- containers ----------------------------------------------------------------------------------


def inspect(env: Cluster, node: str, container: str) -> dict[str, Any] | None:
    result = env.nodes[node].podman("container", "inspect", container, check=False, timeout=60)
    if result.returncode != 0:
        return None
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found[0] if found else None


def _local_checkpoint(env: Cluster, node: str, static_dir: str) -> bool:
    """podman's own checkpoint of the container (`<StaticDir>/checkpoint/`) is on the node."""
    if not static_dir:
        return False
    sandbox = env.nodes[node]
    probe = run([*sandbox.nsenter_argv(), "test", "-d", f"{static_dir}/checkpoint"], check=False, timeout=30)
    return bool(probe.returncode == 0)


def spool_dirs(env: Cluster, node: str) -> list[Path]:
    """Every place the node's agent may spool to: the harness agent's spool, the chart's default
    (agent.spoolDir under the node's /var/lib/checkpointer, on nodes with a kubelet), and any small
    spool mounted now."""
    sandbox = env.nodes[node]
    return [sandbox.spool_dir / "checkpointer", sandbox.state_dir / "checkpointer" / "spool", *small_spools(env, node)]


def _complete_spool(env: Cluster, node: str, folder_name: str, container: str) -> Path | None:
    """The spooled archive of `container` when its work folder holds both the archive and its record."""
    for spool in spool_dirs(env, node):
        folder = spool / folder_name
        if not (folder / f"{container}.spool.json").is_file():
            continue
        for archive in folder.glob(f"{container}.tar*"):
            if archive.is_file() and archive.suffix != ".tmp":
                return archive
    return None


def _targets(obj: dict[str, Any]) -> list[str]:
    status = obj.get("status") or {}
    names = [str(a["container"]) for a in status.get("archives") or [] if a.get("container")]
    for name in obj["spec"].get("containers") or []:
        if name not in names:
            names.append(str(name))
    return names


def _in_bucket(env: Cluster, obj: dict[str, Any], container: str, listings: Listings) -> bool:
    status = obj.get("status") or {}
    if status.get("phase") != "Succeeded":
        return False
    for archive in status.get("archives") or []:
        if archive.get("container") != container:
            continue
        where = _key_of(archive, env.s3.bucket)
        if where is None:
            return False  # a checkpoint without export: podman's local checkpoint is its archive
        listing = listings(where[0])
        return isinstance(listing, dict) and where[1] in listing
    return False


def _states(env: Cluster, node: str) -> dict[str, str]:
    """Every container on the node by name, with its state: one look at the node, not one per container."""
    listed = json.loads(env.nodes[node].podman("ps", "--all", "--format", "json", timeout=60).stdout or b"[]")
    return {str(name): str(c.get("State")) for c in listed for name in c.get("Names") or []}


def stopped_containers_keep_their_archive(
    env: Cluster, objects: Sequence[dict[str, Any]], extra: Sequence[Container]
) -> list[str]:
    violations = []
    checked: set[Container] = set()
    listings = Listings(env)
    states: dict[str, dict[str, str]] = {}

    def check(container: Container, obj: dict[str, Any] | None) -> None:
        checked.add(container)
        if container.node not in states:
            states[container.node] = _states(env, container.node)
        if states[container.node].get(container.name) in (None, "running"):
            return  # running, or removed since: there is nothing left to keep an archive for
        info = inspect(env, container.node, container.name)
        if info is None:
            return
        state = info.get("State") or {}
        if state.get("Running") or state.get("Status") == "running":
            return
        if obj is not None and _in_bucket(env, obj, container.name, listings):
            return
        if obj is not None:
            meta = obj["metadata"]
            folder = f"checkpoint_{meta['namespace']}_{meta['name']}_{meta['uid']}"
            if _complete_spool(env, container.node, folder, container.name):
                return
        if _local_checkpoint(env, container.node, str(info.get("StaticDir") or "")):
            return
        by = _describe(obj) if obj is not None else "a deleted ContainerCheckpoint"
        violations.append(
            f"3. container {container.name} on {container.node}, targeted by {by}, is {state.get('Status')!r} "
            f"(checkpointed {state.get('Checkpointed')}, at {state.get('CheckpointedAt')}) and its archive is "
            "nowhere: not in the bucket, not spooled on the node, no local checkpoint"
            + (f"; object {_status(obj)}" if obj is not None else "")
        )

    for obj in objects:
        # A Pod's container is never stopped: its node's runtime leaves it running.
        if obj["kind"] != "ContainerCheckpoint" or obj["spec"].get("leaveRunning") or obj["spec"].get("podRef"):
            continue
        if (obj.get("status") or {}).get("phase") == "Failed" and _reason(obj) in BEFORE_PODMAN:
            continue  # it ended before any container was stopped: one that is stopped was so before
        node = (obj.get("status") or {}).get("nodeName") or obj["spec"].get("nodeName")
        if node not in env.nodes:
            continue
        for name in _targets(obj):
            check(Container(node, name), obj)
    for container in extra:
        if container not in checked:
            check(container, None)
    return violations


# --- work folders --------------------------------------------------------------------------------


def _orphan_work_folders(env: Cluster) -> list[str]:
    live = {o["metadata"]["uid"]: o for o in _all_objects(env)}
    violations = []
    for node in env.nodes:
        for spool in spool_dirs(env, node):
            if not spool.is_dir():
                continue
            for folder in sorted(spool.iterdir()):
                if not folder.is_dir() or folder.name == "lost+found":  # ext4's own, on a small spool
                    continue
                found = UID.search(folder.name)
                if found is None:
                    violations.append(f"5. {folder} on {node} names no object's uid")
                elif found.group(0) not in live:
                    contents = sorted(p.name for p in folder.iterdir())
                    violations.append(f"5. {folder} on {node} belongs to no live object (holds {contents})")
    return violations


# --- a Pod's checkpoint --------------------------------------------------------------------------


def runtime_files_left(env: Cluster) -> list[str]:
    """What a node's container runtime wrote for a Pod's checkpoint and is still there once every
    object is terminal: its FIFO (or a tar) in a work folder of the spool, or anything in the kubelet's
    own checkpoint folder (the kubelet never empties it; the agent never writes there)."""
    left = []
    for node in env.nodes:
        for spool in spool_dirs(env, node):
            left += [f"{path} on {node}" for path in sorted(spool.glob("*/*.runtime.*"))] if spool.is_dir() else []
        kubelet_checkpoints = env.nodes[node].state_dir / "kubelet" / "checkpoints"
        if kubelet_checkpoints.is_dir():
            left += [f"{path} on {node}" for path in sorted(kubelet_checkpoints.iterdir())]
    return left
