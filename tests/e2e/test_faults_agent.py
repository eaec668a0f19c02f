"""The agent SIGKILLed at ten moments of a checkpoint and at ten of a restore, on both runtimes.

docs/failure-semantics.md promises, for an agent killed and started again:

- during podman's checkpoint: the container is restored in place (or kept running) and the object
  fails with CheckpointInterrupted; with a complete spool, the spool is uploaded;
- during the upload: the spool is hashed again and the open multipart upload resumed: Succeeded;
- during a restore's download: it downloads again: Succeeded;
- while podman restores: never a second restore; the restarted agent looks at what podman left:
  the container running is Succeeded, else what podman made is removed: RestoreUndone.

The moments are observed rather than timed from the object's creation: each kill waits for what
the agent leaves on the node (its work folder, markers, the spool, the download), for the runtime
at work (runc checkpointing or restoring, CRIU under it) or for what is in the bucket (the parts
stored so far), at most a fixed delay after one of them, because podman's part of a checkpoint
lasts well under a second and a timer would miss it under load. The upload and the download are
capped so that they last a few seconds and several moments fall inside them. What the agent had
reached is read again after the kill, from what the killed agent left, and each outcome is held to
what that point allows.

The two nodes' series run side by side, one thread per node: each node has its own agent, node-a's
talking to podman's REST API and node-b's running the podman CLI.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, TypeVar

import pytest
import zstandard
from botocore.exceptions import ClientError

from helpers import MiB, apply, ready, restores_of, unique
from invariants import check_invariants, inspect
from localenv.env import LocalEnv
from localenv.images import MEMORY, owned_by, wait_for_log

pytestmark = pytest.mark.e2e

T = TypeVar("T")
NODES = ["node-a", "node-b"]  # node-a's agent uses the REST API, node-b's the CLI
# About 25 MiB once compressed (half of the memory is random): four upload parts of 8 MiB at most.
MEMORY_MIB = 48
# About 3 s for the upload and 2 s for the download, so that several kills fall inside each; a
# download killed starts again from its first byte.
SETTINGS = {
    "CHECKPOINTER_UPLOAD_BYTES_PER_SECOND": str(8 * MiB),
    "CHECKPOINTER_DOWNLOAD_BYTES_PER_SECOND": str(12 * MiB),
}
TERMINAL = ["Succeeded", "Failed"]
# cgroup v1's freezer, then v2's (unified, or beside v1 in a hybrid layout).
FREEZERS = [
    (Path("/sys/fs/cgroup/freezer"), "freezer.state", {}),
    (Path("/sys/fs/cgroup"), "cgroup.freeze", {"0": "THAWED", "1": "FROZEN"}),
    (Path("/sys/fs/cgroup/unified"), "cgroup.freeze", {"0": "THAWED", "1": "FROZEN"}),
]
POLL_SECONDS = 0.01
# Generous for a loaded machine; the latest moment comes a few seconds after the object's creation.
MOMENT_TIMEOUT = 120.0
# From the restart to the end: a resumed upload is capped as the first one was.
END_TIMEOUT = 180.0

# The environment's Supervisor keeps its list of processes without a lock, so the two node threads
# take turns at starting agents. The kill goes without it: waiting for the other node would make it late.
AGENTS = threading.Lock()


def run_memory(env: LocalEnv, node: str) -> tuple[str, str]:
    """A memory workload holding all its memory: (name, id)."""
    container = unique("memory")
    out = env.nodes[node].podman("run", "-d", *owned_by("default"), "--name", container, MEMORY, str(MEMORY_MIB)).stdout
    wait_for_log(env.nodes[node], container, "ready")
    return container, out.decode().split()[-1]


RUNTIMES = (b"runc", b"crun")


def runtime_at_work(verb: bytes, *, container_id: str = "", pid_ns: str = "") -> bool:
    """Whether an OCI runtime runs `verb` (checkpoint, restore) now, and CRIU under it.

    For a container's id, or anywhere in a node's PID namespace: podman is handed the container's
    name, and a restore's new id is not known beforehand. Every process of the nodes is in this
    host's /proc.
    """
    needle = container_id.encode()
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
                if os.path.basename(args[0]) not in RUNTIMES or verb not in args or (needle and needle not in args):
                    continue
                if pid_ns and os.readlink(Path(entry.path, "ns", "pid")) != pid_ns:
                    continue
            except OSError:  # gone meanwhile
                continue
            return True
    return False


def freezer_state(node: str, info: dict[str, Any]) -> str:
    """THAWED or FROZEN: a CRIU killed mid-dump could leave a container frozen that podman calls running."""
    # podman names one controller's path; each hierarchy holds the same tail below its own root.
    parts = Path(str((info.get("State") or {}).get("CgroupPath") or "/")).parts[1:]
    for i in range(len(parts)):
        for root, name, states in FREEZERS:
            path = root.joinpath(*parts[i:], name)
            if path.is_file():
                text = path.read_text().strip()
                return states.get(text, text)
    return f"unknown: no freezer found for cgroup {'/'.join(parts)!r} on {node}"


def parts_sent(env: LocalEnv, key: str) -> list[tuple[str, int]]:
    """(upload id, part number) of every part of `key` the S3 server took, from its access log."""
    path = f"/{env.s3.bucket}/{key}"
    sent = []
    for line in env.s3.process.log.read_text(errors="replace").splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) < 9 or fields[2] != "200" or fields[5] != "PUT" or fields[6] != path:
            continue
        query = urllib.parse.parse_qs(fields[8])
        if "partNumber" in query:
            sent.append((query["uploadId"][0], int(query["partNumber"][0])))
    return sent


def containers_on(env: LocalEnv, node: str) -> dict[str, str]:
    """Every container on the node, by name, with its state."""
    listed = json.loads(env.nodes[node].podman("ps", "--all", "--format", "json").stdout or b"[]")
    return {name: str(c.get("State")) for c in listed for name in c.get("Names") or []}


# --- the agent -----------------------------------------------------------------------------------


def kill_agent(env: LocalEnv, node: str) -> None:
    """SIGKILL the agent's whole process group, the podman CLI it runs included, as env.stop_agent does."""
    for process in list(env.supervisor.processes):
        if process.name == f"agent-{node}" and process.alive():
            os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait(30)


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def restart_agent(env: LocalEnv, node: str, settings: dict[str, str] | None) -> None:
    """Start the node's agent again with `settings`, SIGKILLing it first if it still runs.

    The Lease may still be the old agent's, so it is the liveness probe that says the new one is up;
    only the bookkeeping is done in turns, the other node's agent starts meanwhile.
    """
    with AGENTS:
        env.stop_agent(node, kill=True)
        process = env.start_agent(node, settings)
        port = env.health_ports[f"agent-{node}"]
    deadline = time.monotonic() + 60
    while not answers(port):
        assert process.alive(), f"agent {node} exited with {process.popen.returncode}, see {process.log}"
        assert time.monotonic() < deadline, f"agent {node} does not answer on /healthz, see {process.log}"
        time.sleep(0.1)


# --- where the agent is --------------------------------------------------------------------------


class Stage(IntEnum):
    """How far a checkpoint had got, in order, as its work folder and the bucket show it."""

    WAITING = 0  # no work folder yet
    PICKED_UP = 1  # a work folder, nothing in it yet
    RESOLVED = 2  # the targets recorded, podman not called yet
    CHECKPOINTING = 3  # the marker is written and podman called; nothing exported yet
    DUMPING = 4  # the runtime is checkpointing the container: CRIU freezes it and dumps its memory
    EXPORTING = 5  # the spool grows, podman is not done
    UPLOADING = 6  # the spool is complete and recorded; some parts are in the bucket
    STORED = 7  # the multipart upload is complete; the status does not say so yet
    ENDED = 8  # the work folder is gone: the object has its last status


class RestoreStage(IntEnum):
    WAITING = 0
    PICKED_UP = 1  # a work folder, no download yet
    DOWNLOADING = 2
    DOWNLOADED = 3  # the archive is whole on the node; podman not called yet
    RESTORING = 4  # the marker is written and podman called
    CRIU_RESTORING = 5  # the runtime restores the container's processes
    ENDED = 6


@dataclass(frozen=True)
class Where:
    stage: IntEnum
    detail: str
    upload: str = ""  # the multipart upload's id, once the spool is complete
    stored: tuple[int, ...] = ()  # the numbers of its parts in the bucket

    @property
    def parts(self) -> int:
        return len(self.stored)


@dataclass(frozen=True)
class Moment:
    """Kill once the agent has reached `stage` (and stored `parts`), `delay` seconds later."""

    label: str
    stage: IntEnum
    parts: int = 0
    delay: float = 0.0

    def reached(self, where: Where) -> bool:
        return where.stage > self.stage or (where.stage == self.stage and where.parts >= self.parts)


CHECKPOINT_MOMENTS = [
    Moment("on creation", Stage.WAITING),
    Moment("as the targets are recorded", Stage.RESOLVED),
    Moment("as podman is called", Stage.CHECKPOINTING),
    Moment("while CRIU dumps", Stage.DUMPING),
    Moment("while podman exports", Stage.EXPORTING),
    Moment("once the spool is complete", Stage.UPLOADING),
    Moment("after two parts", Stage.UPLOADING, parts=2),
    Moment("after three parts", Stage.UPLOADING, parts=3),
    # The last part waits a second for its turn at the capped rate.
    Moment("before the last part", Stage.UPLOADING, parts=3, delay=0.5),
    Moment("once the upload is complete", Stage.STORED),
]
RESTORE_MOMENTS = [
    Moment("on creation", RestoreStage.WAITING),
    Moment("at pickup", RestoreStage.PICKED_UP),
    Moment("as the download begins", RestoreStage.DOWNLOADING),
    # The parts are fetched side by side and written in order: nothing reaches the file until the end.
    Moment("a quarter into the download", RestoreStage.DOWNLOADING, delay=0.5),
    Moment("halfway through the download", RestoreStage.DOWNLOADING, delay=1.0),
    Moment("three quarters into the download", RestoreStage.DOWNLOADING, delay=1.5),
    Moment("once downloaded", RestoreStage.DOWNLOADED),
    Moment("as podman is called", RestoreStage.RESTORING),
    # podman reads the archive before it has the runtime restore the processes.
    Moment("while podman reads the archive", RestoreStage.RESTORING, delay=0.1),
    Moment("while CRIU restores", RestoreStage.CRIU_RESTORING),
]


class Probe:
    """An object's work folder on its node: `where` reads how far the agent has got."""

    def __init__(self, env: LocalEnv, node: str, prefix: str, name: str) -> None:
        self.root = env.nodes[node].spool_dir / "checkpointer"
        self.pattern = f"{prefix}_default_{name}_*"
        self.folder: Path | None = None

    def current(self) -> Path | None:
        """The work folder while it exists; None before it is made and after it is removed."""
        if self.folder is None:
            self.folder = next(self.root.glob(self.pattern), None)
        return self.folder if self.folder is not None and self.folder.is_dir() else None

    def where(self) -> Where:
        for _ in range(100):
            try:
                return self._where()
            except OSError:  # the agent changed the folder between two looks: look again
                time.sleep(POLL_SECONDS)
        return self._where()

    def _where(self) -> Where:
        raise NotImplementedError


class CheckpointProbe(Probe):
    def __init__(self, env: LocalEnv, node: str, name: str, container: tuple[str, str], s3: Any) -> None:
        super().__init__(env, node, "checkpoint", name)
        self.container, self.container_id = container
        self.s3 = s3
        self.bucket = env.s3.bucket

    def _where(self) -> Where:
        folder = self.current()
        if folder is None:
            return Where(Stage.ENDED, "ended") if self.folder is not None else Where(Stage.WAITING, "not picked up")
        c = self.container
        if (folder / f"{c}.spool.json").exists():
            record = folder / f"{c}.upload.json"
            upload = json.loads(record.read_text()) if record.exists() else {}
            key, upload_id = upload.get("key", ""), upload.get("upload_id", "")
            if not upload_id:
                return Where(Stage.UPLOADING, "uploading, no part stored")
            try:
                listed = self.s3.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError:  # completed (or aborted): no longer an open upload
                try:
                    self.s3.head_object(Bucket=self.bucket, Key=key)
                except ClientError:
                    return Where(Stage.UPLOADING, "uploading, the upload is gone", upload_id)
                return Where(Stage.STORED, "stored, not reported yet", upload_id)
            stored = tuple(sorted(p["PartNumber"] for p in listed.get("Parts", [])))
            return Where(Stage.UPLOADING, f"uploading, parts {list(stored)} stored", upload_id, stored)
        if (folder / f"{c}.marker").exists():
            spool = folder / f"{c}.tar.zst"
            size = spool.stat().st_size if spool.exists() else 0
            if size:
                return Where(Stage.EXPORTING, f"podman exporting, {size / MiB:.1f} MiB spooled")
            if runtime_at_work(b"checkpoint", container_id=self.container_id):
                return Where(Stage.DUMPING, "CRIU dumping, nothing spooled")
            return Where(Stage.CHECKPOINTING, "podman checkpointing, nothing spooled")
        if (folder / "targets.json").exists():
            return Where(Stage.RESOLVED, "targets recorded, podman not called")
        return Where(Stage.PICKED_UP, "picked up")


class RestoreProbe(Probe):
    def __init__(self, env: LocalEnv, node: str, name: str, local_name: str, size: int) -> None:
        super().__init__(env, node, "restore", name)
        self.local_name = local_name
        self.size = size
        # The node's restores are this series' alone: a runtime restoring in the node restores this one.
        self.pid_ns = os.readlink(f"/proc/{env.nodes[node].init_pid}/ns/pid")

    def _where(self) -> Where:
        folder = self.current()
        if folder is None:
            if self.folder is not None:
                return Where(RestoreStage.ENDED, "ended")
            return Where(RestoreStage.WAITING, "not picked up")
        if (folder / "restoring.marker").exists():
            if runtime_at_work(b"restore", pid_ns=self.pid_ns):
                return Where(RestoreStage.CRIU_RESTORING, "CRIU restoring")
            return Where(RestoreStage.RESTORING, "podman restoring")
        download = folder / self.local_name
        if not download.exists():
            return Where(RestoreStage.PICKED_UP, "picked up, not downloading yet")
        done = download.stat().st_size
        if done >= self.size:
            return Where(RestoreStage.DOWNLOADED, "downloaded, podman not called")
        return Where(RestoreStage.DOWNLOADING, f"downloading, {100 * done // self.size}% written on the node")


def kill_at(
    env: LocalEnv, node: str, resource: str, name: str, moment: Moment, probe: Probe, started: float
) -> tuple[Where, Where, float]:
    """Wait for the moment, SIGKILL the agent, read what it left, and start it again.

    Returns where the agent was seen last before the kill, what it left, and when it was killed in
    seconds after `started`.
    """
    asked = started
    while not moment.reached(where := probe.where()):
        now = time.monotonic()
        if now - asked > 2:
            asked = now
            phase = env.kubectl("get", resource, name, "-n", "default", "-o", "jsonpath={.status.phase}").stdout
            if phase.strip() in TERMINAL:
                break  # over before the moment came: the kill comes after the end
        assert now - started < MOMENT_TIMEOUT, f"{node}: {name} never got {moment.label}; last {where.detail}"
        time.sleep(POLL_SECONDS)
    if moment.delay:
        time.sleep(moment.delay)
        where = probe.where()
    kill_agent(env, node)
    killed = time.monotonic() - started
    # What the restarted agent finds: only a runtime or a podman service that outlived the agent
    # still works on, and neither writes to the agent's folder.
    left = probe.where()
    restart_agent(env, node, SETTINGS)
    return where, left, killed


# --- the series ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    node: str
    moment: str
    seen: Where  # the last look before the kill
    where: Where  # what the killed agent left, which its outcome is held to
    at: float  # seconds after the object's creation
    phase: str
    reason: str
    after: str = ""  # the container afterwards

    def __str__(self) -> str:
        left = f"; left {self.where.detail}" if self.where.detail != self.seen.detail else ""
        return (
            f"{self.node}: killed {self.moment}, {self.at:.2f}s in (saw {self.seen.detail}{left}): "
            f"{self.phase}/{self.reason}{'; ' + self.after if self.after else ''}"
        )


@dataclass
class Made:
    """What a series created, for the clean-up."""

    containers: dict[str, list[str]] = field(default_factory=lambda: {n: [] for n in NODES})
    objects: list[str] = field(default_factory=list)


def side_by_side(series: Callable[[str, threading.Event], T]) -> dict[str, T]:
    """Run `series` for each node in a thread of its own; a failure on one node stops the other early."""
    stop = threading.Event()

    def guarded(node: str) -> T:
        try:
            return series(node, stop)
        except BaseException:
            stop.set()
            raise

    with ThreadPoolExecutor(len(NODES), thread_name_prefix="kills") as pool:
        futures = {node: pool.submit(guarded, node) for node in NODES}
    errors = [e for f in futures.values() if (e := f.exception()) is not None]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise BaseExceptionGroup("the series failed on both nodes", errors)
    return {node: f.result() for node, f in futures.items()}


def report(kills: dict[str, list[Kill]], seconds: float) -> None:
    """What each kill met and how it ended (shown with -s, or with the logs of a failure)."""
    for node_kills in kills.values():
        for kill in node_kills:
            print(kill)
    print(f"{sum(map(len, kills.values()))} kills in {seconds:.0f}s")


def run_series(
    env: LocalEnv,
    series: Callable[[str, threading.Event], list[Kill]],
    wanted: tuple[IntEnum, ...],
    resource: str,
    made: Made,
) -> None:
    """Both nodes' series side by side; each must have killed at every `wanted` stage; then the invariants."""
    try:
        began = time.monotonic()
        kills = side_by_side(series)
        report(kills, time.monotonic() - began)
        for node, node_kills in kills.items():
            stages = {k.seen.stage for k in node_kills}
            for stage in wanted:
                assert stage in stages, f"{node}: no kill while {stage.name.lower()}: {[str(k) for k in node_kills]}"
        check_invariants(env, timeout=END_TIMEOUT)
    finally:
        cleanup(env, resource, made)


def cleanup(env: LocalEnv, resource: str, made: Made) -> None:
    for node, containers in made.containers.items():
        if containers:
            env.nodes[node].podman("rm", "--force", "--time", "0", *containers, check=False, timeout=120)
    # Their archives go with them, so that the invariant checks of later tests do not hash them again.
    if made.objects:
        env.kubectl("delete", resource, "-n", "default", "--wait=true", "--timeout=120s", *made.objects, check=False)


@pytest.fixture(scope="module")
def capped_agents(local_env: LocalEnv) -> Iterator[None]:
    """Both agents with a capped up- and downlink; with the environment's defaults again afterwards.
    The two start side by side."""
    side_by_side(lambda node, _: restart_agent(local_env, node, SETTINGS))
    try:
        yield
    finally:
        side_by_side(lambda node, _: restart_agent(local_env, node, None))


def test_agent_killed_at_ten_moments_of_a_checkpoint(local_env: LocalEnv, capped_agents: None) -> None:
    env = local_env
    made = Made()
    # Made here: creating S3 clients from two threads at once races in boto3's default session.
    clients = {node: env.s3.client() for node in NODES}

    def one(node: str, moment: Moment, workload: tuple[str, str]) -> Kill:
        container = workload[0]
        name = unique("ccp")
        made.objects.append(name)
        probe = CheckpointProbe(env, node, name, workload, clients[node])
        started = time.monotonic()
        apply(
            env,
            "ContainerCheckpoint",
            name,
            {"nodeName": env.nodes[node].name, "containers": [container], "export": {}},
        )
        seen, where, at = kill_at(env, node, "ccp", name, moment, probe, started)
        obj = env.wait_phase("ccp", name, TERMINAL, timeout=END_TIMEOUT)
        status, condition = obj["status"], ready(obj)
        info = inspect(env, node, container)
        state = str((info or {}).get("State", {}).get("Status"))
        given_back = next((w for w in ("restored in place", "kept running") if w in condition["message"]), "")
        after = f"container {state}" + (f", {given_back}" if given_back else "")
        kill = Kill(node, moment.label, seen, where, at, status["phase"], condition["reason"], after)
        context = f"{kill}: {condition['message']!r}"
        assert info is not None, f"{context}; container {container} is gone"
        running = bool(info["State"].get("Running"))
        if where.stage in (Stage.CHECKPOINTING, Stage.DUMPING, Stage.EXPORTING):
            # Killed with podman: no complete spool, so the container is given back, never lost.
            assert (kill.phase, kill.reason) == ("Failed", "CheckpointInterrupted"), context
            message = condition["message"]
            assert "runs again" in message or "kept running" in message, context
            assert running, context
            frozen = freezer_state(node, info)
            assert frozen == "THAWED", f"{context}; container {container} is running but its cgroup is {frozen}"
        else:
            assert kill.phase == "Succeeded", context
            [archive] = status["archives"]
            assert archive["container"] == container, context
            head = clients[node].head_object(Bucket=env.s3.bucket, Key=archive["key"])
            assert head["ContentLength"] == archive["size"], context
            # Its memory is in the bucket: running on as well, it would run twice once restored elsewhere.
            assert not running, context
            if where.upload:
                # Resumed by part: the upload open at the kill was completed, and what it held was not sent again.
                sent = parts_sent(env, archive["key"])
                assert sent, f"{context}; the S3 server's log shows no part of {archive['key']}"
                uploads = {upload for upload, _ in sent}
                assert uploads == {where.upload}, f"{context}; parts went to uploads {uploads}, not only {where.upload}"
                again = sorted(n for n in where.stored if [u for u, p in sent if p == n] != [where.upload])
                assert not again, f"{context}; parts {again}, stored before the kill, were sent again: {sent}"
        return kill

    def workload(node: str) -> tuple[str, str]:
        container = run_memory(env, node)
        made.containers[node].append(container[0])
        return container

    def series(node: str, stop: threading.Event) -> list[Kill]:
        kills = []
        # Each workload starts while the checkpoint before it ends: no kill waits for podman run.
        with ThreadPoolExecutor(1, thread_name_prefix=f"workload-{node}") as spare:
            upcoming = spare.submit(workload, node)
            for i, moment in enumerate(CHECKPOINT_MOMENTS):
                current = upcoming.result()
                if stop.is_set():
                    break
                if i + 1 < len(CHECKPOINT_MOMENTS):
                    upcoming = spare.submit(workload, node)
                kills.append(one(node, moment, current))
        return kills

    # Each node's series came into CRIU's dump, podman's export and the upload, or it proved little.
    run_series(env, series, (Stage.DUMPING, Stage.EXPORTING, Stage.UPLOADING), "ccp", made)


@dataclass(frozen=True)
class Source:
    """The archive every restore restores: a memory workload checkpointed once."""

    checkpoint: str
    key: str
    local_name: str  # its name on the node: a zstd archive is downloaded decompressed
    size: int  # on the node


@pytest.fixture(scope="module")
def source(local_env: LocalEnv) -> Iterator[Source]:
    env = local_env
    container, _ = run_memory(env, "node-a")
    name = unique("ccp")
    try:
        apply(
            env,
            "ContainerCheckpoint",
            name,
            {"nodeName": env.nodes["node-a"].name, "containers": [container], "export": {}},
        )
        status = env.wait_phase("ccp", name, TERMINAL, timeout=END_TIMEOUT)["status"]
        assert status["phase"] == "Succeeded", status
        [archive] = status["archives"]
        body = env.s3.client().get_object(Bucket=env.s3.bucket, Key=archive["key"])["Body"].read()
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body))
        size = 0
        while chunk := reader.read(MiB):
            size += len(chunk)
        yield Source(name, archive["key"], archive["key"].rsplit("/", 1)[-1].removesuffix(".zst"), size)
    finally:
        env.nodes["node-a"].podman("rm", "--force", "--time", "0", container, check=False)
        env.kubectl("delete", "ccp", name, "-n", "default", "--wait=true", "--timeout=120s", check=False)


def test_agent_killed_at_ten_moments_of_a_restore(local_env: LocalEnv, capped_agents: None, source: Source) -> None:
    env = local_env
    made = Made()

    def one(node: str, moment: Moment, before: set[str]) -> Kill:
        restored = unique("restored")
        made.containers[node].append(restored)
        name = unique("crst")
        made.objects.append(name)
        probe = RestoreProbe(env, node, name, source.local_name, source.size)
        started = time.monotonic()
        apply(
            env,
            "ContainerRestore",
            name,
            {
                "nodeName": env.nodes[node].name,
                "source": {"checkpointRef": {"name": source.checkpoint}},
                "name": restored,
            },
        )
        seen, where, at = kill_at(env, node, "crst", name, moment, probe, started)
        obj = env.wait_phase("crst", name, TERMINAL, timeout=END_TIMEOUT)
        status, condition = obj["status"], ready(obj)
        containers = containers_on(env, node)
        new = set(containers) - before
        restores = restores_of(env, node, restored)
        state = containers.get(restored, "absent")
        after = f"{restored} {state}, restored {restores} time(s)"
        kill = Kill(node, moment.label, seen, where, at, status["phase"], condition["reason"], after)
        context = f"{kill}: {condition['message']!r}"
        assert new <= {restored}, f"{context}; containers that no restore asked for: {sorted(new - {restored})}"
        assert restores <= 1, f"{context}; podman restored {restored} {restores} times"
        if where.stage in (RestoreStage.RESTORING, RestoreStage.CRIU_RESTORING):
            # Podman may have restored it, or not: the restarted agent looks, and never restores again.
            if kill.phase == "Succeeded":
                assert (state, restores) == ("running", 1), context
            else:
                assert (kill.phase, kill.reason) == ("Failed", "RestoreUndone"), context
                assert state == "absent", f"{context}; what podman left was not removed"
        else:
            assert kill.phase == "Succeeded", context
            assert status["containerName"] == restored, context
            assert restores == 1, f"{context}; podman restored {restored} {restores} times"
            assert state == "running", context
        # Nothing checks a restored container later: it would only cost memory. Removed for certain,
        # since the next restore on the node takes any container it does not know for a stray.
        if state != "absent":
            env.nodes[node].podman("rm", "--force", "--time", "0", restored)
        return kill

    def series(node: str, stop: threading.Event) -> list[Kill]:
        before = set(containers_on(env, node))
        kills = []
        for moment in RESTORE_MOMENTS:
            if stop.is_set():
                break
            kills.append(one(node, moment, before))
        return kills

    run_series(
        env, series, (RestoreStage.DOWNLOADING, RestoreStage.RESTORING, RestoreStage.CRIU_RESTORING), "crst", made
    )
