"""The data path: getting a container's memory into S3 three ways, and back onto another node.

(a) floor:     podman container checkpoint --export --compress=none to tmpfs
(b) baseline:  podman's --export --compress=<c> to disk, then boto3 upload_file to the same S3
(c) checkpointer: from creating the ContainerCheckpoint to Succeeded, archive in S3
Restore: S3 -> running container on the other node, ContainerRestore vs download_file + restore --import.

The S3 server runs on the same machine, so (b) and (c) first upload over loopback, faster than to
any object store across a network; then again with the link to it shaped to given rates.

Every figure is a spread (min, median, max) over repeated rounds. A round runs a, b and c once each,
in an order that rotates from round to round, so that drift over the invocation (the page cache,
writeback, the S3 server's disk, another tenant's CPU) lands on all three instead of on whichever
ran its repetitions last. Before every timed run the dirty page cache is written back, and the
first round of each size is a warm-up whose figures are discarded. With a baseline revision, c
runs a second time per round with the controller and the source node's agent from that revision.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes
from pyrage import x25519

from bench.stats import conditions, median, memory_kib, reset_peak, settle, spread, timer, wait_quiet
from localenv.env import ENCRYPTION_SECRET, NAMESPACE, SECRET, LocalEnv
from localenv.images import MEMORY, owned_by, wait_for_log
from localenv.procs import REPO_ROOT, run

GROUP, VERSION = "checkpointer.dev", "v1alpha1"
SOURCE, TARGET = "node-b", "node-a"
MiB = 1024 * 1024
LOOPBACK = "loopback"
# The checkpoint a fresh controller and agent make before their first timed one: small, so that it
# costs little, but through every step (podman, hashing, the upload, the API writes).
WARMUP_MIB = 16


@dataclass(frozen=True)
class Stack:
    """The controller and the source node's agent: this tree's, or those of a baseline revision
    (its operator package first on the Python path)."""

    name: str
    operator_dir: Path | None = None

    def settings(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.operator_dir)} if self.operator_dir else {}


NEW = Stack("new")


@dataclass
class Row:
    size_mib: int
    compression: str
    link: str = LOOPBACK
    floor_s: list[float] = field(default_factory=list)
    baseline_s: list[float] = field(default_factory=list)
    upload_s: list[float] = field(default_factory=list)
    checkpointer_s: list[float] = field(default_factory=list)
    archive_bytes: list[int] = field(default_factory=list)
    zstd3_bytes: int = 0
    raw_bytes: int = 0
    agent_peak_rss_mib: list[float] = field(default_factory=list)
    frozen_floor_ms: list[float] = field(default_factory=list)
    frozen_checkpointer_ms: list[float] = field(default_factory=list)
    restore_baseline_s: list[float] = field(default_factory=list)
    restore_checkpointer_s: list[float] = field(default_factory=list)
    # c again, with the baseline revision's controller and agent (empty without one).
    base_checkpointer_s: list[float] = field(default_factory=list)
    base_agent_peak_rss_mib: list[float] = field(default_factory=list)
    base_archive_bytes: list[int] = field(default_factory=list)
    # c again in every round, into a storage that encrypts (age); empty without --encryption.
    encrypted_s: list[float] = field(default_factory=list)
    encrypted_agent_peak_rss_mib: list[float] = field(default_factory=list)
    encrypted_archive_bytes: list[int] = field(default_factory=list)
    # Every timed run, warm-ups included: which it was, how long it took, the host around it.
    conditions: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        a, b, c = median(self.floor_s), median(self.baseline_s), median(self.checkpointer_s)
        rb, rc = median(self.restore_baseline_s), median(self.restore_checkpointer_s)
        size = median([float(x) for x in self.archive_bytes])
        rss = max(self.agent_peak_rss_mib) if self.agent_peak_rss_mib else None
        # The i-th run of every configuration belongs to round i: a ratio of runs of one round
        # compares runs that met the same drift, so its spread says how far one pair can be off.
        pairs_c_a = [c_i / a_i for c_i, a_i in zip(self.checkpointer_s, self.floor_s, strict=False)]
        result: dict[str, Any] = {
            "sizeMiB": self.size_mib,
            "compression": self.compression,
            "link": self.link,
            "floorSeconds": a,
            "baselineSeconds": b,
            "baselineUploadSeconds": median(self.upload_s),
            "checkpointerSeconds": c,
            "c_over_a": c / a if a else None,
            "b_over_c": b / c if c else None,
            "archiveBytes": size,
            "rawTarBytes": self.raw_bytes,
            "zstd3Bytes": self.zstd3_bytes,
            "size_over_zstd3": size / self.zstd3_bytes if self.zstd3_bytes and self.compression == "zstd" else None,
            "agentPeakRssMiB": rss,
            "frozenFloorMs": median(self.frozen_floor_ms),
            "frozenCheckpointerMs": median(self.frozen_checkpointer_ms),
            "restoreBaselineSeconds": rb,
            "restoreCheckpointerSeconds": rc,
            "restore_baseline_over_checkpointer": rb / rc if rc and rb == rb else None,
            "spread": {
                "floorSeconds": spread(self.floor_s),
                "baselineSeconds": spread(self.baseline_s),
                "baselineUploadSeconds": spread(self.upload_s),
                "checkpointerSeconds": spread(self.checkpointer_s),
                "c_over_a": spread(pairs_c_a),
                "agentPeakRssMiB": spread(self.agent_peak_rss_mib),
                "restoreBaselineSeconds": spread(self.restore_baseline_s),
                "restoreCheckpointerSeconds": spread(self.restore_checkpointer_s),
            },
        }
        if self.base_checkpointer_s:
            cb = median(self.base_checkpointer_s)
            rss_b = max(self.base_agent_peak_rss_mib)
            pairs = [n / o for n, o in zip(self.checkpointer_s, self.base_checkpointer_s, strict=False)]
            result |= {
                "baseCheckpointerSeconds": cb,
                "baseAgentPeakRssMiB": rss_b,
                "c_over_base": c / cb if cb else None,
                "rss_over_base": rss / rss_b if rss and rss_b else None,
                "baseSize_over_size": median([float(x) for x in self.base_archive_bytes]) / size if size else None,
            }
            result["spread"] |= {
                "baseCheckpointerSeconds": spread(self.base_checkpointer_s),
                "baseAgentPeakRssMiB": spread(self.base_agent_peak_rss_mib),
                "c_over_base": spread(pairs),
                "baseC_over_a": spread(
                    [c_i / a_i for c_i, a_i in zip(self.base_checkpointer_s, self.floor_s, strict=False)]
                ),
            }
        if self.encrypted_s:
            ce = median(self.encrypted_s)
            rss_e = max(self.encrypted_agent_peak_rss_mib)
            pairs = [e / p for e, p in zip(self.encrypted_s, self.checkpointer_s, strict=False)]
            result |= {
                "encryptedSeconds": ce,
                "encryptedAgentPeakRssMiB": rss_e,
                "cEncrypted_over_c": ce / c if c else None,
                "encryptedRss_over_rss": rss_e / rss if rss else None,
                "encryptedSize_over_size": median([float(x) for x in self.encrypted_archive_bytes]) / size
                if size
                else None,
            }
            result["spread"] |= {
                "encryptedSeconds": spread(self.encrypted_s),
                "encryptedAgentPeakRssMiB": spread(self.encrypted_agent_peak_rss_mib),
                "cEncrypted_over_c": spread(pairs),
            }
        result["host"] = self.host_summary()
        result["runs"] = {k: v for k, v in self.__dict__.items() if isinstance(v, list)}
        return result

    def host_summary(self) -> dict[str, dict[str, list[float]]]:
        """Per configuration, the range of each condition over its counted runs."""
        out: dict[str, dict[str, list[float]]] = {}
        for entry in self.conditions:
            if entry.get("warmup"):
                continue
            per = out.setdefault(entry["config"], {})
            for key, value in entry.items():
                if isinstance(value, float):
                    per.setdefault(key, []).append(value)
        return {cfg: {k: [min(v), max(v)] for k, v in per.items()} for cfg, per in out.items()}


def _frozen_ms(stats: dict[str, Any]) -> float:
    """CRIU's frozen time from podman's --print-stats (microseconds) in milliseconds."""
    for entry in stats.get("container_statistics") or []:
        criu = entry.get("criu_statistics") or {}
        if "frozen_time" in criu:
            return float(criu["frozen_time"]) / 1000
    return float("nan")


class TwoNodes:
    """What the benchmarks of a move share: the API server's custom objects, the bucket, the source
    and target nodes, and the memory workload a move takes from the source."""

    def __init__(self, env: LocalEnv, source: str, target: str) -> None:
        self.env = env
        api = kubernetes.config.new_client_from_config(config_file=str(env.kubeconfig))  # type: ignore[no-untyped-call]
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.s3 = env.s3.client()
        self.source = env.nodes[source]
        self.target = env.nodes[target]

    def _workload(self, size_mib: int) -> str:
        name = f"mem-{uuid.uuid4().hex[:6]}"
        self.source.podman("run", "-d", *owned_by("default"), "--name", name, MEMORY, str(size_mib))
        wait_for_log(self.source, name, "ready", timeout=120 + size_mib / 20)
        return name

    def _wait(self, plural: str, name: str, timeout: float = 900, poll: float = 0.05) -> dict[str, Any]:
        """The object once Succeeded; RuntimeError once Failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, "default", plural, name)  # type: ignore[assignment]
            phase = (obj.get("status") or {}).get("phase")
            if phase == "Failed":
                raise RuntimeError(f"{plural}/{name} failed: {json.dumps(obj['status'])[:2000]}")
            if phase == "Succeeded":
                return obj
            time.sleep(poll)
        raise TimeoutError(f"{plural}/{name} did not finish in {timeout}s")

    def _create(self, plural: str, kind: str, name: str, spec: dict[str, Any], **meta: Any) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name, **meta}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, "default", plural, body)


class DataPath(TwoNodes):
    def __init__(
        self,
        env: LocalEnv,
        repeats: int,
        *,
        warmup: int = 1,
        settle: str = "sync",
        quiet_below: float = 0.0,
        agent_settings: dict[str, str] | None = None,
        baseline: Stack | None = None,
        encrypted_storage: str | None = None,
    ) -> None:
        self.repeats = repeats
        self.warmup = warmup
        self.settle_mode = settle
        self.quiet_below = quiet_below
        self.agent_settings = agent_settings or {}
        self.baseline = baseline
        self.encrypted_storage = encrypted_storage
        self.stack = NEW
        super().__init__(env, SOURCE, TARGET)
        agent = next(p for p in env.supervisor.processes if p.name == f"agent-{SOURCE}")
        self.agent_pid = agent.popen.pid
        self.rounds = 0
        self._zstd3: dict[int, tuple[int, int]] = {}

    # --- helpers --------------------------------------------------------------------------------

    @contextmanager
    def _timed(self, row: Row, config: str, warmup: bool) -> Iterator[Callable[[], float]]:
        """Settles the page cache, waits for the host to be quiet, then times the block and keeps the
        host's conditions around it."""
        settled = settle(drop_caches=self.settle_mode == "drop") if self.settle_mode != "none" else {}
        if self.quiet_below > 0:
            settled |= wait_quiet(self.quiet_below)
            if settled["busyBefore"] >= self.quiet_below:
                print(f"{config}: the host stayed {settled['busyBefore']:.0%} busy, measuring anyway", flush=True)
        with conditions() as host, timer() as took:
            yield took
        row.conditions.append(
            {"config": config, "round": self.rounds, "warmup": warmup, "seconds": took(), **settled, **host}
        )

    def _delete_checkpoint(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", "containercheckpoints", name)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                self.custom.get_namespaced_custom_object(GROUP, VERSION, "default", "containercheckpoints", name)
            except kubernetes.client.ApiException as e:
                if e.status == 404:
                    return
                raise
            time.sleep(0.2)

    def use(self, stack: Stack) -> None:
        """Run the controller and the source node's agent of `stack`.

        Both are started afresh, then make one small checkpoint before any timed one: the first
        checkpoint of a new process pays for imports and new connections, which a long-running
        agent paid once at start. The target node's agent stays; only c is compared.
        """
        if stack == self.stack:
            return
        self.env.supervisor.stop(f"agent-{SOURCE}")
        self.env.supervisor.stop("controller")
        self.env.start_controller(stack.settings())
        agent = self.env.start_agent(SOURCE, {**self.agent_settings, **stack.settings()})
        self.agent_pid = agent.popen.pid
        self.stack = stack
        # The Lease the agent start waits for may be its predecessor's: this checkpoint is what
        # shows that the new controller and agent both work.
        scratch = Row(WARMUP_MIB, "zstd")
        self.checkpointer(scratch, warmup=True, timeout=300)

    # --- the three ways in ----------------------------------------------------------------------

    def floor(self, row: Row, warmup: bool = False) -> None:
        name = self._workload(row.size_mib)
        inside = "/tmp/floor.tar"  # the node's /tmp is a tmpfs
        with self._timed(row, "a", warmup) as took:
            out = self.source.podman(
                "container", "checkpoint", f"--export={inside}", "--compress=none", "--print-stats", name, timeout=1800
            )
        row.floor_s.append(took())
        row.frozen_floor_ms.append(_frozen_ms(json.loads(out.stdout.decode() or "{}")))
        tar = Path(f"/proc/{self.source.init_pid}/root{inside}")
        if row.size_mib not in self._zstd3:
            zstd = subprocess.run(["zstd", "-3", "-T0", "-c", str(tar)], stdout=subprocess.PIPE, check=True)
            self._zstd3[row.size_mib] = (tar.stat().st_size, len(zstd.stdout))
        row.raw_bytes, row.zstd3_bytes = self._zstd3[row.size_mib]
        tar.unlink()
        self.source.podman("rm", "-f", name)

    def baseline_script(self, row: Row, warmup: bool = False) -> None:
        name = self._workload(row.size_mib)
        suffix = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}[row.compression]
        path = self.source.spool_dir / f"baseline{suffix}"  # on disk, the same path inside and outside
        key = f"bench/baseline/{name}{suffix}"
        with self._timed(row, "b", warmup) as took:
            self.source.podman(
                "container", "checkpoint", f"--export={path}", f"--compress={row.compression}", name, timeout=1800
            )
            with timer() as upload:
                self.s3.upload_file(str(path), self.env.s3.bucket, key)
        row.baseline_s.append(took())
        row.upload_s.append(upload())
        path.unlink()
        self.s3.delete_object(Bucket=self.env.s3.bucket, Key=key)
        self.source.podman("rm", "-f", name)

    def checkpointer(
        self, row: Row, keep: bool = False, warmup: bool = False, timeout: float = 900, encrypted: bool = False
    ) -> str:
        name = self._workload(row.size_mib)
        ccp = f"bench-{uuid.uuid4().hex[:8]}"
        base = self.stack != NEW
        export = {"storageRef": {"name": self.encrypted_storage}} if encrypted else {}
        spec = {"nodeName": SOURCE, "containers": [name], "export": export, "compress": row.compression}
        reset_peak(self.agent_pid)
        with self._timed(row, "c-encrypted" if encrypted else "c-base" if base else "c", warmup) as took:
            self._create("containercheckpoints", "ContainerCheckpoint", ccp, spec)
            obj = self._wait("containercheckpoints", ccp, timeout)
        rss = memory_kib(self.agent_pid, "VmHWM") / 1024
        archive = obj["status"]["archives"][0]
        if encrypted:
            assert archive["key"].endswith(".age"), archive
            row.encrypted_s.append(took())
            row.encrypted_agent_peak_rss_mib.append(rss)
            row.encrypted_archive_bytes.append(int(archive["size"]))
        elif base:
            row.base_checkpointer_s.append(took())
            row.base_agent_peak_rss_mib.append(rss)
            row.base_archive_bytes.append(int(archive["size"]))
        else:
            row.checkpointer_s.append(took())
            row.agent_peak_rss_mib.append(rss)
            row.archive_bytes.append(int(archive["size"]))
            row.frozen_checkpointer_ms.append(_frozen_ms(archive.get("stats") or {}))
        self.source.podman("rm", "-f", name)
        if not keep:
            self._delete_checkpoint(ccp)
        return ccp

    # --- and back out on the other node ---------------------------------------------------------

    def restore(self, row: Row, ccp: str) -> None:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, "default", "containercheckpoints", ccp)
        archive = obj["status"]["archives"][0]  # type: ignore[index]
        container = archive["container"]
        for _ in range(self.repeats):
            crst = f"bench-{uuid.uuid4().hex[:8]}"
            with self._timed(row, "restore-c", False) as took:
                self._create(
                    "containerrestores",
                    "ContainerRestore",
                    crst,
                    {"nodeName": TARGET, "source": {"checkpointRef": {"name": ccp}}},
                )
                self._wait("containerrestores", crst)
            row.restore_checkpointer_s.append(took())
            self.target.podman("rm", "-f", container)
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", "containerrestores", crst)

            path = self.target.spool_dir / Path(archive["key"]).name
            with self._timed(row, "restore-b", False) as took:
                self.s3.download_file(self.env.s3.bucket, archive["key"], str(path))
                self.target.podman("container", "restore", f"--import={path}", timeout=1800)
            row.restore_baseline_s.append(took())
            path.unlink()
            self.target.podman("rm", "-f", container)

    def round(self, row: Row, warmup: bool, keep: bool) -> str | None:
        """a, b and c once each (and c with the baseline's stack), in an order that rotates with
        every round. The two c's run back to back, the stack in use first: one switch per round,
        and which of them follows the switch alternates."""
        kept: list[str] = []

        def c() -> None:
            stacks = [self.stack, self.baseline if self.stack == NEW else NEW] if self.baseline else [NEW]
            for stack in stacks:
                assert stack is not None
                self.use(stack)
                # With encryption, c into the encrypting storage runs beside c, first every other round.
                encrypting = self.encrypted_storage is not None and stack == NEW and row.link == LOOPBACK
                order = ([True, False] if self.rounds % 2 == 0 else [False, True]) if encrypting else [False]
                for encrypted in order:
                    keeping = keep and stack == NEW and not encrypted
                    ccp = self.checkpointer(row, keep=keeping, warmup=warmup, encrypted=encrypted)
                    if keeping:
                        kept.append(ccp)

        steps: list[Callable[[], None]] = [
            lambda: self.floor(row, warmup),
            lambda: self.baseline_script(row, warmup),
            c,
        ]
        shift = self.rounds % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step()
        self.rounds += 1
        return kept[0] if kept else None

    def measure(self, size_mib: int, compressions: list[str], links: list[str], restore: bool) -> list[Row]:
        """Every compression over loopback, with a restore of the zstd archive; then zstd over each
        shaped link (no restore: it would measure the link on both sides). The warm-up rounds run
        before the first row of the size only: what they warm (the workload's allocation, podman's
        and the agents' first calls, the page cache) stays warm for the next rows."""
        rows = [Row(size_mib, c) for c in compressions] + [Row(size_mib, "zstd", link) for link in links]
        port = urlparse(self.env.s3.endpoint).port or 80
        for i, row in enumerate(rows):
            keep = restore and row.compression == "zstd" and row.link == LOOPBACK
            kept = None
            with shaped_link(port, row.link):
                warm = self.warmup if i == 0 else 0
                for r in range(warm + self.repeats):
                    if r < warm:
                        scratch = Row(row.size_mib, row.compression, row.link)
                        self.round(scratch, warmup=True, keep=False)
                        row.conditions += scratch.conditions
                    else:
                        kept = self.round(row, warmup=False, keep=keep and r == warm + self.repeats - 1) or kept
            if kept:
                self.use(NEW)
                self.restore(row, kept)
                self._delete_checkpoint(kept)
            summary = row.summary()
            print(json.dumps({k: v for k, v in summary.items() if k not in ("runs", "host")}), flush=True)
        return rows


@contextmanager
def baseline_tree(rev: str) -> Iterator[Stack]:
    """The operator package of revision `rev`, in a git worktree under a temporary directory that
    goes away afterwards, for `DataPath(baseline=...)`."""
    tmp = Path(tempfile.mkdtemp(prefix="checkpointer-baseline-"))
    tree = tmp / "tree"
    git = ["git", "-C", str(REPO_ROOT)]
    # A run that was killed leaves the entry of a worktree whose directory is gone.
    run([*git, "worktree", "prune"])
    run([*git, "worktree", "add", "--detach", "--quiet", str(tree), rev])
    try:
        stack = Stack(f"base-{rev}", tree / "operator")
        # The package must come from the worktree, not from this tree's editable install.
        where = run(
            [sys.executable, "-c", "import checkpointer; print(checkpointer.__file__)"],
            env={**os.environ, **stack.settings()},
        )
        if not where.stdout.decode().strip().startswith(str(tree)):
            raise RuntimeError(f"checkpointer imports from {where.stdout.decode().strip()}, not from {tree}")
        yield stack
    finally:
        run([*git, "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        run([*git, "worktree", "prune"], check=False)


@contextmanager
def encrypting_storage(env: LocalEnv) -> Iterator[str]:
    """A CheckpointStorage on the environment's bucket that encrypts to a fresh age key; yields its name."""
    identity = x25519.Identity.generate()
    name = "bench-encrypted"
    env.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": ENCRYPTION_SECRET, "namespace": NAMESPACE},
            "stringData": {"recipients": f"{identity.to_public()}\n", "identity": f"{identity}\n"},
        },
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CheckpointStorage",
            "metadata": {"name": name},
            "spec": {
                "bucket": env.s3.bucket,
                "endpoint": env.s3.endpoint,
                "region": env.s3.region,
                "forcePathStyle": True,
                "credentialsSecretRef": {"namespace": NAMESPACE, "name": SECRET},
                "encryption": {"secretRef": {"namespace": NAMESPACE, "name": ENCRYPTION_SECRET}},
            },
        },
    )
    deadline = time.monotonic() + 60
    while env.kubectl("get", "cks", name, "-o", "jsonpath={.status.phase}").stdout.strip() != "Available":
        if time.monotonic() > deadline:
            raise TimeoutError(f"CheckpointStorage {name} did not become Available")
        time.sleep(0.5)
    try:
        yield name
    finally:
        env.kubectl("delete", "cks", name, "--ignore-not-found", check=False)


@contextmanager
def shaped_link(port: int, rate: str) -> Iterator[None]:
    """Traffic to the S3 server's port limited to `rate` (in tc's units: 1gbit), as to an object
    store across a network. The nodes share the host's network, so every upload, the agents' and
    boto3's, goes through loopback; other traffic (the API server's) is not shaped."""
    if rate == LOOPBACK:
        yield
        return

    def tc(command: str, check: bool = True) -> None:
        # Without check, the only failure is a missing qdisc: nothing to say.
        subprocess.run(["tc", *command.split()], check=check, stderr=None if check else subprocess.DEVNULL)

    tc("qdisc del dev lo root", check=False)  # one a killed run left behind
    tc("qdisc add dev lo root handle 1: htb")
    try:
        # Loopback's packets are up to 64 KiB: a burst and quantum below that would stall the class.
        tc(f"class add dev lo parent 1: classid 1:1 htb rate {rate} ceil {rate} burst 256k cburst 256k quantum 65536")
        tc(f"filter add dev lo parent 1: protocol ip prio 1 u32 match ip dport {port} 0xffff flowid 1:1")
        yield
    finally:
        tc("qdisc del dev lo root", check=False)


def run_folder(parent: Path, prefix: str) -> Path:
    """A folder of this run's own under `parent`: a control plane left by an earlier run holds objects
    of an older chart, which a newer one cannot update."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


@contextmanager
def reflink_filesystem(where: Path, size_gib: int) -> Iterator[Path]:
    """An XFS filesystem with reflinks, in a sparse file mounted at `where`, for the S3 server's files.

    Completing a multipart upload is a metadata operation on a real object store; the local S3
    server assembles the parts with copy_file_range, which copies every byte on ext4 (1.2 to 1.6 s
    per 512 MiB here) but clones them on XFS. Baseline and checkpointer both complete uploads.
    """
    image = where.with_name(where.name + ".xfs")
    image.parent.mkdir(parents=True, exist_ok=True)
    image.touch()
    os.truncate(image, size_gib << 30)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=False)
        image.unlink()


def os_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": os.uname().release}
