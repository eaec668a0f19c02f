"""The whole local environment: control plane, S3, node sandboxes, and checkpointer's own processes.

`LocalEnv.up()` brings everything up in one work directory; `down()` ends every process and leaves
no mounts behind. The pytest fixtures and `hack/local-up` both use it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localenv import chart, cluster
from localenv.controlplane import ControlPlane
from localenv.nodes import NODE_ENV, NodeSandbox, rootfs_path
from localenv.procs import REPO_ROOT, LocalEnvError, Process, Supervisor, free_port, wait_until

NAMESPACE = "checkpointer-system"
STORAGE = "local"
SECRET = "local-s3"
# The age keys of the storages that tests make with encryption (tests/e2e/test_encryption.py): the
# agents may read it, as the chart's rbac.storageSecrets grants.
ENCRYPTION_SECRET = "local-age"
# Each adapter gets a node: a test that runs on both nodes runs through both.
PODMAN_MODES = {"node-a": "api", "node-b": "cli"}
# The host ports restores outside admin namespaces may publish, as the chart's tenancy.publishHostPorts.
PUBLISH_HOST_PORTS = "30000-32767"
# How long an agent's token lasts: longer than any session of the environment.
AGENT_TOKEN_DURATION = "8760h"
NODE_NAME_CLAIM = "authentication.kubernetes.io/node-name"


@dataclass
class LocalEnv:
    workdir: Path
    supervisor: Supervisor
    control_plane: ControlPlane
    s3: Any
    nodes: dict[str, NodeSandbox] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)
    # Each process's /metrics port, by the same names (tests/e2e/test_metrics.py scrapes them).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    ports_given: set[int] = field(default_factory=set)
    # The chart's rendering when the agents run as the chart's ServiceAccount (else as admin), and
    # each node's agent kubeconfig, with a token bound to a Pod on that node.
    chart_objects: chart.Objects | None = None
    agent_kubeconfigs: dict[str, Path] = field(default_factory=dict)
    # How each controller was started, to start it again as its Deployment would.
    controller_starts: dict[str, tuple[dict[str, str], tuple[str, ...]]] = field(default_factory=dict)
    # Nodes with a kubelet (kubelet.up_with_kubelets): containerd and the kubelet of each node, and
    # the OCI registry they pull from.
    kubelets: dict[str, Any] = field(default_factory=dict)
    registry: Any = None

    # --- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        workdir: Path,
        node_names: Sequence[str] = ("node-a", "node-b"),
        *,
        operator: bool = True,
        agent_settings: dict[str, str] | None = None,
        agents_as_chart: bool = True,
    ) -> LocalEnv:
        """Everything up. The agents authenticate as the chart's agent ServiceAccount (`agents_as_chart`).

        The chart's agent RBAC and admission policy are in force, and each agent's token is bound to a
        Pod on its node, as a kubelet's projected token is. With `agents_as_chart=False` the agents
        use the admin kubeconfig instead.

        Nodes with a kubelet beside their podman: kubelet.up_with_kubelets.
        """
        from localenv import images
        from localenv.s3 import S3Server

        workdir.mkdir(parents=True, exist_ok=True)
        supervisor = Supervisor(workdir / "logs")
        control_plane = ControlPlane.start(workdir / "control-plane", supervisor)
        env = cls(workdir, supervisor, control_plane, None)
        try:
            env.s3 = S3Server.start(workdir / "s3", supervisor)
            env._install_api()
            workloads = images.workload_images(rootfs_path())
            for name in node_names:
                node = NodeSandbox(name, workdir, supervisor=supervisor)
                node.start()
                env.nodes[name] = node
                images.load_images([node], workloads)
                env.apply(
                    {
                        "apiVersion": "v1",
                        "kind": "Node",
                        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                    }
                )
                env.report_ready(name)
            if operator:
                if agents_as_chart:
                    env.install_agent_access()
                env.start_controller()
                # Side by side: each takes a second or two to start and make its Lease.
                agents = {name: env.start_agent(name, agent_settings or {}, wait=False) for name in node_names}
                for name, process in agents.items():
                    env.wait_for_agent(name, process)
                env.wait_storage_available()
        except BaseException:
            env.down()
            raise
        env.write_summary()
        return env

    def down(self) -> None:
        for runtime in self.kubelets.values():
            runtime.stop()
        for node in self.nodes.values():
            node.stop()
        self.supervisor.stop_all()
        self.control_plane.close_api()

    # --- cluster objects -------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.control_plane.kubectl(*args, input=input, check=check)

    def apply(self, *objects: dict[str, Any]) -> None:
        """Server-side apply of each object in turn, as `kubectl apply --server-side --force-conflicts`."""
        for obj in objects:
            self.control_plane.api.apply(obj)

    def read(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.control_plane.api.read(kind, name, namespace)

    def list_objects(
        self, kind: str, namespace: str | None = None, field_selector: str = "", label_selector: str = ""
    ) -> list[dict[str, Any]]:
        return self.control_plane.api.list_objects(
            kind, namespace, field_selector=field_selector, label_selector=label_selector
        )

    def delete(self, kind: str, name: str, namespace: str = "default") -> bool:
        """Asks for the object's deletion without waiting for it; False when there was none."""
        return self.control_plane.api.delete(kind, name, namespace)

    def wait(
        self,
        kind: str,
        name: str,
        test: Callable[[dict[str, Any] | None], object],
        timeout: float,
        namespace: str = "default",
    ) -> tuple[bool, dict[str, Any] | None]:
        """Watches the object until `test(object)` holds (localenv/api.py, Api.wait)."""
        return self.control_plane.api.wait(kind, name, test, timeout, namespace)

    def report_ready(self, node: str) -> None:
        """The Node's Ready condition True, as the kubelet of a node with podman up would report it: a
        migration without a target chooses only Ready nodes. No node-lifecycle controller runs here
        (no kubelets), so nothing marks it stale."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ready = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "the node sandbox runs podman",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }
        patch = json.dumps({"status": {"conditions": [ready]}})
        self.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p", patch)

    def install_namespace(self) -> None:
        """The release namespace and the S3 credentials Secret, as an admin makes them before `helm install`."""
        s3 = self.s3
        self.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                # The agent's Pod (privileged, hostPID, host paths) is admitted at this level only.
                "metadata": {"name": NAMESPACE, "labels": {"pod-security.kubernetes.io/enforce": "privileged"}},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET, "namespace": NAMESPACE},
                "stringData": {"accessKeyID": s3.access_key, "secretAccessKey": s3.secret_key},
            },
        )

    def _install_api(self) -> None:
        self.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        for crd in sorted((REPO_ROOT / "crds").glob("*.yaml")):
            name = yaml.safe_load(crd.read_text())["metadata"]["name"]
            self.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")
        self.install_namespace()
        s3 = self.s3
        self.apply(
            {
                "apiVersion": "checkpointer.dev/v1alpha1",
                "kind": "CheckpointStorage",
                "metadata": {"name": STORAGE},
                "spec": {
                    "bucket": s3.bucket,
                    "endpoint": s3.endpoint,
                    "region": s3.region,
                    "forcePathStyle": True,
                    "default": True,
                    "credentialsSecretRef": {"namespace": NAMESPACE, "name": SECRET},
                },
            },
        )

    def wait_storage_available(self, timeout: float = 60) -> None:
        def available() -> bool:
            storage = self.read("cks", STORAGE) or {}
            return bool((storage.get("status") or {}).get("phase") == "Available")

        wait_until(
            f"CheckpointStorage {STORAGE} Available",
            available,
            timeout=timeout,
            log=self.supervisor.log_dir / "controller.log",
        )

    # --- checkpointer processes ------------------------------------------------------------------

    def _new_port(self) -> int:
        """A free port not handed out before: two processes started close together never share one."""
        port = free_port()
        while port in self.ports_given:
            port = free_port()
        self.ports_given.add(port)
        return port

    def operator_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHECKPOINTER_")}
        env.update(NODE_ENV | {"PATH": os.environ.get("PATH", "") + ":" + NODE_ENV["PATH"]})
        # glibc's malloc tuned as the operator image tunes it (see the Containerfile).
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            CHECKPOINTER_NAMESPACE=NAMESPACE,
            PYTHONUNBUFFERED="1",
            MALLOC_ARENA_MAX="2",
            MALLOC_MMAP_THRESHOLD_="262144",
            # Every process serves its liveness endpoint on a port of its own (the chart uses 8080).
            CHECKPOINTER_HEALTH_PORT=str(self._new_port()),
            # And its metrics (the chart uses 9090).
            CHECKPOINTER_METRICS_HOST="127.0.0.1",
            CHECKPOINTER_METRICS_PORT=str(self._new_port()),
        )
        env.update(extra)
        return env

    def start_controller(
        self, settings: dict[str, str] | None = None, name: str = "controller", args: Sequence[str] = ()
    ) -> Process:
        """A controller process; a second one (another name) stands by until the first lets the Lease go."""
        env = self.operator_env(
            {
                "CHECKPOINTER_AGENT_PICKUP_TIMEOUT_SECONDS": "30",
                "CHECKPOINTER_STORAGE_VALIDATION_SECONDS": "10",
                # Host ports tenants' restores may publish (tests/e2e/test_tenant_restore.py).
                "CHECKPOINTER_PUBLISH_HOST_PORTS": PUBLISH_HOST_PORTS,
                # The holder identity in the controller Lease, as the chart's pod name is.
                "CHECKPOINTER_POD_NAME": name,
                **(settings or {}),
            }
        )
        self.health_ports[name] = int(env["CHECKPOINTER_HEALTH_PORT"])
        self.metrics_ports[name] = int(env["CHECKPOINTER_METRICS_PORT"])
        self.controller_starts[name] = (dict(settings or {}), tuple(args))
        return self.supervisor.start(name, [sys.executable, "-m", "checkpointer", "controller", *args], env=env)

    def restart_exited_controllers(self) -> list[str]:
        """Start again every controller that exited on its own, as the Deployment's restart policy
        does: a leader that cannot renew its Lease stops (docs/architecture.md). Returns their names."""
        exited = [p.name for p in self.supervisor.processes if p.name in self.controller_starts and not p.alive()]
        for name in exited:
            self.stop_controller(name)
            settings, args = self.controller_starts[name]
            self.start_controller(settings, name, args)
        return exited

    def stop_controller(self, name: str = "controller", kill: bool = False) -> None:
        """Stop (SIGTERM: it gives the Lease up) or kill (SIGKILL: its Lease has to expire) a controller."""
        for process in self.supervisor.processes:
            if process.name == name and kill and process.alive():
                os.killpg(process.popen.pid, 9)
                process.popen.wait(10)
        self.supervisor.stop(name)
        self.health_ports.pop(name, None)
        self.metrics_ports.pop(name, None)

    def controller_leader(self) -> str | None:
        """The holder identity in the controller Lease (a controller's name here); None when nobody leads."""
        try:
            lease = self.read("lease", "checkpointer-controller", NAMESPACE)
        except (LocalEnvError, OSError):  # the API server is away: nobody can be seen leading
            return None
        return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "") or None

    def install_agent_access(self) -> None:
        """The chart's agent ServiceAccount, the RBAC it binds to it and its admission policy, as rendered now."""
        secrets = [{"namespace": NAMESPACE, "name": name} for name in (SECRET, ENCRYPTION_SECRET)]
        values = {"rbac": {"storageSecrets": secrets}}
        objects = chart.render(NAMESPACE, values)
        self.apply(*chart.agent_access(objects))
        self.chart_objects = objects

    def agent_kubeconfig(self, node: str) -> Path:
        """A kubeconfig of the chart's agent ServiceAccount whose token names `node`, made once per node.

        The token is bound to a Pod on the node (TokenRequest with a boundObjectRef), which is how the
        token a kubelet projects into the agent's Pod gets its claim of the node.
        """
        if self.chart_objects is None:
            raise LocalEnvError("the agents run as admin: LocalEnv.up(agents_as_chart=True) installs their access")
        if node not in self.agent_kubeconfigs:
            pod = chart.agent_pod(self.chart_objects, node)
            self.apply(pod)
            path = self.control_plane.kubeconfig_for_serviceaccount(
                NAMESPACE, chart.AGENT_SA, AGENT_TOKEN_DURATION, pod=pod["metadata"]["name"]
            )
            review = json.loads(self.control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=path).stdout)
            claimed = review["status"]["userInfo"].get("extra", {}).get(NODE_NAME_CLAIM)
            if claimed != [node]:
                raise LocalEnvError(
                    f"the agent token of {node} names node {claimed} ({NODE_NAME_CLAIM}): "
                    "kube-apiserver needs the feature gate ServiceAccountTokenPodNodeInfo"
                )
            self.agent_kubeconfigs[node] = path
        return self.agent_kubeconfigs[node]

    def start_agent(
        self, name: str, settings: dict[str, str] | None = None, args: Sequence[str] = (), *, wait: bool = True
    ) -> Process:
        """The node's agent process; with `wait`, once its Lease exists (wait_for_agent)."""
        node = self.nodes[name]
        identity = {"KUBECONFIG": str(self.agent_kubeconfig(name))} if self.chart_objects is not None else {}
        env = self.operator_env(
            {
                **identity,
                "CHECKPOINTER_NODE_NAME": name,
                "CHECKPOINTER_PODMAN_MODE": PODMAN_MODES.get(name, "api"),
                "CHECKPOINTER_PODMAN_SOCKET": str(node.socket),
                "CHECKPOINTER_NSENTER_TARGET": str(node.init_pid),
                "CHECKPOINTER_SPOOL_DIR": str(node.spool_dir / "checkpointer"),
                "CHECKPOINTER_PART_SIZE": str(8 * 1024 * 1024),
                # What a fault leaves in the spool is cleared within seconds, before the tests look.
                "CHECKPOINTER_SWEEP_SECONDS": "5",
                **(settings or {}),
            }
        )
        self.health_ports[f"agent-{name}"] = int(env["CHECKPOINTER_HEALTH_PORT"])
        self.metrics_ports[f"agent-{name}"] = int(env["CHECKPOINTER_METRICS_PORT"])
        argv = [sys.executable, "-m", "checkpointer", "agent", *args]
        process = self.supervisor.start(f"agent-{name}", argv, env=env)
        if wait:
            self.wait_for_agent(name, process)
        return process

    def wait_for_agent(self, name: str, process: Process) -> None:
        wait_until(f"agent {name} Lease", lambda: self._lease_exists(name), timeout=60, log=process.log)

    def stop_agent(self, name: str, kill: bool = False) -> None:
        for process in self.supervisor.processes:
            if process.name == f"agent-{name}" and kill and process.alive():
                os.killpg(process.popen.pid, 9)
        self.supervisor.stop(f"agent-{name}")

    def _lease_exists(self, node: str) -> bool:
        return self.read("lease", f"checkpointer-agent-{node}", NAMESPACE) is not None

    # --- for people and tests --------------------------------------------------------------------

    def write_summary(self) -> Path:
        summary = {
            "kubeconfig": str(self.kubeconfig),
            "server": self.control_plane.server,
            "s3": {"endpoint": self.s3.endpoint, "bucket": self.s3.bucket, "region": self.s3.region},
            "nodes": {n: {"podmanSocket": str(node.socket), "pid": node.init_pid} for n, node in self.nodes.items()},
            "logs": str(self.supervisor.log_dir),
        }
        path = self.workdir / "env.json"
        path.write_text(json.dumps(summary, indent=2))
        return path

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for log in sorted(self.supervisor.log_dir.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def wait_phase(
        self, kind: str, name: str, phases: Sequence[str], namespace: str = "default", timeout: float = 180
    ) -> dict[str, Any]:
        reached, obj = self.wait(kind, name, lambda o: cluster.in_phase(o, phases), timeout, namespace)
        if reached and obj is not None:
            return obj
        raise cluster.phase_not_reached(self, kind, name, phases, timeout, obj)


def remove_workdir(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
