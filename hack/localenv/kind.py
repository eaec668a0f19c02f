"""A kind cluster made by hack/kind/up.sh, as the Helm-installed user story's cluster (`pytest --cluster kind`).

up.sh leaves: two workers labelled checkpointer.dev/test-node, each with podman 5, CRIU 4.2 and runc
beside kind's containerd and podman's API socket on; the operator image in every node's containerd;
an S3 server (versitygw) on the control-plane node; the release namespace (Pod Security privileged)
and the Secret SECRET in it, which holds the S3 credentials and where the server is. This module
gives the tests the same handles as the local environment (localenv.cluster.ChartCluster): the
nodes' podman through `docker exec`, kubectl, helm and the bucket.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from localenv import images, operator_image, s3
from localenv.chart import RELEASE
from localenv.cluster import kubectl_list, kubectl_read, wait_phase
from localenv.env import NAMESPACE, SECRET
from localenv.kubelet import helm
from localenv.nodes import rootfs_path
from localenv.procs import BIN, LocalEnvError, run

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CLUSTER = os.environ.get("KIND_CLUSTER_NAME", "checkpointer")
# The workers the tests use; the control-plane node runs no agent.
TEST_NODE_LABEL = "checkpointer.dev/test-node"
# The kubelet's own kubeconfig in a kind node (kubeadm's), with its client certificate.
KUBELET_KUBECONFIG = "/etc/kubernetes/kubelet.conf"
# Resident memory of the named processes of a node, as "name kib" lines.
RSS_SCRIPT = (
    "for d in /proc/[0-9]*; do c=$(cat $d/comm 2>/dev/null) || continue; case $c in kubelet|containerd) "
    "echo $c $(sed -n 's/^VmRSS: *\\([0-9]*\\).*/\\1/p' $d/status 2>/dev/null);; esac; done"
)


@dataclass(frozen=True)
class KindNode:
    """A kind worker: a Docker container whose name is its Node's name."""

    name: str
    # This side's directory for the node. The node's own files, the agent's spool among them, are in
    # its container: the invariants' look at spools finds nothing here.
    state_dir: Path

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"

    def nsenter_argv(self) -> list[str]:
        return ["docker", "exec", "-i", self.name]

    def podman(
        self,
        *args: str | os.PathLike[str],
        timeout: float = 120,
        check: bool = True,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        return run([*self.nsenter_argv(), "podman", *args], timeout=timeout, check=check, input=input)


@dataclass(frozen=True)
class KindStorage:
    """The S3 server up.sh runs on the control-plane node, at an address the Pods and this side reach."""

    endpoint: str
    bucket: str
    region: str
    access_key: str
    secret_key: str

    def client(self) -> S3Client:
        return s3.client(self.endpoint, self.access_key, self.secret_key, self.region)


@dataclass
class KindCluster:
    workdir: Path
    kubeconfig: Path
    nodes: dict[str, KindNode]
    s3: KindStorage

    @classmethod
    def connect(cls, workdir: Path, cluster: str = CLUSTER) -> KindCluster:
        """The cluster hack/kind/up.sh made, with the workload images loaded in its workers' podman.

        Raises LocalEnvError naming what is missing: Docker, kind, the cluster, or what up.sh makes.
        """
        if shutil.which("docker") is None:
            raise LocalEnvError("the docker CLI is not on PATH: kind needs Docker")
        engine = run(["docker", "version", "--format", "{{.Server.Version}}"], check=False, timeout=30)
        if engine.returncode != 0:
            raise LocalEnvError(f"no Docker engine answers: {engine.stderr.decode(errors='replace').strip()}")
        kind = shutil.which("kind") or str(BIN / "kind")
        if not os.access(kind, os.X_OK):
            raise LocalEnvError("kind is neither on PATH nor built: hack/kind/up.sh builds it and makes the cluster")
        clusters = run([kind, "get", "clusters"]).stdout.decode().split()
        if cluster not in clusters:
            raise LocalEnvError(f"no kind cluster {cluster!r} (found {clusters}): make it with hack/kind/up.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(run([kind, "get", "kubeconfig", "--name", cluster]).stdout.decode())
        kubeconfig.chmod(0o600)
        probe = cls(workdir, kubeconfig, {}, KindStorage("", "", "", "", ""))
        found = json.loads(probe.kubectl("get", "nodes", "-l", TEST_NODE_LABEL, "-o", "json").stdout)["items"]
        names = sorted(item["metadata"]["name"] for item in found)
        if len(names) != 2:
            raise LocalEnvError(f"kind cluster {cluster} has {names} labelled {TEST_NODE_LABEL}, not two workers")
        secret = probe.kubectl("get", "secret", "-n", NAMESPACE, SECRET, "-o", "json", check=False)
        if secret.returncode != 0:
            raise LocalEnvError(f"kind cluster {cluster} has no Secret {NAMESPACE}/{SECRET}: run hack/kind/up.sh")
        data = {k: base64.b64decode(v).decode() for k, v in json.loads(secret.stdout)["data"].items()}
        storage = KindStorage(
            data["endpoint"], data["bucket"], data["region"], data["accessKeyID"], data["secretAccessKey"]
        )
        nodes = {name: KindNode(name, workdir / "nodes" / name) for name in names}
        env = cls(workdir, kubeconfig, nodes, storage)
        if RELEASE in env.helm("list", "--short").split():
            raise LocalEnvError(f"release {RELEASE} is installed already (by a run that stopped): uninstall it first")
        existing = {b["Name"] for b in storage.client().list_buckets().get("Buckets", [])}
        if storage.bucket not in existing:
            storage.client().create_bucket(Bucket=storage.bucket)
        env._load_workloads()
        return env

    def _load_workloads(self) -> None:
        """The local environment's workload images (same bytes, same IDs) into every worker's podman."""
        for image in images.workload_images(rootfs_path()):
            for node in self.nodes.values():
                node.podman("load", "--quiet", input=image.archive.read_bytes(), timeout=300)
                got = node.podman("image", "inspect", "--format", "{{.Id}}", image.ref).stdout.decode().strip()
                if got != image.image_id:
                    raise LocalEnvError(f"{node.name}: {image.ref} has ID {got}, expected {image.image_id}")

    # --- the cluster ------------------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [str(BIN / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise LocalEnvError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return proc

    def apply(self, *objects: dict[str, Any]) -> None:
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(objects))

    def read(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return kubectl_read(self, kind, name, namespace)

    def list_objects(self, kind: str, namespace: str | None = None, field_selector: str = "") -> list[dict[str, Any]]:
        return kubectl_list(self, kind, namespace, field_selector)

    def wait_phase(
        self, kind: str, name: str, phases: Sequence[str], namespace: str = "default", timeout: float = 180
    ) -> dict[str, Any]:
        return wait_phase(self, kind, name, phases, namespace, timeout)

    def logs(self) -> str:
        selector = "app.kubernetes.io/name=checkpointer"
        args = ("--all-containers", "--prefix", "--tail=200", "--max-log-requests=10")
        out = self.kubectl("logs", "-n", NAMESPACE, "-l", selector, *args, check=False)
        return out.stdout + out.stderr

    # --- what the Helm-installed story needs -------------------------------------------------------

    def helm(self, *args: str | os.PathLike[str]) -> str:
        return helm(self.kubeconfig, *args, "--namespace", NAMESPACE)

    def chart_values(self, storage: dict[str, object]) -> dict[str, object]:
        """kind's nodes have a Pod network and kube-proxy: only the image, the storage and where agents run."""
        repository, tag = operator_image.operator_image().ref.rsplit(":", 1)
        return {
            "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            # podman.socket is on in every node (node.Containerfile): the chart's default, the REST API.
            "podman": {"mode": "api"},
            "storage": storage,
            "controller": {"agentPickupTimeoutSeconds": 30, "storageValidationSeconds": 10},
            "agent": {
                "nodeSelector": {TEST_NODE_LABEL: "true"},
                "extraEnv": [{"name": "CHECKPOINTER_SWEEP_SECONDS", "value": "5"}],
            },
        }

    def kubectl_as_node(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = ["docker", "exec", node, "kubectl", f"--kubeconfig={KUBELET_KUBECONFIG}", *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def runtime_rss_kib(self, node: str) -> dict[str, int]:
        out = run(["docker", "exec", node, "sh", "-c", RSS_SCRIPT]).stdout.decode()
        result: dict[str, int] = {}
        for line in out.splitlines():
            name, _, kib = line.partition(" ")
            if kib.strip().isdigit():
                result[name] = result.get(name, 0) + int(kib)
        return result

    def pod_logs(self) -> str:
        parts = []
        for node in self.nodes:
            script = 'for f in /var/log/pods/*/*/*.log; do [ -f $f ] && echo "--- $f ---" && tail -c 3000 $f; done'
            out = run(["docker", "exec", node, "sh", "-c", script], check=False)
            parts.append(f"=== {node} ===\n{out.stdout.decode(errors='replace')}")
        return "\n".join(parts)

    def down(self) -> None:
        """Nothing: the cluster is up.sh's, and stays for the next run (`kind delete cluster` ends it)."""
