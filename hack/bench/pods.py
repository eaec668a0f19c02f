"""A Pod's container into S3, two ways, in interleaved rounds of one invocation, on the nodes with a kubelet.

(s) the script a user would write: the kubelet's checkpoint API straight at the node's kubelet,
    `POST https://<node address>:<kubelet port>/checkpoint/<namespace>/<pod>/<container>`, with a
    ServiceAccount token allowed `create` on `nodes/checkpoint`; then boto3 `upload_file` of the
    plain tar the kubelet names (under /var/lib/kubelet/checkpoints), then removing it (the kubelet
    never does).
(c) checkpointer: a ContainerCheckpoint that names the Pod by `podRef`, exported to the chart's
    storage (zstd), from its creation to Succeeded; the agent is the chart's, in its Pod, and its
    peak resident memory and CPU time are read from its process on the node.

Both upload over loopback to the environment's S3 server, whose files are on XFS with reflinks as in
the data path benchmark (bench/datapath.py). A round runs s and c once each against the same running
Pod (neither stops it), in an order that alternates from round to round; the first round of each size
is a warm-up whose figures are discarded. The target of the issue is c <= 0.8 x s, agent memory flat.

`python -m bench.pods --sizes 256 1024 --repeats 3` writes pods.json into --out.
"""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import ssl
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.datapath import os_info, reflink_filesystem, run_folder
from bench.stats import cpu_seconds, median, memory_kib, reset_peak, settle, spread, timer
from localenv.chart import CHART, RELEASE
from localenv.env import SECRET, STORAGE
from localenv.images import MEMORY
from localenv.kubelet import KubeletCluster
from localenv.procs import REPO_ROOT, LocalEnvError, wait_until

NODE = "node-a"
# The user the scripted way authenticates to the kubelet as, and what it may do there.
SCRIPT_USER = "bench-checkpoint"
KUBELET_PATH = "/var/lib/kubelet/checkpoints/"


@dataclass
class Row:
    size_mib: int
    # (s): the whole script, and its two steps
    script_s: list[float] = field(default_factory=list)
    kubelet_api_s: list[float] = field(default_factory=list)
    upload_s: list[float] = field(default_factory=list)
    tar_bytes: list[int] = field(default_factory=list)
    # (c)
    checkpointer_s: list[float] = field(default_factory=list)
    archive_bytes: list[int] = field(default_factory=list)
    agent_peak_rss_mib: list[float] = field(default_factory=list)
    agent_cpu_s: list[float] = field(default_factory=list)  # the agent's user + system time over (c)

    def summary(self) -> dict[str, Any]:
        s, c = median(self.script_s), median(self.checkpointer_s)
        pairs = [c_i / s_i for c_i, s_i in zip(self.checkpointer_s, self.script_s, strict=False)]
        return {
            "sizeMiB": self.size_mib,
            "scriptSeconds": s,
            "kubeletApiSeconds": median(self.kubelet_api_s),
            "scriptUploadSeconds": median(self.upload_s),
            "tarBytes": median([float(x) for x in self.tar_bytes]),
            "checkpointerSeconds": c,
            "archiveBytes": median([float(x) for x in self.archive_bytes]),
            "agentPeakRssMiB": max(self.agent_peak_rss_mib) if self.agent_peak_rss_mib else None,
            "agentCpuSeconds": median(self.agent_cpu_s),
            "c_over_s": c / s if s and c == c else None,
            "spread": {
                "scriptSeconds": spread(self.script_s),
                "kubeletApiSeconds": spread(self.kubelet_api_s),
                "checkpointerSeconds": spread(self.checkpointer_s),
                "c_over_s": spread(pairs),
                "agentPeakRssMiB": spread(self.agent_peak_rss_mib),
                "agentCpuSeconds": spread(self.agent_cpu_s),
            },
            "runs": {k: v for k, v in self.__dict__.items() if isinstance(v, list)},
        }


class PodCheckpoints:
    def __init__(self, env: KubeletCluster, with_checkpointer: bool = True) -> None:
        self.env = env
        self.node = env.nodes[NODE]
        self.s3 = env.s3.client()
        self.rounds = 0
        self.with_checkpointer = with_checkpointer
        self.token = self._script_user()
        self.kubelet = self._kubelet_endpoint()

    # --- the environment ------------------------------------------------------------------------

    def _script_user(self) -> str:
        """A ServiceAccount allowed the kubelet's checkpoint API, and a token of it, as a user makes them."""
        role = {"apiGroups": [""], "resources": ["nodes/checkpoint"], "verbs": ["create"]}
        self.env.apply(
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SCRIPT_USER, "namespace": "default"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": SCRIPT_USER},
                "rules": [role],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": SCRIPT_USER},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SCRIPT_USER},
                "subjects": [{"kind": "ServiceAccount", "name": SCRIPT_USER, "namespace": "default"}],
            },
        )
        return self.env.kubectl("create", "token", SCRIPT_USER, "--duration=2h").stdout.strip()

    def _kubelet_endpoint(self) -> tuple[str, int]:
        """The node's address and its kubelet's port, from its Node object, as `kubectl get node` shows them."""
        node = json.loads(self.env.kubectl("get", "node", NODE, "-o", "json").stdout)
        address = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
        return address, int(node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"])

    def install(self) -> None:
        """The operator by Helm, its storage the environment's bucket (c only)."""
        storage = {
            "create": True,
            "name": STORAGE,
            "bucket": self.env.s3.bucket,
            "endpoint": self.env.s3.endpoint,
            "region": self.env.s3.region,
            "forcePathStyle": True,
            "existingSecret": SECRET,
        }
        values = self.env.workdir / "bench-values.yaml"
        values.write_text(yaml.safe_dump(self.env.chart_values(storage)))
        self.env.helm("install", RELEASE, CHART, "--values", values, "--wait", "--timeout", "5m")

        def available() -> bool:
            return self.env.kubectl("get", "cks", STORAGE, "-o", "jsonpath={.status.phase}").stdout == "Available"

        wait_until(f"CheckpointStorage {STORAGE} Available", available, timeout=120)

    def agent_pid(self) -> int:
        """The chart's agent process on the node (its Pod shares the node's PID namespace view)."""
        for pid in self.node.processes():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(a.endswith(b"checkpointer") for a in argv) and b"agent" in argv:
                return pid
        raise LocalEnvError(f"no checkpointer agent runs on {NODE}")

    def workload(self, size_mib: int) -> tuple[str, str]:
        """A Pod holding `size_mib` of memory on the node, once every page is written: (Pod, container)."""
        name = f"mem-{uuid.uuid4().hex[:6]}"
        container = {"name": "memory", "image": self.env.registry.reference(MEMORY), "args": [str(size_mib)]}
        spec = {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "containers": [container],
            "terminationGracePeriodSeconds": 5,
        }
        self.env.apply(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default"}, "spec": spec}
        )

        def ready() -> bool:
            return "ready" in self.env.kubectl("logs", name, check=False).stdout

        wait_until(f"Pod {name} holding {size_mib} MiB", ready, timeout=120 + size_mib / 20)
        return name, "memory"

    # --- the two ways ---------------------------------------------------------------------------

    def script(self, row: Row, pod: str, container: str, warmup: bool) -> None:
        """(s): the kubelet's checkpoint API, boto3's upload_file of its tar, the tar removed."""
        key = f"bench/script/{pod}-{uuid.uuid4().hex[:6]}.tar"
        settle()
        with timer() as took:
            with timer() as api:
                path = self.kubelet_checkpoint("default", pod, container)
            tar = self.node.state_dir / "kubelet" / path.removeprefix("/var/lib/kubelet/")
            with timer() as upload:
                self.s3.upload_file(str(tar), self.env.s3.bucket, key)
            size = tar.stat().st_size
            tar.unlink()
        if not warmup:
            row.script_s.append(took())
            row.kubelet_api_s.append(api())
            row.upload_s.append(upload())
            row.tar_bytes.append(size)
        self.s3.delete_object(Bucket=self.env.s3.bucket, Key=key)

    def kubelet_checkpoint(self, namespace: str, pod: str, container: str, timeout: int = 1800) -> str:
        """POST /checkpoint/... at the node's kubelet; the path of the tar it wrote on the node.

        The kubelet's serving certificate is its own self-signed one here, as on most clusters: the
        script does not verify it (`curl -k`)."""
        address, port = self.kubelet
        connection = http.client.HTTPSConnection(
            address, port, context=ssl._create_unverified_context(), timeout=timeout + 60
        )
        path = "/checkpoint/" + "/".join(urllib.parse.quote(p) for p in (namespace, pod, container))
        connection.request("POST", f"{path}?timeout={timeout}", headers={"Authorization": f"Bearer {self.token}"})
        response = connection.getresponse()
        body = response.read().decode()
        connection.close()
        if response.status != 200:
            raise RuntimeError(f"the kubelet answered {response.status}: {body}")
        items: list[str] = json.loads(body)["items"]
        if len(items) != 1 or not items[0].startswith(KUBELET_PATH):
            raise RuntimeError(f"the kubelet wrote {items}")
        return items[0]

    def checkpointer(self, row: Row, pod: str, container: str, warmup: bool) -> None:
        """(c): a ContainerCheckpoint of the Pod by podRef, exported, until Succeeded; then deleted."""
        name = f"bench-{uuid.uuid4().hex[:8]}"
        body = {
            "apiVersion": "checkpointer.dev/v1alpha1",
            "kind": "ContainerCheckpoint",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podRef": {"name": pod, "containers": [container]}, "export": {}},
        }
        agent = self.agent_pid()
        reset_peak(agent)
        settle()
        cpu = cpu_seconds(agent)
        with timer() as took:
            self.env.apply(body)
            obj = self.env.wait_phase("ccp", name, ["Succeeded", "Failed"], timeout=1800)
        rss = memory_kib(agent, "VmHWM") / 1024
        cpu = cpu_seconds(agent) - cpu
        status = obj["status"]
        if status["phase"] != "Succeeded":
            raise RuntimeError(f"ContainerCheckpoint {name} failed: {json.dumps(status)[:2000]}")
        if not warmup:
            row.checkpointer_s.append(took())
            row.archive_bytes.append(int(status["archives"][0]["size"]))
            row.agent_peak_rss_mib.append(rss)
            row.agent_cpu_s.append(cpu)
        self.env.kubectl("delete", "ccp", name, "--wait=true", "--timeout=120s")

    def row(self, size_mib: int, repeats: int, warmup: int) -> dict[str, Any]:
        row = Row(size_mib)
        pod, container = self.workload(size_mib)
        steps: list[Callable[[Row, str, str, bool], None]] = [self.script]
        if self.with_checkpointer:
            steps.append(self.checkpointer)
        for r in range(warmup + repeats):
            order = steps if self.rounds % 2 == 0 else steps[::-1]
            for step in order:
                step(row, pod, container, r < warmup)
            self.rounds += 1
        self.env.kubectl("delete", "pod", pod, "--wait=true", "--timeout=60s")
        summary = row.summary()
        print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
        return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before each size's")
    parser.add_argument("--script-only", action="store_true", help="(s) alone: no operator installed")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "_output" / "bench")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where its run's own folder is made")
    args = parser.parse_args()
    # Stopped, it still tears its environment down (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data = run_folder(args.workdir, "checkpointer-pods-")
    with reflink_filesystem(data / "s3", 8 + 2 * max(args.sizes) // 256):
        env = KubeletCluster.up(data)
        try:
            bench = PodCheckpoints(env, with_checkpointer=not args.script_only)
            if not args.script_only:
                bench.install()
            rows = [bench.row(size, args.repeats, args.warmup) for size in args.sizes]
        finally:
            env.down()
    result = {"date": started, "machine": os_info(), "repeats": args.repeats, "node": NODE, "rows": rows}
    (args.out / "pods.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
