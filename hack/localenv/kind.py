"""The same e2e suite against a kind cluster (`pytest --cluster=kind`), for machines with Docker.

hack/kind/up.sh makes the cluster, its podman/CRIU node image, SeaweedFS and the Helm install; this
module gives the tests the same handles LocalEnv gives them: kubectl, the nodes' podman (through
`docker exec`), the S3 server and the operator's logs.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from localenv.env import LocalEnv
from localenv.procs import BIN, LocalEnvError, Supervisor, run


@dataclass
class KindNode:
    """A kind worker; `name` is the Node's name, the key in LocalEnv.nodes is the test's name for it."""

    name: str
    spool_dir: Path

    def podman(
        self, *args: str | os.PathLike[str], timeout: float = 120, check: bool = True, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return run(["docker", "exec", "-i", self.name, "podman", *args], timeout=timeout, check=check, input=input)


class _Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

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


def connect(workdir: Path, cluster: str = "checkpointer") -> LocalEnv:
    """A LocalEnv view of the kind cluster that hack/kind/up.sh made."""
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(run(["kind", "get", "kubeconfig", "--name", cluster]).stdout.decode())
    control = _Kubectl(kubeconfig)
    nodes = json.loads(control.kubectl("get", "nodes", "-l", "checkpointer.dev/test-node", "-o", "json").stdout)
    env = LocalEnv(workdir, Supervisor(workdir / "logs"), control, None)  # type: ignore[arg-type]
    for item in nodes["items"]:
        test_name = item["metadata"]["labels"]["checkpointer.dev/test-node"]
        env.nodes[test_name] = KindNode(item["metadata"]["name"], Path("/var/lib/checkpointer"))  # type: ignore[assignment]
    if set(env.nodes) != {"node-a", "node-b"}:
        raise LocalEnvError(f"kind cluster {cluster} lacks workers labelled node-a and node-b: {sorted(env.nodes)}")
    return env
