"""Nodes with a kubelet (opt-in): containerd and a kubelet in each node sandbox, beside its podman.

Both runtimes share the node's mount and PID namespaces, as two runtimes on one real host do: the
chart's agent Pod (hostPID) runs under containerd and reaches the node's podman with `nsenter -t 1`.
Each kubelet registers its Node with a client certificate of its own (system:node:<name>), which the
API server's Node authorizer and NodeRestriction confine to that node.

The machine's network is not touched (docs/local-environment.md):
- every node shares the host's network namespace. A Pod without hostNetwork gets a network
  namespace of its own with loopback, and an `eth0` made by the CNI `tap` plugin: a tap device that
  no process holds, so it has no carrier and leads nowhere. It is there because containerd takes the
  Pod's IP from `eth0` of the CNI result and fails the Pod without one (`dummy` would do as well,
  but this kernel has no dummy devices). Its address comes from the node's own range in
  127.0.0.0/8 (`pod_subnet`): whatever tries to reach a Pod IP from the machine stays on the
  machine's loopback;
- the kubelet makes no iptables chains (makeIPTablesUtilChains: false);
- a kubelet refuses a loopback --node-ip, so it runs as for an external cloud provider and the
  environment plays that provider's part: it gives each Node an address of its own in 127.0.0.0/8
  (bindable on any Linux host without adding an address or a route) and removes the
  uninitialized taint. The kubelet keeps addresses a provider set, and host-network Pods get it as
  their Pod IP, so two agents on the one network namespace listen on different addresses.

Images come from a real OCI registry (hack/localenv/registry.py) that the environment starts and
pushes every image to; each containerd pulls from it over plain HTTP, as its hosts.toml says.

The kubelet sets a few host-wide sysctls (vm.overcommit_memory, kernel.panic, ...) when they differ
from what it wants. Inside each node, files with its values are bound over them, so it finds nothing
to change and the host's stay as they were.

Each node's cgroup subtree (hack/localenv/nodes.py) is the kubelet's cgroup root ("/" inside the
node), with the cgroupfs driver on this host's cgroup v1 layout; every cgroup the kubelet and
containerd make is below it and goes when the node stops, as do their processes (the node's PID
namespace) and mounts (its mount namespace).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from localenv.controlplane import ControlPlane, write_private
from localenv.env import NAMESPACE, LocalEnv
from localenv.images import Image, ImageFile, build_image, files_key, image_dirs, load_images, workload_images
from localenv.nodes import NODE_ENV, NodeSandbox
from localenv.procs import BIN, REPO_ROOT, LocalEnvError, Process, Supervisor, free_port, run, wait_until
from localenv.registry import Registry
from localenv.s3 import S3Server

# The switch of hack/build/tools.sh and hack/node/rootfs.sh for what nodes with a kubelet need.
OPT_IN = "CHECKPOINTER_KUBELET_NODES"
BINARIES = ("kubelet", "kube-scheduler", "registry")
PAUSE = "localhost/checkpointer/pause:local"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
UNINITIALIZED_TAINT = "node.cloudprovider.kubernetes.io/uninitialized"
# The CNI network of Pods without hostNetwork; host-local keeps its leases in /var/lib/cni/networks/<it>.
POD_NETWORK = "checkpointer-pods"

# The values the kubelet wants (its setupKernelTunables); bound over /proc/sys inside each node.
KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}

# {{socket}}: containerd's; {{hosts}}: the folder of hosts.toml files (containerd_hosts); {{pause}}: the
# sandbox image in the registry, pulled like any other image.
CONTAINERD_TOML = """\
version = 3
root = "/var/lib/containerd"
state = "/run/containerd"

[grpc]
  address = "{socket}"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{hosts}"

[plugins.'io.containerd.cri.v1.runtime']
  # Lowering an OOM score needs CAP_SYS_RESOURCE, which a machine run as a container may not grant;
  # the sandbox's default -998 then fails every Pod. Clamped, scores only ever rise.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "/etc/cni/net.d"
"""

# A hosts.toml per registry host (containerd's hosts directory): the environment's registry speaks
# plain HTTP on loopback, so containerd must not try HTTPS first.
HOSTS_TOML = """\
server = "http://{host}"

[host."http://{host}"]
  capabilities = ["pull", "resolve"]
"""

# Enters the node's cgroups (its subtree, mounted at /sys/fs/cgroup/<hierarchy> inside it) and runs
# the command; run through `nsenter --mount --pid` into the node.
IN_NODE_CGROUPS = 'for d in /sys/fs/cgroup/*/; do echo $$ >"${d}cgroup.procs"; done; exec "$@"'


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if not os.access(BIN / name, os.X_OK)]


def missing() -> str:
    """What up_with_kubelets needs and this machine lacks, said for a test's `require`; "" when nothing."""
    from localenv import operator_image

    parts = []
    if missing_binaries():
        parts.append(f"{', '.join(missing_binaries())}: {OPT_IN}=1 hack/build/tools.sh")
    if operator_image.missing_tools():
        parts.append(f"the operator image's build tools ({', '.join(operator_image.missing_tools())})")
    return "; ".join(parts)


def rootfs() -> Path:
    """The node rootfs with containerd and runc from forky (built on first use)."""
    env = {**os.environ, OPT_IN: "1"}
    out = run(["bash", REPO_ROOT / "hack/node/rootfs.sh"], timeout=1800, env=env).stdout.decode().strip()
    return Path(out.splitlines()[-1])


def pause_image(node_rootfs: Path) -> Image:
    """The Pod sandbox image: the rootfs's static catatonit in pause mode."""
    files = [
        *image_dirs("dev", "etc", "proc", "sys"),
        ImageFile("catatonit", 0o755, (node_rootfs / "usr/bin/catatonit").read_bytes()),
    ]
    return build_image(PAUSE, {"Entrypoint": ["/catatonit", "-P"]}, files_key(files), lambda: files)


def _environment_net(workdir: Path) -> str:
    """The first three octets of the environment's /24 in 127.0.0.0/8: two environments on one
    machine (their nodes and host-network Pods share its network) listen on different addresses."""
    digest = hashlib.sha256(str(workdir.resolve()).encode()).digest()
    return f"127.{1 + digest[0] % 254}.{digest[1]}"


def node_address(workdir: Path, index: int) -> str:
    """The `index`th node's address (.10, .11, ... of the environment's /24)."""
    return f"{_environment_net(workdir)}.{10 + index}"


def pod_subnet(workdir: Path, index: int) -> str:
    """The `index`th node's Pod addresses: a /27 of the environment's /24 from .64 on, 29 Pods each
    (host-local keeps the first address for a gateway that nothing here routes through)."""
    return f"{_environment_net(workdir)}.{64 + 32 * index}/27"


def cni_conflist(subnet: str) -> dict[str, Any]:
    """The node's Pod network: an `eth0` of a tap device nothing holds, with an address from `subnet`.

    containerd sets up each Pod's loopback itself, beside this network.
    """
    ipam = {"type": "host-local", "ranges": [[{"subnet": subnet}]]}
    return {"cniVersion": "1.0.0", "name": POD_NETWORK, "plugins": [{"type": "tap", "ipam": ipam}]}


def node_mounts(state_dir: Path, subnet: str) -> list[tuple[Path, str]]:
    """What a kubelet node binds into its sandbox beside podman's state (NodeSandbox(mounts=...))."""
    dirs = {
        "kubelet": "/var/lib/kubelet",
        "containerd": "/var/lib/containerd",
        # The chart's agent.stateDir: a hostPath the agent and the node's podman share.
        "checkpointer": "/var/lib/checkpointer",
        "pod-logs": "/var/log/pods",
        "container-logs": "/var/log/containers",
        "cni": "/etc/cni/net.d",
        # CNI's own state: the results libcni caches and host-local's leases of Pod addresses.
        "cni-state": "/var/lib/cni",
    }
    mounts: list[tuple[Path, str]] = []
    for name, target in dirs.items():
        (state_dir / name).mkdir(parents=True, exist_ok=True)
        mounts.append((state_dir / name, target))
    (state_dir / "cni" / "10-pods.conflist").write_text(json.dumps(cni_conflist(subnet)))
    sysctl = state_dir / "sysctl"
    sysctl.mkdir(exist_ok=True)
    for key, value in KERNEL_TUNABLES.items():
        (sysctl / key.replace("/", ".")).write_text(value + "\n")
        mounts.append((sysctl / key.replace("/", "."), f"/proc/sys/{key}"))
    # The kubelet binary, built on the host, at the same path inside.
    mounts.append((BIN, str(BIN)))
    return mounts


@dataclass
class KubeletNode:
    """containerd and the kubelet of one node sandbox."""

    node: NodeSandbox
    address: str
    pod_subnet: str  # the addresses of its Pods with a network namespace of their own
    supervisor: Supervisor
    processes: list[Process] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.node.name

    def in_node(self, *argv: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        return [*self.node.nsenter_argv(), "/bin/sh", "-c", IN_NODE_CGROUPS, "in-node", *argv]

    def ctr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """containerd's own client inside the node, in the kubelet's namespace (k8s.io)."""
        argv = [*self.node.nsenter_argv(), "ctr", f"--address={CONTAINERD_SOCKET}", "-n", "k8s.io", *args]
        return run(argv, timeout=timeout, env=NODE_ENV)

    def start(self, control_plane: ControlPlane, registry: Registry, pause: str, timeout: float = 120) -> None:
        """containerd, pulling from `registry` with `pause` as its sandbox image, then the kubelet."""
        state = self.node.state_dir
        hosts = state / "containerd-hosts"
        (hosts / registry.host).mkdir(parents=True, exist_ok=True)
        (hosts / registry.host / "hosts.toml").write_text(HOSTS_TOML.format(host=registry.host))
        config = CONTAINERD_TOML.format(socket=CONTAINERD_SOCKET, hosts=hosts, pause=pause)
        (state / "containerd.toml").write_text(config)
        containerd = self.supervisor.start(
            f"containerd-{self.name}",
            self.in_node("containerd", f"--config={state / 'containerd.toml'}"),
            env=NODE_ENV,
        )
        self.processes.append(containerd)
        wait_until(
            f"{self.name} containerd", lambda: self.ctr("version", timeout=10) is not None, 60, log=containerd.log
        )

        kubelet_config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.address,
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": self.address,
            "healthzPort": free_port(),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(state / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            # This host's cgroups are v1 (hybrid), without systemd in the node: cgroupfs, and the
            # node's own subtree as the root. Kubelets from 1.35 on refuse v1 unless told not to.
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": "/",
            "cgroupsPerQOS": True,
            "failCgroupV1": False,
            "failSwapOn": False,
            "resolvConf": "",
            "makeIPTablesUtilChains": False,
            # Never collect images nor evict for disk: a pull in the middle of a test costs time.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "10s",
        }
        # The certificates live under the control plane's work directory, which the node cannot see.
        kubeconfig = state / "kubelet.kubeconfig"
        write_private(kubeconfig, control_plane.kubeconfig_for_node(self.name).read_text())
        (state / "ca.crt").write_bytes(control_plane.ca_file.read_bytes())
        config_file = state / "kubelet-config.yaml"
        config_file.write_text(yaml.safe_dump(kubelet_config))
        kubelet = self.supervisor.start(
            f"kubelet-{self.name}",
            self.in_node(
                BIN / "kubelet",
                f"--config={config_file}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                "--cloud-provider=external",
                "--v=1",
            ),
            env=NODE_ENV,
        )
        self.processes.append(kubelet)
        deadline = time.monotonic() + timeout

        def registered() -> bool:
            return control_plane.kubectl("get", "node", self.name, check=False).returncode == 0

        wait_until(f"Node {self.name} registered", registered, deadline - time.monotonic(), log=kubelet.log)
        self._initialize(control_plane)
        wait_until(
            f"Node {self.name} Ready", lambda: self.ready(control_plane), deadline - time.monotonic(), 0.5, kubelet.log
        )

    def _initialize(self, control_plane: ControlPlane) -> None:
        """What an external cloud provider does for a new Node: its addresses, then away with the taint."""
        status = {
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": self.address},
                    {"type": "Hostname", "address": self.name},
                ]
            }
        }
        control_plane.kubectl(
            "patch", "node", self.name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )
        control_plane.kubectl("taint", "node", self.name, f"{UNINITIALIZED_TAINT}-", check=False)

    def ready(self, control_plane: ControlPlane) -> bool:
        out = control_plane.kubectl("get", "node", self.name, "-o", "json").stdout
        conditions = json.loads(out)["status"].get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def stop(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
            if proc in self.supervisor.processes:
                self.supervisor.processes.remove(proc)
        self.processes.clear()

    def rss_kib(self) -> dict[str, int]:
        """Resident memory of this node's kubelet and containerd (the processes, not nsenter)."""
        result: dict[str, int] = {}
        for pid in self.node.processes():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                if comm in ("kubelet", "containerd"):
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            result[comm] = result.get(comm, 0) + int(line.split()[1])
            except OSError:
                continue
        return result


def helm(kubeconfig: Path, *args: str | os.PathLike[str], timeout: float = 300) -> str:
    """The repository's helm against the cluster of `kubeconfig`, with its state in a throwaway home."""
    home = kubeconfig.parent / "helm-home"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "KUBECONFIG": str(kubeconfig)}
    env |= {f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}
    return run([BIN / "helm", *args], env=env, timeout=timeout).stdout.decode()


def chart_values(server: str, image: str, storage: dict[str, object]) -> dict[str, object]:
    """Values that run the chart on these nodes: host-network Pods that reach the API server on loopback.

    `image`: the operator image's reference in the environment's registry, which the kubelets pull.

    A Pod's in-cluster configuration names the `kubernetes` Service's ClusterIP, which nothing here
    routes (there is no kube-proxy); the Pods are on the host's network, where the API server listens.
    The controller's health and metrics ports differ from the agent's: both may run on one node's (shared) network.
    """
    host, port = server.removeprefix("https://").rsplit(":", 1)
    api = [{"name": "KUBERNETES_SERVICE_HOST", "value": host}, {"name": "KUBERNETES_SERVICE_PORT", "value": port}]
    repository, tag = image.rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
        # The node's podman socket is in its state directory, another path on every node: the CLI.
        "podman": {"mode": "cli"},
        # containerd's, at the path the chart mounts by default: Pods' containers are checkpointed there.
        "cri": {"socketPath": CONTAINERD_SOCKET},
        "storage": storage,
        "controller": {
            "hostNetwork": True,
            "healthPort": 8081,
            "metricsPort": 9091,
            "agentPickupTimeoutSeconds": 30,
            "storageValidationSeconds": 10,
            "extraEnv": api,
        },
        "agent": {"hostNetwork": True, "extraEnv": [*api, {"name": "CHECKPOINTER_SWEEP_SECONDS", "value": "5"}]},
    }


def up_with_kubelets(workdir: Path, node_names: Sequence[str] = ("node-a", "node-b")) -> LocalEnv:
    """The local environment whose nodes each run containerd and a kubelet beside their podman.

    kube-scheduler runs with the control plane, and the registry (env.registry) holds the Pod
    sandbox image, the operator image and the workload images, which the nodes' podman also has.
    Nothing of the operator is installed, not even its CRDs: that is Helm's part. The release
    namespace and the S3 credentials Secret are there.
    """
    from localenv import operator_image
    from localenv.s3 import S3Server

    missing = missing_binaries()
    if missing:
        raise LocalEnvError(f"missing {', '.join(missing)}: run {OPT_IN}=1 hack/build/tools.sh")
    node_rootfs = rootfs()
    workdir.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(workdir / "logs")
    control_plane = ControlPlane.start(workdir / "control-plane", supervisor, rootfs=node_rootfs, kubelet_nodes=True)
    env = LocalEnv(workdir, supervisor, control_plane, None)
    try:
        env.s3 = S3Server.start(workdir / "s3", supervisor)
        env.registry = registry = Registry.start(workdir / "registry", supervisor)
        env.install_namespace()
        workloads = workload_images(node_rootfs)
        pause = pause_image(node_rootfs)
        for image in [pause, operator_image.operator_image(), *workloads]:
            registry.push(image)
        for index, name in enumerate(node_names):
            state_dir = (workdir / "nodes" / name).resolve()
            subnet = pod_subnet(workdir, index)
            node = NodeSandbox(
                name, workdir, rootfs=node_rootfs, supervisor=supervisor, mounts=node_mounts(state_dir, subnet)
            )
            node.start()
            env.nodes[name] = node
            load_images([node], workloads)
            runtime = KubeletNode(node, node_address(workdir, index), subnet, supervisor)
            env.kubelets[name] = runtime
            runtime.start(control_plane, registry, registry.reference(pause.ref))
    except BaseException:
        env.down()
        raise
    env.write_summary()
    return env


@dataclass
class KubeletCluster:
    """The local environment with kubelet nodes (up_with_kubelets), as the Helm-installed
    user story's cluster (localenv.cluster.ChartCluster)."""

    env: LocalEnv

    @classmethod
    def up(cls, workdir: Path) -> KubeletCluster:
        """Control plane with kube-scheduler, S3, and two nodes whose containerd has the operator image."""
        return cls(up_with_kubelets(workdir))

    @property
    def workdir(self) -> Path:
        return self.env.workdir

    @property
    def nodes(self) -> Mapping[str, NodeSandbox]:
        return self.env.nodes

    @property
    def s3(self) -> S3Server:
        server: S3Server = self.env.s3
        return server

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.env.control_plane.kubectl(*args, input=input, check=check)

    def apply(self, *objects: dict[str, Any]) -> None:
        self.env.apply(*objects)

    def read(self, kind: str, name: str, namespace: str = "default") -> dict[str, Any] | None:
        return self.env.read(kind, name, namespace)

    def list_objects(self, kind: str, namespace: str | None = None, field_selector: str = "") -> list[dict[str, Any]]:
        return self.env.list_objects(kind, namespace, field_selector)

    def wait_phase(
        self, kind: str, name: str, phases: Sequence[str], namespace: str = "default", timeout: float = 180
    ) -> dict[str, Any]:
        return self.env.wait_phase(kind, name, phases, namespace, timeout)

    def logs(self) -> str:
        return self.env.logs()

    def helm(self, *args: str | os.PathLike[str]) -> str:
        return helm(self.env.kubeconfig, *args, "--namespace", NAMESPACE)

    @property
    def registry(self) -> Registry:
        registry: Registry = self.env.registry
        return registry

    def chart_values(self, storage: dict[str, object]) -> dict[str, object]:
        from localenv import operator_image

        image = self.registry.reference(operator_image.operator_image().ref)
        return chart_values(self.env.control_plane.server, image, storage)

    def kubectl_as_node(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        plane = self.env.control_plane
        return plane.kubectl(*args, kubeconfig=plane.kubeconfig_for_node(node), check=False)

    def pod_subnet(self, node: str) -> str:
        runtime: KubeletNode = self.env.kubelets[node]
        return runtime.pod_subnet

    def runtime_rss_kib(self, node: str) -> dict[str, int]:
        runtime: KubeletNode = self.env.kubelets[node]
        return runtime.rss_kib()

    def pod_logs(self) -> str:
        logs = []
        for node in self.env.nodes.values():
            for log in sorted((node.state_dir / "pod-logs").rglob("*.log")):
                logs.append(f"--- {log} ---\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(logs)

    def down(self) -> None:
        self.env.down()


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[KubeletCluster]:
    """A KubeletCluster up for the block, and down after it; then LocalEnvError if it left anything.

    Left behind would be a cgroup, process or mount of its nodes, or a change to the machine's
    routes, routing rules or netfilter tables (Pods with a network namespace of their own included).
    """
    network = host_network()
    cluster = KubeletCluster.up(workdir)
    cgroups = [d for node in cluster.nodes.values() for d in node.cgroup_dirs]
    try:
        yield cluster
    finally:
        cluster.down()
    left = left_behind(cluster.env, cgroups, network)
    if left:
        raise LocalEnvError("the kubelet nodes left behind: " + "; ".join(left))


def left_behind(env: LocalEnv, cgroups: Sequence[Path], network: str) -> list[str]:
    """What of the stopped nodes is left: cgroups, processes in them, mounts, and whether the
    machine's network differs from `network` (host_network before they started).

    NodeSandbox.stop returned only once no process was left in a node's PID namespace or cgroups, so
    its mount namespace, and every mount made in it, ended with them.
    """
    found = [f"cgroup {d}" for d in cgroups if d.exists()]
    leaves = {f"/{d.name}/" for d in cgroups} | {f"/{d.name}\n" for d in cgroups}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and any(leaf in (entry / "cgroup").read_text() for leaf in leaves):
                found.append(f"process {entry.name} in a node's cgroup")
        except OSError:
            continue
    workdir = str(env.workdir.resolve())
    found += [f"mount {line}" for line in Path("/proc/self/mountinfo").read_text().splitlines() if workdir in line]
    if host_network() != network:
        found.append("a change to the machine's routes, rules or netfilter tables")
    return found


def host_network() -> str:
    """The host network namespace's routes, routing rules and netfilter ruleset.

    nftables comes from the node rootfs, run through its own loader (as etcd is): the kubelet's
    iptables would be that rootfs's, with the nf_tables backend.
    """
    node_rootfs = rootfs()
    libs = f"{node_rootfs}/lib/x86_64-linux-gnu:{node_rootfs}/usr/lib/x86_64-linux-gnu"
    loader = node_rootfs / "lib64/ld-linux-x86-64.so.2"
    nft: list[str | os.PathLike[str]] = [loader, "--argv0", "nft", "--library-path", libs, node_rootfs / "usr/sbin/nft"]
    argvs: list[list[str | os.PathLike[str]]] = [["ip", "route", "show", "table", "all"], ["ip", "rule"]]
    argvs.append([*nft, "list", "ruleset"])
    return "".join(run(argv).stdout.decode() for argv in argvs)
