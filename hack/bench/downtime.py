"""Downtime of a move from one node to another: container stopped on the source -> running on the target.

Three ways, in interleaved rounds of one invocation (the order rotates from round to round):

(m) checkpointer: one ContainerMigration to the other node. The checkpoint it makes streams its
    parts, and the restore it creates with it reads them as they land while podman imports
    (services/pipeline.py).
(s) the script a user would write: `podman container checkpoint --export --compress zstd` to disk,
    boto3 upload_file, boto3 download_file on the other node, `podman container restore --import`.
(f) the local floor: `--export --compress none` to tmpfs and `--import` of it on the same node.

Downtime for (m) is the migration's own: from its frozenTime (CRIU froze the container on the
source, the source agent's clock) to its runningTime (podman returned with it running on the target,
the target agent's clock). The benchmark also records what it observes itself, from creating the
migration to seeing it Succeeded (`observedSeconds`), which adds the scheduling before the freeze
and the controller's last step after the restore. (s) and (f) are timed around the commands. Where
the time goes inside (m) comes from the agents' own timestamps: status startTime and completionTime
of the checkpoint and restore the migration made, and their step lines (checkpoint, upload,
first-part, restore).

With --cpu, each move of (m) also reports the CPU seconds each process took from creating the
migration to seeing it Succeeded: each agent's own threads, the podman and CRIU it ran, the S3
server, kube-apiserver, etcd, the controller and the benchmark (stats.tree_cpu_seconds). On two
cores a move is bound by CPU, and CPU seconds move far less than wall time with what else runs.

Both agents run the CLI runtime (podman compresses the export, and a FIFO feeds the import).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes

from bench.datapath import GROUP, LOOPBACK, VERSION, TwoNodes, reflink_filesystem, run_folder, shaped_link
from bench.stats import cpu_used, median, memory_kib, reset_peak, settle, spread, timer, tree_cpu_seconds
from localenv.env import LocalEnv
from localenv.procs import REPO_ROOT

SOURCE, TARGET = "node-a", "node-b"
# The processes whose CPU a move takes (--cpu), by the supervisor's names; "bench" is this process
# (its watch of the migration).
CPU_ROLES = {
    "sourceAgent": f"agent-{SOURCE}",
    "targetAgent": f"agent-{TARGET}",
    "s3": "s3",
    "apiserver": "kube-apiserver",
    "etcd": "etcd",
    "controller": "controller",
}


def _time(value: str | None) -> float:
    if not value:
        return float("nan")
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class Downtime(TwoNodes):
    def __init__(self, env: LocalEnv) -> None:
        super().__init__(env, SOURCE, TARGET)
        for name in (SOURCE, TARGET):
            env.supervisor.stop(f"agent-{name}")
            env.start_agent(name, {"CHECKPOINTER_PODMAN_MODE": "cli"})
        self.rounds = 0
        self.cpu = False

    def _agent_pid(self, node: str) -> int:
        return next(p for p in self.env.supervisor.processes if p.name == f"agent-{node}").popen.pid

    def _cpu_roots(self) -> dict[str, int]:
        alive = {p.name: p.popen.pid for p in self.env.supervisor.processes if p.alive()}
        roots = {role: alive[name] for role, name in CPU_ROLES.items() if name in alive}
        return roots | {"bench": os.getpid()}

    def _cpu_table(self, used: dict[str, float]) -> dict[str, float]:
        """CPU seconds per role of one move: each agent's own threads apart from its podman and CRIU
        (the processes it started)."""
        table = {
            "sourcePodmanCriu": used.get("sourceAgent+children", 0.0),
            "sourceAgent": used.get("sourceAgent", 0.0),
            "s3": used.get("s3", 0.0) + used.get("s3+children", 0.0),
            "targetAgent": used.get("targetAgent", 0.0),
            "targetPodmanCriu": used.get("targetAgent+children", 0.0),
            "apiserver": used.get("apiserver", 0.0),
            "etcd": used.get("etcd", 0.0),
            "controller": used.get("controller", 0.0) + used.get("controller+children", 0.0),
            "bench": used.get("bench", 0.0),
        }
        table["total"] = round(sum(table.values()), 2)
        return {k: round(v, 2) for k, v in table.items()}

    def _get(self, plural: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, "default", plural, name)  # type: ignore[return-value]

    def _watch(self, plural: str, name: str, timeout: float) -> dict[str, Any]:
        """The object once Succeeded, seen through a watch; RuntimeError once Failed. Not polled: on two
        cores, a GET every few milliseconds takes from the move the CPU of the API server and of this
        process that the move itself needs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Without a resourceVersion the watch starts with the object as it is: nothing is missed.
            for event in kubernetes.watch.Watch().stream(  # type: ignore[no-untyped-call]
                self.custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                "default",
                plural,
                field_selector=f"metadata.name={name}",
                timeout_seconds=max(1, int(deadline - time.monotonic())),
            ):
                obj: dict[str, Any] = event["object"]
                phase = (obj.get("status") or {}).get("phase")
                if phase == "Failed":
                    raise RuntimeError(f"{plural}/{name} failed: {json.dumps(obj['status'])[:2000]}")
                if phase == "Succeeded":
                    return obj
        raise TimeoutError(f"{plural}/{name} did not finish in {timeout}s")

    def _delete(self, plural: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, "default", plural, name)

    def checkpointer(self, size_mib: int) -> dict[str, Any]:
        name = self._workload(size_mib)
        mig = f"mig-{uuid.uuid4().hex[:8]}"
        pids = {node: self._agent_pid(node) for node in (SOURCE, TARGET)}
        for pid in pids.values():
            reset_peak(pid)
        settle()
        roots = self._cpu_roots() if self.cpu else {}
        cpu_before = tree_cpu_seconds(roots)
        since = time.time()
        with timer() as took:
            spec = {"source": {"nodeName": SOURCE, "container": name}, "targetNodeName": TARGET, "compress": "zstd"}
            self._create("containermigrations", "ContainerMigration", mig, spec)
            moved = self._watch("containermigrations", mig, timeout=1800)
        observed = took()
        cpu = self._cpu_table(cpu_used(cpu_before, tree_cpu_seconds(roots))) if self.cpu else None
        ms = moved["status"]
        ccp, crst = ms["checkpointRef"]["name"], ms["restoreRef"]["name"]
        cs = self._get("containercheckpoints", ccp)["status"]
        rs = self._get("containerrestores", crst)["status"]
        result = {
            # The migration's downtimeSeconds, unrounded: frozenTime -> runningTime.
            "seconds": _time(ms.get("runningTime")) - _time(ms.get("frozenTime")),
            "observedSeconds": observed,
            "sourceRssMiB": memory_kib(pids[SOURCE], "VmHWM") / 1024,
            "targetRssMiB": memory_kib(pids[TARGET], "VmHWM") / 1024,
            "archiveBytes": int(cs["archives"][0]["size"]),
            # The agents' own clocks, relative to the creation of the migration.
            "checkpointStart": _time(cs.get("startTime")) - since,
            "frozen": _time(ms.get("frozenTime")) - since,
            "checkpointDone": _time(cs.get("completionTime")) - since,
            "restoreStart": _time(rs.get("startTime")) - since,
            "running": _time(ms.get("runningTime")) - since,
            "restoreDone": _time(rs.get("completionTime")) - since,
            "steps": self._steps(ccp, crst),
        }
        if cpu is not None:
            # From creating the migration to seeing it Succeeded, CPU seconds per role.
            result["cpuSeconds"] = cpu
        self.target.podman("rm", "-f", name)
        self.source.podman("rm", "-f", name)
        # Its checkpoint and restore are its own: the garbage collector deletes them with it.
        self._delete("containermigrations", mig)
        return result

    def _steps(self, ccp: str, crst: str) -> dict[str, float]:
        """The agents' step lines of the two objects: each step's duration in seconds."""
        found: dict[str, float] = {}
        for process, name, kind in (
            (f"agent-{SOURCE}", ccp, "checkpoint"),
            ("controller", ccp, "checkpoint"),  # its signing
            (f"agent-{TARGET}", crst, "restore"),
        ):
            log = self.env.workdir / "logs" / f"{process}.log"
            if not log.exists():
                continue
            for line in log.read_text(errors="replace").splitlines():
                if f"{kind} default/{name} " not in line:
                    continue
                step = re.search(r" step=(\S+)", line)
                took = re.search(r" took=([0-9.]+)", line)
                if step and took:
                    found[f"{kind}.{step[1]}"] = float(took[1])
        return found

    def script(self, size_mib: int) -> float:
        name = self._workload(size_mib)
        path = self.source.spool_dir / f"{name}.tar.zst"
        there = self.target.spool_dir / f"{name}.tar.zst"
        # Not shaped as a checkpoint's key (<namespace>/<folder>/<container>.tar…): the agents' bucket
        # sweep aborts open uploads of such keys that no checkpoint writes.
        key = f"bench-script/{name}.tar.zst.script"
        settle()
        with timer() as took:
            self.source.podman("container", "checkpoint", f"--export={path}", "--compress=zstd", name, timeout=1800)
            self.s3.upload_file(str(path), self.env.s3.bucket, key)
            self.s3.download_file(self.env.s3.bucket, key, str(there))
            self.target.podman("container", "restore", f"--import={there}", timeout=1800)
        seconds = took()
        path.unlink()
        there.unlink()
        self.s3.delete_object(Bucket=self.env.s3.bucket, Key=key)
        self.target.podman("rm", "-f", name)
        self.source.podman("rm", "-f", name)
        return seconds

    def floor(self, size_mib: int) -> float:
        name = self._workload(size_mib)
        inside = "/tmp/floor.tar"  # the node's /tmp is a tmpfs
        settle()
        with timer() as exported:
            self.source.podman("container", "checkpoint", f"--export={inside}", "--compress=none", name, timeout=1800)
        # On another node the name and ID are free: here the stopped original holds them (not timed).
        self.source.podman("rm", "-f", name)
        with timer() as imported:
            self.source.podman("container", "restore", f"--import={inside}", timeout=1800)
        seconds = exported() + imported()
        self.source.podman("rm", "-f", name)
        Path(f"/proc/{self.source.init_pid}/root{inside}").unlink()
        return seconds

    def row(self, size_mib: int, link: str, repeats: int, warmup: int) -> dict[str, Any]:
        runs: dict[str, list[Any]] = {"m": [], "s": [], "f": []}
        port = urlparse(self.env.s3.endpoint).port or 80
        with shaped_link(port, link):
            for r in range(warmup + repeats):
                steps = [("f", self.floor), ("s", self.script), ("m", self.checkpointer)]
                shift = self.rounds % len(steps)
                for key, way in steps[shift:] + steps[:shift]:
                    value = way(size_mib)
                    if r >= warmup:
                        runs[key].append(value)
                    print(
                        f"{size_mib} MiB {link} round {r}{' (warm-up)' if r < warmup else ''} {key}: "
                        f"{value['seconds'] if isinstance(value, dict) else value:.2f}s"
                        + (
                            f" cpu {json.dumps(value['cpuSeconds'])}"
                            if isinstance(value, dict) and "cpuSeconds" in value
                            else ""
                        ),
                        flush=True,
                    )
                self.rounds += 1
        m = [x["seconds"] for x in runs["m"]]
        observed = [x["observedSeconds"] for x in runs["m"]]
        f, s = runs["f"], runs["s"]
        size = median([float(x["archiveBytes"]) for x in runs["m"]])
        summary: dict[str, Any] = {
            "sizeMiB": size_mib,
            "link": link,
            "checkpointerSeconds": spread(m) | {"median": median(m)},
            "observedSeconds": spread(observed) | {"median": median(observed)},
            "scriptSeconds": spread(s) | {"median": median(s)},
            "floorSeconds": spread(f) | {"median": median(f)},
            "m_over_f": spread([a / b for a, b in zip(m, f, strict=False)]) | {"median": median(m) / median(f)},
            "m_over_s": spread([a / b for a, b in zip(m, s, strict=False)]) | {"median": median(m) / median(s)},
            "archiveBytes": size,
            # Where (m)'s time went, by the agents' and the controller's own clocks (medians).
            "steps": {
                step: median([x["steps"][step] for x in runs["m"] if step in x["steps"]])
                for step in sorted({k for x in runs["m"] for k in x["steps"]})
            },
            "timeline": {
                point: median([x[point] for x in runs["m"]])
                for point in ("checkpointStart", "frozen", "checkpointDone", "restoreStart", "running", "restoreDone")
            },
            "sourceRssMiB": max(x["sourceRssMiB"] for x in runs["m"]),
            **(
                {
                    "cpuSeconds": {
                        role: median([x["cpuSeconds"][role] for x in runs["m"]]) for role in runs["m"][0]["cpuSeconds"]
                    }
                }
                if runs["m"] and "cpuSeconds" in runs["m"][0]
                else {}
            ),
            "targetRssMiB": max(x["targetRssMiB"] for x in runs["m"]),
            "runs": runs,
        }
        if link != LOOPBACK:
            rate = _rate(link)
            summary["linkBound"] = median(f) + 1.2 * size * 8 / rate
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
        return summary


def _rate(link: str) -> float:
    """tc's rate (1gbit, 500mbit) in bits per second."""
    match = re.fullmatch(r"([0-9.]+)([kmg]?)bit", link)
    if match is None:
        raise ValueError(f"{link!r} is not a rate such as 1gbit")
    return float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--links", nargs="+", default=[LOOPBACK, "1gbit"])
    parser.add_argument("--repeats", type=int, default=2, help="counted rounds per row (4 GiB rounds are slow)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before the first row")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="also the CPU seconds each process of (m) takes (agents, their podman and CRIU, S3, API server)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "_output" / "bench")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where its run's own folder is made")
    args = parser.parse_args()
    # Stopped, it still tears its environment down (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    data = run_folder(args.workdir, "checkpointer-downtime-")
    with reflink_filesystem(data / "s3", 8 + 2 * max(args.sizes) // 256):
        env = LocalEnv.up(data, [SOURCE, TARGET])
        try:
            bench = Downtime(env)
            bench.cpu = args.cpu
            for i, size in enumerate(args.sizes):
                for j, link in enumerate(args.links):
                    warm = args.warmup if (i, j) == (0, 0) else 0
                    rows.append(bench.row(size, link, args.repeats, warm))
        finally:
            env.down()
    (args.out / "downtime.json").write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
