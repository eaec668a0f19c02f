"""The agent as a container on a node, run with what the Helm chart gives it.

The operator image is built locally (hack/localenv/operator_image.py: debootstrap rootfs + venv,
docker-archive) and loaded into the node. The node's host-process agent is stopped and the agent
runs as a podman container inside the node sandbox instead, made from the chart's own rendering
(`helm template`): its DaemonSet's pod spec is translated into `podman run` flags (hostPID,
privileged, root, read-only root filesystem, memory limit, env, hostPath and emptyDir volumes). The
container authenticates as the chart's agent ServiceAccount, with the RBAC and admission policy the
chart renders (the environment applies them), and a token bound to a Pod on its node, as the token
the kubelet projects into the agent's Pod is. Differences from a pod, each forced by the local
environment: the host network (the API server and S3 listen on the host's 127.0.0.1, where a pod
would use Services), a kubeconfig with that token instead of the in-cluster token mount, and the
podman socket file mounted from the node's state directory (where the node's podman listens)
instead of the /run/podman directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from checkpointer.services.node import EXCLUDE_LABEL
from helpers import checkpoint, counter, unique
from localenv import operator_image
from localenv.controlplane import ControlPlane, kubernetes_version
from localenv.env import NAMESPACE, LocalEnv
from localenv.images import Image, load_images
from localenv.nodes import NodeSandbox
from localenv.procs import BIN, REPO_ROOT, require, run

pytestmark = pytest.mark.e2e

CHART = REPO_ROOT / "charts" / "checkpointer"
RELEASE = "checkpointer"
AGENT_SA = "checkpointer-agent"
# Where the agent looks for podman's socket (the chart's default) and its kubeconfig, in the container.
SOCKET = "/run/podman/podman.sock"
KUBECONFIG = "/etc/checkpointer/kubeconfig"

Objects = list[dict[str, Any]]


@pytest.fixture(scope="module")
def image(local_env: LocalEnv) -> Image:
    if not isinstance(local_env.control_plane, ControlPlane):
        pytest.skip("on kind the chart's DaemonSet runs the agent container itself")
    missing = operator_image.missing_tools()
    require(not missing, f"the operator image needs {', '.join(missing)}")
    return operator_image.operator_image()


def render_chart(values: dict[str, Any]) -> Objects:
    with tempfile.TemporaryDirectory(prefix="helm-") as home:
        values_file = Path(home) / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": home}
        env |= {f"HELM_{kind}_HOME": f"{home}/{kind.lower()}" for kind in ("CACHE", "CONFIG", "DATA")}
        # This helm is built without the client-go version ldflags, so its default kube version is v1.20.
        flags = ["--namespace", NAMESPACE, "--values", values_file, "--kube-version", kubernetes_version()]
        out = run([BIN / "helm", "template", RELEASE, CHART, *flags], env=env)
    return [o for o in yaml.safe_load_all(out.stdout) if o]


def quantity(value: str) -> int:
    """A Kubernetes memory quantity (512Mi, 1G, 1000) in bytes."""
    number, unit = re.fullmatch(r"([0-9]+)([A-Za-z]*)", value).groups()  # type: ignore[union-attr]
    powers = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    return int(number) * powers[unit]


def podman_run_args(objects: Objects, node: NodeSandbox, name: str, kubeconfig: Path) -> list[str]:
    """`podman run` arguments for the chart's agent pod on `node` (see the module docstring)."""
    [daemonset] = [o for o in objects if o["kind"] == "DaemonSet" and o["metadata"]["name"] == AGENT_SA]
    pod = daemonset["spec"]["template"]["spec"]
    [container] = pod["containers"]
    security = container.get("securityContext", {})
    args = ["run", "--detach", "--name", name, "--label", f"{EXCLUDE_LABEL}=true", "--network=host"]
    args += [f"--stop-timeout={pod['terminationGracePeriodSeconds']}"]
    if pod.get("hostPID"):
        args.append("--pid=host")
    if security.get("privileged"):
        args.append("--privileged")
    if "runAsUser" in security:
        args.append(f"--user={security['runAsUser']}")
    if security.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    memory = container.get("resources", {}).get("limits", {}).get("memory")
    if memory:
        args.append(f"--memory={quantity(memory)}")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            args.append(f"--tmpfs={mount['mountPath']}")
        elif mount["name"] == "podman-socket":
            assert volume["hostPath"]["path"] == mount["mountPath"] == os.path.dirname(SOCKET)
            args += ["--volume", f"{node.socket}:{SOCKET}"]
        else:
            host_path = volume["hostPath"]["path"]
            assert volume["hostPath"]["type"] == "DirectoryOrCreate"
            Path(host_path).mkdir(parents=True, exist_ok=True)
            # As the kubelet would, in the node (whose /run is its own): the CRI socket's folder, say.
            run([*node.nsenter_argv(), "mkdir", "-p", host_path])
            args += ["--volume", f"{host_path}:{mount['mountPath']}"]
    for var in container["env"]:
        if "value" in var:
            value = var["value"]
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, var
            value = node.name
        args += ["--env", f"{var['name']}={value}"]
    args += ["--volume", f"{kubeconfig}:{KUBECONFIG}:ro", "--env", f"KUBECONFIG={KUBECONFIG}"]
    args += ["--entrypoint", json.dumps(container["command"]), container["image"], *container["args"]]
    return args


def lease_renewed(env: LocalEnv, node: str) -> str:
    out = env.kubectl("get", "lease", "-n", NAMESPACE, f"checkpointer-agent-{node}", "-o", "jsonpath={.spec.renewTime}")
    return str(out.stdout.strip())


def container_logs(node: NodeSandbox, name: str) -> str:
    out = node.podman("logs", name, check=False)
    return (out.stdout + out.stderr).decode(errors="replace")


@pytest.mark.parametrize(("node_name", "mode"), [("node-a", "api"), ("node-b", "cli")])
def test_agent_in_a_container_as_the_chart_runs_it_exports_a_checkpoint(
    local_env: LocalEnv, image: Image, node_name: str, mode: str
) -> None:
    env = local_env
    node = env.nodes[node_name]
    repository, tag = image.ref.rsplit(":", 1)
    objects = render_chart(
        {
            "image": {"repository": repository, "tag": tag},
            "podman": {"mode": mode, "socketPath": SOCKET},
            # The node's spool directory is where the node's podman and the agent meet, at one path.
            "agent": {"stateDir": str(node.spool_dir), "spoolDir": str(node.spool_dir / "checkpointer")},
        }
    )
    agent = unique("checkpointer-agent")
    # Inside the node only its state directory is visible from the host: the kubeconfig goes there.
    private = node.state_dir / agent
    load_images([node], [image])
    env.stop_agent(node_name)
    try:
        private.mkdir(mode=0o700)
        kubeconfig = private / "kubeconfig"
        # The node's own agent credentials: the chart's ServiceAccount, its token bound to a Pod on the node.
        shutil.copy(env.agent_kubeconfig(node_name), kubeconfig)
        before = lease_renewed(env, node_name)
        node.podman(*podman_run_args(objects, node, agent, kubeconfig))
        deadline = time.monotonic() + 60
        while lease_renewed(env, node_name) == before:
            state = node.podman("inspect", "--format", "{{.State.Status}}", agent).stdout.decode().strip()
            assert state == "running" and time.monotonic() < deadline, (
                f"the agent container ({state}) renewed no Lease:\n{container_logs(node, agent)}"
            )
            time.sleep(0.5)
        inspected = json.loads(node.podman("inspect", agent).stdout)[0]
        assert inspected["Config"]["Labels"][EXCLUDE_LABEL] == "true"
        host = inspected["HostConfig"]
        assert (host["Privileged"], host["PidMode"], host["ReadonlyRootfs"]) == (True, "host", True)
        assert host["Memory"] == 512 * 2**20, "the chart's memory limit"

        counting = counter(env, node_name)
        ccp = checkpoint(env, node_name, containers=[counting], export={})
        obj = env.wait_phase("ccp", ccp, ["Succeeded", "Failed"])
        status = obj["status"]
        assert status["phase"] == "Succeeded", f"{status}\n{container_logs(node, agent)}"
        [archive] = status["archives"]
        data = env.s3.client().get_object(Bucket=env.s3.bucket, Key=archive["key"])["Body"].read()
        assert data[:4] == b"\x28\xb5\x2f\xfd"  # zstd
        assert len(data) == archive["size"]
        assert hashlib.sha256(data).hexdigest() == archive["sha256"]
        # The container did it: the node's host-process agent is stopped, and this one ran the handler.
        assert f"agent-{node_name}" not in {p.name for p in env.supervisor.processes}
        # Its step line names the object, its uid and the node (docs/metrics.md#step-logs).
        step = f"checkpoint default/{ccp} uid={obj['metadata']['uid'][:8]} node={node_name} step=checkpoint"
        assert step in container_logs(node, agent)
        node.podman("rm", "-f", counting)
        env.kubectl("delete", "ccp", ccp, "--wait=true", "--timeout=60s")
    finally:
        # Into the environment's logs, which a failed test shows.
        (env.supervisor.log_dir / f"{agent}-{node_name}.log").write_text(container_logs(node, agent))
        node.podman("rm", "--force", "--time=10", agent, check=False)
        node.podman("rmi", image.ref, check=False)
        shutil.rmtree(private, ignore_errors=True)
        env.start_agent(node_name)
