"""The data path: getting a container's memory into S3 three ways, and back onto another node.

(a) floor:     podman container checkpoint --export --compress=none to tmpfs
(b) baseline:  podman's --export --compress=<c> to disk, then boto3 upload_file to the same S3
(c) checkpointer: from creating the ContainerCheckpoint to Succeeded, archive in S3
Restore: S3 -> running container on the other node, ContainerRestore vs download_file + restore --import.

The S3 server runs on the same machine, so (b) and (c) first upload over loopback, faster than to
any object store across a network; then again with the link to it shaped to given rates.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes

from bench.stats import median, memory_kib, reset_peak, timer
from localenv.env import LocalEnv
from localenv.images import MEMORY, wait_for_log

GROUP, VERSION = "checkpointer.dev", "v1alpha1"
SOURCE, TARGET = "node-b", "node-a"
MiB = 1024 * 1024
LOOPBACK = "loopback"


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

    def summary(self) -> dict[str, Any]:
        a, b, c = median(self.floor_s), median(self.baseline_s), median(self.checkpointer_s)
        rb, rc = median(self.restore_baseline_s), median(self.restore_checkpointer_s)
        size = median([float(x) for x in self.archive_bytes])
        return {
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
            "agentPeakRssMiB": max(self.agent_peak_rss_mib) if self.agent_peak_rss_mib else None,
            "frozenFloorMs": median(self.frozen_floor_ms),
            "frozenCheckpointerMs": median(self.frozen_checkpointer_ms),
            "restoreBaselineSeconds": rb,
            "restoreCheckpointerSeconds": rc,
            "restore_baseline_over_checkpointer": rb / rc if rc and rb == rb else None,
            "runs": {k: v for k, v in self.__dict__.items() if isinstance(v, list)},
        }


def _frozen_ms(stats: dict[str, Any]) -> float:
    """CRIU's frozen time from podman's --print-stats (microseconds) in milliseconds."""
    for entry in stats.get("container_statistics") or []:
        criu = entry.get("criu_statistics") or {}
        if "frozen_time" in criu:
            return float(criu["frozen_time"]) / 1000
    return float("nan")


class DataPath:
    def __init__(self, env: LocalEnv, repeats: int) -> None:
        self.env = env
        self.repeats = repeats
        api = kubernetes.config.new_client_from_config(config_file=str(env.kubeconfig))  # type: ignore[no-untyped-call]
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.s3 = env.s3.client()
        self.source = env.nodes[SOURCE]
        self.target = env.nodes[TARGET]
        agent = next(p for p in env.supervisor.processes if p.name == f"agent-{SOURCE}")
        self.agent_pid = agent.popen.pid

    # --- helpers --------------------------------------------------------------------------------

    def _workload(self, size_mib: int) -> str:
        name = f"mem-{uuid.uuid4().hex[:6]}"
        self.source.podman("run", "-d", "--name", name, MEMORY, str(size_mib))
        wait_for_log(self.source, name, "ready", timeout=120 + size_mib / 20)
        return name

    def _wait(self, plural: str, name: str, timeout: float = 900) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, "default", plural, name)  # type: ignore[assignment]
            phase = (obj.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                if phase == "Failed":
                    raise RuntimeError(f"{plural}/{name} failed: {json.dumps(obj['status'])[:2000]}")
                return obj
            time.sleep(0.05)
        raise TimeoutError(f"{plural}/{name} did not finish in {timeout}s")

    def _create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, "default", plural, body)

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

    # --- the three ways in ----------------------------------------------------------------------

    def floor(self, row: Row) -> None:
        name = self._workload(row.size_mib)
        inside = "/tmp/floor.tar"  # the node's /tmp is a tmpfs
        with timer() as took:
            out = self.source.podman(
                "container", "checkpoint", f"--export={inside}", "--compress=none", "--print-stats", name, timeout=1800
            )
        row.floor_s.append(took())
        row.frozen_floor_ms.append(_frozen_ms(json.loads(out.stdout.decode() or "{}")))
        tar = Path(f"/proc/{self.source.init_pid}/root{inside}")
        if not row.raw_bytes:
            row.raw_bytes = tar.stat().st_size
            zstd = subprocess.run(["zstd", "-3", "-T0", "-c", str(tar)], stdout=subprocess.PIPE, check=True)
            row.zstd3_bytes = len(zstd.stdout)
        tar.unlink()
        self.source.podman("rm", "-f", name)

    def baseline(self, row: Row) -> None:
        name = self._workload(row.size_mib)
        suffix = {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}[row.compression]
        path = self.source.spool_dir / f"baseline{suffix}"  # on disk, the same path inside and outside
        key = f"bench/baseline/{name}{suffix}"
        with timer() as took:
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

    def checkpointer(self, row: Row, keep: bool = False) -> str:
        name = self._workload(row.size_mib)
        ccp = f"bench-{uuid.uuid4().hex[:8]}"
        reset_peak(self.agent_pid)
        spec = {"nodeName": SOURCE, "containers": [name], "export": {}, "compress": row.compression}
        with timer() as took:
            self._create("containercheckpoints", "ContainerCheckpoint", ccp, spec)
            obj = self._wait("containercheckpoints", ccp)
        row.checkpointer_s.append(took())
        row.agent_peak_rss_mib.append(memory_kib(self.agent_pid, "VmHWM") / 1024)
        archive = obj["status"]["archives"][0]
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
            with timer() as took:
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
            with timer() as took:
                self.s3.download_file(self.env.s3.bucket, archive["key"], str(path))
                self.target.podman("container", "restore", f"--import={path}", timeout=1800)
            row.restore_baseline_s.append(took())
            path.unlink()
            self.target.podman("rm", "-f", container)

    def measure(self, size_mib: int, compressions: list[str], links: list[str], restore: bool) -> list[Row]:
        """Every compression over loopback, with a restore of the zstd archive; then zstd over each
        shaped link (no restore: it would measure the link on both sides)."""
        rows = [Row(size_mib, c) for c in compressions] + [Row(size_mib, "zstd", link) for link in links]
        floor = Row(size_mib, "none")
        for _ in range(self.repeats):
            self.floor(floor)
        port = urlparse(self.env.s3.endpoint).port or 80
        for row in rows:
            row.floor_s, row.frozen_floor_ms = floor.floor_s, floor.frozen_floor_ms
            row.raw_bytes, row.zstd3_bytes = floor.raw_bytes, floor.zstd3_bytes
            keep = restore and row.compression == "zstd" and row.link == LOOPBACK
            with shaped_link(port, row.link):
                for _ in range(self.repeats):
                    self.baseline(row)
                for i in range(self.repeats):
                    kept = self.checkpointer(row, keep=keep and i == self.repeats - 1)
            if keep:
                self.restore(row, kept)
                self._delete_checkpoint(kept)
            print(json.dumps({k: v for k, v in row.summary().items() if k != "runs"}), flush=True)
        return rows


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
