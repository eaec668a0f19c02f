"""A real Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager.

The API server runs with the flags of a production cluster that matter to the operator (client
certificates, RBAC, service-account tokens, admission), and the controller manager runs the
controllers an operator's tests lean on: namespace deletion, owner-reference garbage collection,
default ServiceAccounts and the aggregated `admin`/`edit`/`view` ClusterRoles. There are no
kubelets, scheduler or pod controllers: nodes are `Node` objects plus agent processes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from localenv.api import Api
from localenv.pki import CertificateAuthority, CertKey, create_service_account_keys
from localenv.procs import BIN, REPO_ROOT, LocalEnvError, Process, Supervisor, free_port, run

BINARIES = ("kube-apiserver", "kube-controller-manager", "kubectl")

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
# The first address of the service range is the `kubernetes` Service's ClusterIP; in-cluster
# clients (and anything that copies their TLS checks) reach the API server under these names.
API_SERVER_HOSTS = (
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "10.0.0.1",
)
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Canonical names since Kubernetes 1.28 (the short forms such as `namespace` are aliases).
CONTROLLERS = (
    "namespace-controller",
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "clusterrole-aggregation-controller",
    "root-ca-certificate-publisher-controller",
)
# With kubelets on the nodes (opt-in, hack/localenv/kubelet.py): what runs a Deployment and a DaemonSet.
WORKLOAD_CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "daemonset-controller",
    "pod-garbage-collector-controller",
    # Takes the not-ready taint a kubelet registers its Node with away once the Node is Ready.
    "node-lifecycle-controller",
)


def missing_binaries() -> list[str]:
    """The control-plane binaries hack/build/tools.sh has not built (yet)."""
    return [name for name in BINARIES if not os.access(BIN / name, os.X_OK)]


def kubernetes_version() -> str:
    """The version hack/build/tools.sh builds, read from the same place it reads it."""
    text = (REPO_ROOT / "hack/lib/common.sh").read_text()
    match = re.search(r"^KUBERNETES_VERSION=(v[0-9.]+)\s*$", text, re.MULTILINE)
    if match is None:
        raise LocalEnvError("KUBERNETES_VERSION not found in hack/lib/common.sh")
    return match.group(1)


def node_rootfs() -> Path:
    """The trixie rootfs (built on first use) that holds etcd and the node userland."""
    out = run(["bash", REPO_ROOT / "hack/node/rootfs.sh"], timeout=1800).stdout.decode()
    return Path(out.strip().splitlines()[-1])


def etcd_command(rootfs: Path) -> list[str]:
    """etcd from the rootfs, run on the host through the rootfs's own loader and libraries.

    The rootfs's etcd is linked against a newer glibc than the host's; its loader with an explicit
    library path runs it without a chroot or namespaces.
    """
    libs = f"{rootfs}/lib/x86_64-linux-gnu:{rootfs}/usr/lib/x86_64-linux-gnu"
    loader = rootfs / "lib64/ld-linux-x86-64.so.2"
    return [str(loader), "--argv0", "etcd", "--library-path", libs, str(rootfs / "usr/bin/etcd")]


def _kubeconfig(server: str, ca_file: Path, user: dict[str, str], name: str) -> dict[str, Any]:
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    # Credentials are embedded so that a kubeconfig stays valid when copied or mounted elsewhere.
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority-data": b64(ca_file)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": name}}],
        "current-context": "local",
    }


def _cert_user(files: CertKey) -> dict[str, str]:
    return {
        "client-certificate-data": base64.b64encode(files.cert.read_bytes()).decode(),
        "client-key-data": base64.b64encode(files.key.read_bytes()).decode(),
    }


def write_private(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _wait(what: str, probe: Callable[[], bool], processes: Sequence[Process], timeout: float) -> None:
    """Poll `probe` until true; fail at once, with the log, when one of `processes` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        for proc in processes:
            if not proc.alive():
                tail = proc.log.read_text(errors="replace")[-4000:]
                raise LocalEnvError(
                    f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}\n"
                    f"--- {proc.log} ---\n{tail}"
                )
        try:
            if probe():
                return
        except (OSError, urllib.error.URLError):  # not listening yet
            pass
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {p.log} ---\n{p.log.read_text(errors='replace')[-2000:]}" for p in processes)
            raise LocalEnvError(f"timed out after {timeout}s waiting for {what}{logs}")
        time.sleep(0.2)


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager under `workdir`, started by `start()`.

    Everything it writes lives under `workdir` (certificates, etcd data, kubeconfigs, kubectl's
    discovery cache); its processes belong to `supervisor` and log to `supervisor.log_dir`.
    """

    ETCD = "etcd"
    APISERVER = "kube-apiserver"
    CONTROLLER_MANAGER = "kube-controller-manager"
    SCHEDULER = "kube-scheduler"

    def __init__(self, workdir: Path, supervisor: Supervisor) -> None:
        self.workdir = workdir
        self.supervisor = supervisor
        self.pki_dir = workdir / "pki"
        self.kubeconfig_dir = workdir / "kubeconfigs"
        self.etcd_dir = workdir / "etcd"
        self.kubectl_cache_dir = workdir / "kubectl-cache"
        self.kubeconfig = self.kubeconfig_dir / "admin.kubeconfig"
        self.ca_file = self.pki_dir / "ca.crt"
        self.server = ""
        self.etcd_url = ""
        self.ca: CertificateAuthority | None = None
        self._processes: list[Process] = []
        # Each component's command line, so that one can be stopped and started again as it was.
        self._argv: dict[str, list[str | os.PathLike[str]]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._api: Api | None = None
        self.kubelet_nodes = False

    @classmethod
    def start(
        cls,
        workdir: Path,
        supervisor: Supervisor,
        *,
        rootfs: Path | None = None,
        timeout: float = 120,
        kubelet_nodes: bool = False,
    ) -> ControlPlane:
        """Start all three components and return once the cluster is usable.

        Usable means: /readyz is ok and the controller manager has made the `default`
        ServiceAccount in `default` (so the ServiceAccount admission plugin admits pods and the
        controllers are running). On failure, whatever was started is stopped before raising.
        With `kubelet_nodes` the controller manager also runs Deployments and DaemonSets, and
        kube-scheduler runs beside it, for nodes with a kubelet.
        """
        missing = missing_binaries()
        if missing:
            raise LocalEnvError(f"missing {', '.join(missing)} in {BIN}: run hack/build/tools.sh")
        plane = cls(workdir, supervisor)
        plane.kubelet_nodes = kubelet_nodes
        try:
            plane._start(rootfs or node_rootfs(), timeout)
        except BaseException:
            plane.stop()
            raise
        return plane

    def _start(self, rootfs: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ca = CertificateAuthority.create(self.pki_dir)
        self.ca = ca
        serving = ca.issue_server(self.pki_dir, "apiserver", API_SERVER_HOSTS)
        kcm_serving = ca.issue_server(self.pki_dir, "kube-controller-manager-serving", ["127.0.0.1", "localhost"])
        admin = ca.issue_client(self.pki_dir, "admin", "checkpointer-admin", ["system:masters"])
        # The identity kubeadm gives the controller manager; the bootstrap RBAC policy grants it
        # what it needs, and each controller then acts as its own kube-system ServiceAccount.
        kcm = ca.issue_client(self.pki_dir, "kube-controller-manager", "system:kube-controller-manager")
        sa_keys = create_service_account_keys(self.pki_dir)

        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        self._ssl = ctx

        etcd_client, etcd_peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{etcd_client}"
        peer_url = f"http://127.0.0.1:{etcd_peer}"
        self.etcd_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        etcd = self._spawn(
            self.ETCD,
            [
                *etcd_command(rootfs),
                "--name=local",
                f"--data-dir={self.etcd_dir}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=local={peer_url}",
                # Throwaway data: skipping fsync makes every API write much faster.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        _wait(
            "etcd /health",
            lambda: b'"health":"true"' in self._http(self.etcd_url + "/health")[1],
            [etcd],
            deadline - time.monotonic(),
        )

        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        kubelet_client: list[str] = []
        if self.kubelet_nodes:
            # `kubectl logs`, `exec` and the node proxy go through the API server to a kubelet, which
            # authenticates it by a client certificate as a real cluster's (kubeadm's) does, and which
            # it reaches at the address the environment gives each Node (hack/localenv/kubelet.py):
            # node names resolve to nothing here.
            client = ca.issue_client(self.pki_dir, "apiserver-kubelet-client", "kube-apiserver-kubelet-client")
            kubelet_client = [
                f"--kubelet-client-certificate={client.cert}",
                f"--kubelet-client-key={client.key}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        apiserver = self._spawn(
            self.APISERVER,
            [
                BIN / "kube-apiserver",
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                # The `kubernetes` Service gets no Endpoints: there are no pods to use them, and the
                # default reconciler rejects a loopback address every 10 s in the log.
                "--endpoint-reconciler-type=none",
                f"--secure-port={port}",
                f"--cert-dir={self.pki_dir}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={self.ca_file}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--allow-privileged=true",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={sa_keys.public_key}",
                f"--service-account-signing-key-file={sa_keys.private_key}",
                "--profiling=false",
                *kubelet_client,
            ],
        )
        _wait(
            "kube-apiserver /readyz",
            lambda: self._http(self.server + "/readyz") == (200, b"ok"),
            [etcd, apiserver],
            deadline - time.monotonic(),
        )

        self._write_kubeconfig(self.kubeconfig, _cert_user(admin), "admin")
        kcm_kubeconfig = self.kubeconfig_dir / "kube-controller-manager.kubeconfig"
        self._write_kubeconfig(kcm_kubeconfig, _cert_user(kcm), "kube-controller-manager")
        controllers = CONTROLLERS + (WORKLOAD_CONTROLLERS if self.kubelet_nodes else ())
        controller_manager = self._spawn(
            self.CONTROLLER_MANAGER,
            [
                BIN / "kube-controller-manager",
                f"--kubeconfig={kcm_kubeconfig}",
                f"--authentication-kubeconfig={kcm_kubeconfig}",
                f"--authorization-kubeconfig={kcm_kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--tls-cert-file={kcm_serving.cert}",
                f"--tls-private-key-file={kcm_serving.key}",
                f"--controllers={','.join(controllers)}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                # serviceaccount-token-controller signs legacy token Secrets with it.
                f"--service-account-private-key-file={sa_keys.private_key}",
                # root-ca-certificate-publisher-controller publishes it as kube-root-ca.crt.
                f"--root-ca-file={self.ca_file}",
                "--profiling=false",
            ],
        )
        _wait(
            "the default ServiceAccount (made by kube-controller-manager)",
            lambda: self._http(self.server + "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            [etcd, apiserver, controller_manager],
            deadline - time.monotonic(),
        )
        if self.kubelet_nodes:
            # What the API server's kubelet client may do at a kubelet: the bootstrap role for it.
            self.kubectl(
                "create",
                "clusterrolebinding",
                "kube-apiserver-kubelet-client",
                "--clusterrole=system:kubelet-api-admin",
                "--user=kube-apiserver-kubelet-client",
            )
            self._start_scheduler(ca)

    def _start_scheduler(self, ca: CertificateAuthority) -> None:
        client = ca.issue_client(self.pki_dir, "kube-scheduler", "system:kube-scheduler")
        serving = ca.issue_server(self.pki_dir, "kube-scheduler-serving", ["127.0.0.1", "localhost"])
        kubeconfig = self.kubeconfig_dir / "kube-scheduler.kubeconfig"
        self._write_kubeconfig(kubeconfig, _cert_user(client), "kube-scheduler")
        self._spawn(
            self.SCHEDULER,
            [
                BIN / "kube-scheduler",
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )

    def kubeconfig_for_node(self, node: str) -> Path:
        """The kubelet's kubeconfig of `node`: a client certificate of system:node:<node> in system:nodes,
        the identity the Node authorizer and NodeRestriction confine to that node."""
        if self.ca is None:
            raise LocalEnvError("the control plane is not started")
        files = self.ca.issue_client(
            self.pki_dir / "nodes", f"kubelet-{_safe(node)}", f"system:node:{node}", ["system:nodes"]
        )
        path = self.kubeconfig_dir / f"kubelet-{_safe(node)}.kubeconfig"
        self._write_kubeconfig(path, _cert_user(files), f"system:node:{node}")
        return path

    def _spawn(self, name: str, argv: Sequence[str | os.PathLike[str]]) -> Process:
        # cwd=workdir: anything a component drops in its working directory stays under workdir.
        proc = self.supervisor.start(name, argv, cwd=self.workdir)
        self._processes.append(proc)
        self._argv[name] = list(argv)
        return proc

    def _component(self, name: str) -> Process | None:
        return next((p for p in self._processes if p.name == name), None)

    def stop_apiserver(self, kill: bool = False) -> None:
        """Stop kube-apiserver alone; etcd and the controller manager keep running.

        Returns once it takes no connection. Stopped gracefully, it may go on ending the requests it
        has for a while (10 s and more with watches open): start_apiserver waits for what is left of
        that grace, then kills it.
        """
        proc = self._component(self.APISERVER)
        if proc is None:
            return
        if kill and proc.alive():
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.stop()
            return
        proc.terminate()
        port = int(self.server.rsplit(":", 1)[1])
        deadline = time.monotonic() + 10
        while proc.alive() and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:  # refused: it no longer listens
                return
            time.sleep(0.1)
        proc.stop()

    def start_apiserver(self, timeout: float = 120) -> None:
        """Start kube-apiserver again with the same flags, port and certificates; wait for /readyz."""
        old = self._component(self.APISERVER)
        if old is not None and old.terminated_at is not None:
            old.stop()  # what is left of its grace
        if old is not None and old.alive():
            return
        proc = self.supervisor.start(self.APISERVER, self._argv[self.APISERVER], cwd=self.workdir)
        # The new process takes the old one's place, so that stop() still ends components in order.
        if old is not None:
            self._processes[self._processes.index(old)] = proc
            self.supervisor.processes.remove(proc)
            if old in self.supervisor.processes:
                self.supervisor.processes[self.supervisor.processes.index(old)] = proc
            else:
                self.supervisor.processes.append(proc)
        else:
            self._processes.append(proc)
        etcd = self._component(self.ETCD)
        _wait(
            "kube-apiserver /readyz",
            lambda: self._http(self.server + "/readyz") == (200, b"ok"),
            [p for p in (etcd, proc) if p is not None],
            timeout,
        )

    @property
    def api(self) -> Api:
        """The API server as admin, in process (localenv/api.py): for the tests' many reads and waits."""
        if self._api is None:
            if self._ssl is None or not self.server:
                raise LocalEnvError("the control plane is not started")
            self._api = Api(self.server, self._ssl)
        return self._api

    def close_api(self) -> None:
        """Close the in-process client's connections (it opens new ones if asked again)."""
        if self._api is not None:
            self._api.close()

    def _http(self, url: str) -> tuple[int, bytes]:
        context = self._ssl if url.startswith("https:") else None
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def _write_kubeconfig(self, path: Path, user: dict[str, str], name: str) -> None:
        config = _kubeconfig(self.server, self.ca_file, user, name)
        write_private(path, yaml.safe_dump(config, sort_keys=False))

    def stop(self) -> None:
        """End the processes, newest first. Idempotent; the files stay for the caller to remove."""
        self.close_api()
        for proc in reversed(self._processes):
            proc.stop()
            if proc in self.supervisor.processes:
                self.supervisor.processes.remove(proc)
        self._processes.clear()

    def kubectl(
        self,
        *args: str | os.PathLike[str],
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl as admin (or with `kubeconfig`); raises LocalEnvError if `check`."""
        argv: list[str | os.PathLike[str]] = [
            BIN / "kubectl",
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            # kubectl otherwise caches discovery under ~/.kube/cache, one folder per random port.
            f"--cache-dir={self.kubectl_cache_dir}",
            *args,
        ]
        proc = run(argv, timeout=timeout, check=check, input=input.encode() if input is not None else None)
        return subprocess.CompletedProcess(
            proc.args,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )

    def kubeconfig_for_user(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig authenticating as `user` in `groups` with a client certificate from the CA."""
        if self.ca is None:
            raise LocalEnvError("the control plane is not started")
        # The identity is part of the name so a second call never changes an earlier file's user.
        digest = hashlib.sha256("\0".join([user, *groups]).encode()).hexdigest()[:8]
        name = f"user-{_safe(user)}-{digest}"
        files = self.ca.issue_client(self.pki_dir / "users", name, user, groups)
        path = self.kubeconfig_dir / f"{name}.kubeconfig"
        self._write_kubeconfig(path, _cert_user(files), user)
        return path

    def kubeconfig_for_serviceaccount(
        self, namespace: str, name: str, duration: str = "24h", *, pod: str | None = None
    ) -> Path:
        """A kubeconfig with a bound token (TokenRequest API) for an existing ServiceAccount.

        With `pod` (a Pod of that ServiceAccount in `namespace`) the token is bound to the Pod, as the
        one a kubelet projects into it: it carries the Pod's node (user info extra
        `authentication.kubernetes.io/node-name`) and stops working when the Pod is deleted.
        """
        bound = ["--bound-object-kind=Pod", f"--bound-object-name={pod}"] if pod else []
        token = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}", *bound).stdout.strip()
        suffix = f"-pod-{_safe(pod)}" if pod else ""
        path = self.kubeconfig_dir / f"sa-{_safe(namespace)}-{_safe(name)}{suffix}.kubeconfig"
        self._write_kubeconfig(path, {"token": token}, f"system:serviceaccount:{namespace}:{name}")
        return path
