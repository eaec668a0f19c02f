"""What the e2e tests share: names, workloads, creating checkpointer's objects and watching them.

Each helper is defined here once; a test file keeps only what its own story needs.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import kubernetes
import yaml
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from kubernetes.client.exceptions import ApiException

from localenv.chart import CHART, RELEASE
from localenv.cluster import ChartCluster, Cluster
from localenv.controlplane import ControlPlane, missing_binaries
from localenv.env import ENCRYPTION_SECRET, NAMESPACE, SECRET, STORAGE, LocalEnv
from localenv.images import COUNTER, MEMORY, owned_by, read_count, wait_for_log
from localenv.kubelet import KubeletCluster
from localenv.procs import LocalEnvError, Supervisor, require, wait_until

MiB = 1024 * 1024
# The ConfigMap where the controller publishes the public halves of its signing keys.
PUBLIC_KEY = "checkpointer-signing-public-key"
# The chart's workloads, as `helm install` names them.
DAEMONSET = "checkpointer-agent"
DEPLOYMENT = "checkpointer-controller"


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


def manifest_key(archive_key: str) -> str:
    return archive_key.rsplit("/", 1)[0] + "/manifest.json"


def public_keys(env: Cluster) -> dict[str, Ed25519PublicKey]:
    out = env.kubectl("get", "configmap", PUBLIC_KEY, "-n", NAMESPACE, "-o", "json")
    keys = {}
    for name, pem in json.loads(out.stdout)["data"].items():
        if name.endswith(".pub"):
            key = load_pem_public_key(pem.encode())
            assert isinstance(key, Ed25519PublicKey)
            keys[hashlib.sha256(key.public_bytes_raw()).hexdigest()] = key
    return keys


def verify_manifest(manifest: dict[str, Any], keys: dict[str, Ed25519PublicKey]) -> None:
    """The contract of docs/api.md, checked here without the product's code."""
    signature = manifest["signature"]
    assert signature["algorithm"] == "Ed25519"
    content = {k: v for k, v in manifest.items() if k != "signature"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    keys[signature["keyID"]].verify(base64.b64decode(signature["value"]), canonical)


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


# --- the chart, installed by Helm alone (nodes with a kubelet) ----------------------------------


def release_values(env: ChartCluster, **changes: Any) -> Path:
    """A values file for `helm install` of the chart on `env`, with its storage `local` (the default one)
    and the encryption Secret readable; `section__name=value` changes one value."""
    storage = {
        "create": True,
        "name": STORAGE,
        "bucket": env.s3.bucket,
        "endpoint": env.s3.endpoint,
        "region": env.s3.region,
        "forcePathStyle": True,
        "existingSecret": SECRET,
    }
    chosen = env.chart_values(storage)
    chosen["rbac"] = {"storageSecrets": [{"namespace": NAMESPACE, "name": ENCRYPTION_SECRET}]}
    for key, value in changes.items():
        section, name = key.split("__")
        current = chosen.get(section)
        chosen[section] = {**(current if isinstance(current, dict) else {}), name: value}
    path = env.workdir / f"values-{unique('helm')}.yaml"
    path.write_text(yaml.safe_dump(chosen))
    return path


def release_pods(env: ChartCluster, component: str) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/component={component}"
    out = env.kubectl("get", "pods", "-n", NAMESPACE, "-l", selector, "-o", "json").stdout
    return list(json.loads(out)["items"])


def wait_rolled_out(env: ChartCluster, timeout: str = "240s") -> None:
    try:
        env.kubectl("rollout", "status", f"deployment/{DEPLOYMENT}", "-n", NAMESPACE, f"--timeout={timeout}")
        env.kubectl("rollout", "status", f"daemonset/{DAEMONSET}", "-n", NAMESPACE, f"--timeout={timeout}")
    except Exception as err:
        raise AssertionError(f"{err}\n{describe_release(env)}") from err


def describe_release(env: ChartCluster) -> str:
    out = env.kubectl("get", "pods,events", "-n", NAMESPACE, "-o", "wide", check=False)
    return str(out.stdout) + str(out.stderr) + env.pod_logs()


def install_release(env: ChartCluster, values: Path) -> None:
    """`helm install` of the chart, done once its Pods run, every agent holds its Lease and the chart's
    storage is Available."""
    env.helm("install", RELEASE, CHART, "--values", values, "--wait", "--timeout", "5m")
    wait_rolled_out(env)
    # An agent's Pod is Ready once it runs (it has a liveness probe only); it is at work once it holds its Lease.
    for node in env.nodes:
        wait_until(f"agent Lease of {node}", lambda node=node: lease_holder(env, node) == node, timeout=60)

    def available() -> bool:
        return bool(env.kubectl("get", "cks", STORAGE, "-o", "jsonpath={.status.phase}").stdout == "Available")

    wait_until(f"CheckpointStorage {STORAGE} Available", available, timeout=120)


def lease_holder(env: ChartCluster, node: str) -> str:
    lease = env.kubectl("get", "lease", "-n", NAMESPACE, f"checkpointer-agent-{node}", "-o", "json", check=False)
    return str(json.loads(lease.stdout)["spec"].get("holderIdentity", "")) if lease.returncode == 0 else ""


# --- Pods on the nodes with a kubelet -------------------------------------------------------------


def get_pod(env: Cluster, name: str, namespace: str = "default") -> dict[str, Any]:
    return dict(json.loads(env.kubectl("get", "pod", name, "-n", namespace, "-o", "json").stdout))


def describe_pod(env: KubeletCluster, name: str, namespace: str = "default") -> str:
    out = env.kubectl("get", "pod", name, "-n", namespace, "-o", "yaml", check=False).stdout
    selector = f"involvedObject.name={name}"
    events = env.kubectl("get", "events", "-n", namespace, "--field-selector", selector, check=False).stdout
    return f"{out}\n{events}\n{env.pod_logs()}"


def run_pod(
    env: KubeletCluster,
    node: str,
    name: str,
    image: str = COUNTER,
    args: tuple[str, ...] = (),
    namespace: str = "default",
) -> dict[str, Any]:
    """A Pod of one container `image` on `node` (without hostNetwork, its image pulled from the
    registry), once it runs: by default a counter."""
    container: dict[str, Any] = {"name": image.rsplit("/", 1)[-1].split(":")[0], "image": env.registry.reference(image)}
    if args:
        container["args"] = list(args)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "containers": [container],
            # The workloads end on SIGTERM at once.
            "terminationGracePeriodSeconds": 5,
        },
    }
    env.apply(pod)

    def running() -> dict[str, Any] | None:
        found = get_pod(env, name, namespace)
        statuses = found["status"].get("containerStatuses") or []
        return found if found["status"].get("phase") == "Running" and all(s["ready"] for s in statuses) else None

    started: dict[str, Any] = until(
        f"Pod {name} running", running, timeout=60, last=lambda: describe_pod(env, name, namespace)
    )
    return started


def pod_count(env: Cluster, name: str, namespace: str = "default") -> int:
    """The counter Pod's count, read in the container by `kubectl exec` (API server, then kubelet)."""

    def read() -> str | None:
        out = env.kubectl("exec", name, "-n", namespace, "--", "cat", "/tmp/count", check=False).stdout.strip()
        return out if out.isdigit() else None  # empty for an instant while the shell rewrites it

    text: str = until(f"a count from {name}", read, timeout=10)
    return int(text)


# --- the agent's identity -------------------------------------------------------------------------

POLICY = "checkpointer-agent-own-node"
GROUP, VERSION, PLURAL = "checkpointer.dev", "v1alpha1", "containercheckpoints"
DENIED = f"ValidatingAdmissionPolicy '{POLICY}' with binding '{POLICY}' denied request: "


class Agent:
    """The Kubernetes API as the agent calls it (the same client), with one kubeconfig's credentials."""

    def __init__(self, kubeconfig: Path) -> None:
        api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.leases = kubernetes.client.CoordinationV1Api(api)
        self.core = kubernetes.client.CoreV1Api(api)

    def patch(self, name: str, body: dict[str, Any], status: bool = False) -> Any:
        call = (
            self.custom.patch_namespaced_custom_object_status if status else self.custom.patch_namespaced_custom_object
        )
        return call(GROUP, VERSION, "default", PLURAL, name, body)

    def create(self, body: dict[str, Any]) -> Any:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)


def refused(call: Callable[[], Any]) -> str:
    """The policy's message for a write it refused: a 403 with it, nothing else, and the write not done."""
    try:
        call()
    except ApiException as e:
        message = str(json.loads(e.body)["message"])
        assert e.status == 403 and DENIED in message, f"{e.status}: {message}"
        return message.split(DENIED, 1)[1]
    raise AssertionError("the write went through")
