"""What the e2e tests share: names, workloads, creating checkpointer's objects and watching them.

Each helper is defined here once; a test file keeps only what its own story needs.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import zstandard

from localenv.cluster import Cluster
from localenv.controlplane import ControlPlane, missing_binaries
from localenv.env import STORAGE, LocalEnv
from localenv.images import COUNTER, MEMORY, owned_by, read_count, wait_for_log
from localenv.procs import LocalEnvError, Supervisor, require

MiB = 1024 * 1024


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def workload(env: Cluster, node: str, mib: int = 48) -> str:
    """A running container holding `mib` MiB of incompressible memory."""
    name = unique("memory")
    env.nodes[node].podman("run", "-d", *owned_by("default"), "--name", name, MEMORY, str(mib))
    wait_for_log(env.nodes[node], name, "ready")
    return name


def apply(env: Cluster, kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> None:
    env.apply(
        {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


def node_name(env: Cluster, node: str) -> str:
    """The Node's name of a test node (the same on the local environment, a worker's name on kind)."""
    return env.nodes[node].name if node in env.nodes else node


def create(env: Cluster, kind: str, spec: dict[str, Any], namespace: str = "default", prefix: str = "") -> str:
    """A new object of `kind` (ContainerCheckpoint or ContainerRestore) named `prefix` and a random
    suffix; its name."""
    name = unique(prefix or ("ccp" if kind == "ContainerCheckpoint" else "crst"))
    apply(env, kind, name, spec, namespace)
    return name


def checkpoint(env: Cluster, node: str, **spec: Any) -> str:
    """A ContainerCheckpoint on `node` with `spec` as given; its name."""
    return create(env, "ContainerCheckpoint", {"nodeName": node_name(env, node), **spec})


def exported(env: Cluster, node: str, container: str, **spec: Any) -> str:
    """A checkpoint of `container` exported uncompressed (its archive as large as the memory, so its
    upload lasts long enough to be hit); its name."""
    return checkpoint(env, node, **{"containers": [container], "export": {}, "compress": "none", **spec})


def restore(
    env: Cluster, node: str, source: dict[str, Any], namespace: str = "default", **flags: Any
) -> dict[str, Any]:
    """A ContainerRestore of `source` on `node`, once it has Succeeded or Failed."""
    spec = {"nodeName": node_name(env, node), "source": source, **flags}
    name = create(env, "ContainerRestore", spec, namespace)
    return env.wait_phase("crst", name, ["Succeeded", "Failed"], namespace=namespace)


def archive_source(storage: str, key: str, namespace: str = "default") -> dict[str, Any]:
    """A restore's source: `key` in namespace default's folder of `storage`, as a restore in `namespace` names it."""
    archive = {"storageRef": {"name": storage}, "key": key}
    if namespace != "default":
        archive["namespace"] = "default"
    return {"archive": archive}


def counter(env: Cluster, node: str, name: str = "", running_for: float = 0) -> str:
    """A counter of namespace default running on `node` for `running_for` seconds at least, once it
    counts; its name."""
    name = name or unique("counter")
    env.nodes[node].podman("run", "-d", *owned_by("default"), "--name", name, COUNTER)
    time.sleep(running_for)
    read_count(env.nodes[node], name)
    return name


def checkpoint_counter(env: Cluster, node: str = "node-a") -> tuple[str, str, int, dict[str, Any]]:
    """A counter checkpointed into S3 and removed: (container, checkpoint name, last count seen, its archive)."""
    container = counter(env, node, running_for=1)
    name = checkpoint(env, node, containers=[container], export={})
    status = env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    counted = int(env.nodes[node].podman("logs", container).stdout.decode().split()[-1])
    env.nodes[node].podman("rm", "-f", container)
    return container, name, counted, status["archives"][0]


def migration(env: Cluster, node: str, container: str, **spec: Any) -> str:
    """A ContainerMigration of `container` from `node` with `spec` as given; its name."""
    source = {"nodeName": node_name(env, node), "container": container}
    return create(env, "ContainerMigration", {"source": source, **spec}, prefix="cmig")


def running_on(env: Cluster, container: str) -> list[str]:
    """The nodes on which a container of that name runs now."""
    return [node for node in env.nodes if exists(env, node, container) and state(env, node, container) == "running"]


def assert_runs_on_exactly_one_node(env: Cluster, container: str, node: str | None = None) -> None:
    """The container runs on one node, never on none and never on two (`node`: that one)."""
    found = running_on(env, container)
    assert len(found) == 1, f"container {container} runs on {found or 'no node'}"
    assert node is None or found == [node], f"container {container} runs on {found[0]}, not on {node}"


def counts_with_times(env: Cluster, node: str, container: str) -> list[tuple[float, int]]:
    """(seconds since the epoch, count) of every line a counter wrote on the node, from podman's log
    timestamps: conmon stamps each line as the process writes it."""
    out = env.nodes[node].podman("logs", "--timestamps", container).stdout.decode()
    found = []
    for line in out.splitlines():
        stamp, _, count = line.strip().rpartition(" ")
        if not count.isdigit() or not stamp:
            continue
        found.append((_epoch(stamp.split()[0]), int(count)))
    return found


def _epoch(stamp: str) -> float:
    """RFC 3339 with up to nanoseconds (podman's log stamps) as seconds since the epoch."""
    head, dot, rest = stamp.partition(".")
    digits = "".join(c for c in rest[: len(rest) - len(rest.lstrip("0123456789"))])
    zone = rest[len(digits) :] if dot else ""
    if not dot:  # no fraction: the zone is at the end of the head
        head, zone = head[:19], head[19:]
    moment = datetime.datetime.fromisoformat(head + (zone if zone not in ("", "Z") else "+00:00"))
    return moment.timestamp() + (int(digits[:9].ljust(9, "0")) / 1e9 if digits else 0.0)


def assert_stored_as_reported(env: Cluster, archive: dict[str, Any]) -> None:
    """The archive downloads with the size and sha256 that status reports."""
    body = env.s3.client().get_object(Bucket=env.s3.bucket, Key=archive["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == archive["sha256"]
    assert len(body) == archive["size"]


def get(env: LocalEnv, kind: str, name: str) -> dict[str, Any] | None:
    """The object in namespace default; None when there is none, or when the API server does not answer."""
    try:
        return env.read(kind, name)
    except (LocalEnvError, OSError):
        return None


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    """The object's condition of type `kind`; empty while it has none."""
    status = obj.get("status") or {}
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), {})


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    """The object's Ready condition; empty while it has none."""
    return condition(obj, "Ready")


def reason_of(obj: dict[str, Any]) -> str:
    return str(ready(obj)["reason"])


def reason_and_message(obj: dict[str, Any]) -> tuple[str, str]:
    found = ready(obj)
    return str(found["reason"]), str(found["message"])


def wait_for(env: LocalEnv, kind: str, name: str, what: str, test: Any, timeout: float = 120) -> dict[str, Any]:
    """The object once `test(obj)` holds, watched: `test` is asked on each change of the object, and of
    nothing else; fails naming `what` after `timeout` seconds."""
    reached, obj = env.wait(kind, name, lambda o: o is not None and test(o), timeout)
    assert reached and obj is not None, (
        f"{kind} {name}: {what} did not happen in {timeout:.0f}s; last: {(obj or {}).get('status')}"
    )
    return obj


def finished(obj: dict[str, Any]) -> bool:
    return (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def uploading(obj: dict[str, Any], at_least: int = 1) -> bool:
    status = obj.get("status") or {}
    return status.get("phase") == "Uploading" and int((status.get("progress") or {}).get("bytesDone") or 0) >= at_least


def state(env: LocalEnv, node: str, container: str) -> str:
    out = env.nodes[node].podman("inspect", "--format", "{{.State.Status}}", container)
    return out.stdout.decode().strip()


def exists(env: Cluster, node: str, container: str) -> bool:
    return env.nodes[node].podman("container", "exists", container, check=False).returncode == 0


def remove(env: Cluster, node: str, *containers: str, pod: str | None = None) -> None:
    """The containers (and the pod) gone from the node, whether they were there or not."""
    for container in containers:
        env.nodes[node].podman("rm", "-f", "-t", "0", container, check=False)
    if pod:
        env.nodes[node].podman("pod", "rm", "-f", "-t", "0", pod, check=False)


def restores_of(env: Cluster, node: str, container: str) -> int:
    """How many times podman restored a container of that name on the node."""
    out = env.nodes[node].podman(
        "events",
        "--stream=false",
        "--filter",
        f"container={container}",
        "--filter",
        "event=restore",
        "--format",
        "{{.Status}}",
    )
    return out.stdout.decode().split().count("restore")


def delete(env: LocalEnv, kind: str, name: str, timeout: float = 120) -> None:
    env.delete(kind, name)
    gone, obj = env.wait(kind, name, lambda o: o is None, timeout)
    assert gone, f"the deletion of {kind} {name} did not happen in {timeout:.0f}s; last: {(obj or {}).get('status')}"


def events(env: LocalEnv, name: str, reason: str, kind: str | None = None) -> list[str]:
    """The messages of the Events of `reason` about the object `name` (of `kind`, when given)."""
    selector = f"involvedObject.name={name},reason={reason}"
    if kind:
        selector = f"involvedObject.kind={kind},{selector}"
    return [str(e.get("message")) for e in env.list_objects("events", "default", selector)]


def until(
    what: str,
    test: Callable[[], Any],
    timeout: float = 30,
    last: Callable[[], Any] | None = None,
    interval: float = 0.25,
) -> Any:
    """What `test()` returns once truthy, asked every `interval` seconds; fails naming `what`, and with
    `last()`, after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = test()
        if found:
            return found
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:.0f}s; last: {last and last()}"
        time.sleep(interval)


def members(archive: bytes) -> dict[str, bytes]:
    """Every member of a tar (zstd-compressed or not) by name, the content of regular files."""
    raw = archive
    if archive[:4] == b"\x28\xb5\x2f\xfd":
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(archive)).read()
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
        for member in tar:
            extracted = tar.extractfile(member) if member.isreg() else None
            found[member.name] = extracted.read() if extracted else b""
    return found


def wait_storage(env: LocalEnv, name: str, phase: str = "Available") -> None:
    """Returns once the CheckpointStorage's status says `phase`."""
    reached, obj = env.wait("cks", name, lambda o: ((o or {}).get("status") or {}).get("phase") == phase, 60)
    assert reached, f"CheckpointStorage {name} {phase} did not happen in 60s; last: {(obj or {}).get('status')}"


@contextmanager
def extra_storage(env: LocalEnv, **spec: Any) -> Iterator[str]:
    """A second, non-default storage on the environment's bucket, once Available; deleted after.

    Storages are cluster-wide: the environment keeps exactly one default, which every other test uses.
    """
    name = unique("storage")
    local = (env.read("cks", STORAGE) or {})["spec"]
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
        env.delete("cks", name)
        gone, obj = env.wait("cks", name, lambda o: o is None, 120)
        assert gone, f"CheckpointStorage {name} stays after its deletion: {(obj or {}).get('status')}"
        defaults = [s for s in env.list_objects("cks") if s["spec"].get("default")]
        assert [s["metadata"]["name"] for s in defaults] == [STORAGE]


def storage_accepting_unsigned(env: LocalEnv) -> AbstractContextManager[str]:
    """An extra storage that admits unsigned archives (made by plain podman), and keeps them."""
    return extra_storage(env, acceptUnsignedArchives=True, deletionPolicy="Retain")


def start_control_plane(workdir: Path) -> tuple[ControlPlane, Supervisor]:
    """A control plane of the caller's own, and the supervisor of its processes."""
    missing = missing_binaries()
    require(not missing, f"control-plane binaries not built ({', '.join(missing)}): run hack/build/tools.sh")
    supervisor = Supervisor(workdir / "logs")
    return ControlPlane.start(workdir, supervisor), supervisor


@contextmanager
def own_control_plane(workdir: Path) -> Iterator[ControlPlane]:
    """A control plane of the caller's own, stopped with all its processes after."""
    plane, supervisor = start_control_plane(workdir)
    try:
        yield plane
    finally:
        plane.stop()
        supervisor.stop_all()
