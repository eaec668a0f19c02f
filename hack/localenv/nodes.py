"""Simulated cluster nodes: one podman + CRIU userland per node, side by side on one host.

A node is a private mount namespace and PID namespace whose root is the shared Debian trixie rootfs
(hack/node/rootfs.sh, mounted read-only), entered as docs/local-environment.md describes, with
`podman system service` as its long-running process. Each node keeps its state in its own host
directory, `<workdir>/nodes/<name>/`, which is mounted into the node at the same absolute path, so
the podman socket, spool files, FIFOs and exported archives have one path inside and outside.

Inside every node podman's storage lives at the standard paths (/var/lib/containers/storage,
/run/containers/storage), bind-mounted from the state directory. Identical paths on every node are
what a real cluster has, and cross-node restore depends on it: an exported checkpoint records the
runroot path of the node that made it (conmon's pidfile), and `podman container restore --import`
on a node with other paths fails. Because the default paths are used, a plain
`nsenter --target <pid> --mount --pid -- podman ...` works without storage flags, as on a real host.

Each node gets its own cgroup subtree (below the caller's cgroup, named checkpointer-<node>-<hash>)
bind-mounted onto /sys/fs/cgroup/<controller> inside the node, so the same container ID restored
on two nodes never shares a cgroup (a checkpoint freezes the whole cgroup), containers stay inside
the caller's cgroup limits, and stopping a node leaves no cgroup behind. No cgroup namespace is
involved, so a process that enters only the mount and PID namespaces sees the same cgroup paths as
the node's own podman service.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from localenv.procs import REPO_ROOT, LocalEnvError, Process, Supervisor, run, wait_until

NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# The environment of every podman process of a node, both the API service and the CLI.
NODE_ENV = {
    "PATH": NODE_PATH,
    "HOME": "/root",
    "LANG": "C.UTF-8",
    # podman 5 prints a deprecation warning on cgroup v1 for every command otherwise.
    "PODMAN_IGNORE_CGROUPSV1_WARNING": "1",
}

# runc: crun fails on this host's hybrid cgroup layout (docs/local-environment.md).
# netns "none": containers of all nodes would otherwise share the host's network namespace (ports
#   collide across nodes); "none" gives each container its own namespace with loopback only, which
#   CRIU checkpoints and restores on any node.
# cgroupns "host" (podman's default on cgroup v1 anyway, whatever this file says): the container
#   sees the node's cgroup tree, as on a real cgroup v1 host.
# log_driver k8s-file: there is no journald in a node.
CONTAINERS_CONF = """\
[containers]
netns = "none"
cgroupns = "host"
log_driver = "k8s-file"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
firewall_driver = "nftables"
"""

# The rootfs's storage.conf names only the driver, and podman then refuses to start ("runroot must
# be set"). The runroot is bind-mounted from the state directory: it holds every container's
# userdata (config, conmon pidfile), which must survive a restart of the node.
STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "/var/lib/containers/storage"
runroot = "/run/containers/storage"
"""

# Stage "outside" runs on the host: it joins the node's cgroups, then creates the namespaces and
# runs this script again as stage "inside", which becomes PID 1 of the node. "pivot_root . ." then
# "umount -l ." swaps the root without needing an empty directory in the read-only rootfs.
ENTER_SH = r"""set -eu
stage=$1 rootfs=$2 state=$3
if [ "$stage" = outside ]; then
  while read -r name dir; do echo 0 >"$dir/cgroup.procs"; done <"$state/cgroups"
  exec unshare --mount --propagation private --pid --fork --kill-child -- \
    /bin/sh "$0" inside "$rootfs" "$state"
fi
mount --bind "$rootfs" "$rootfs"
mount -t proc proc "$rootfs/proc"
mount --rbind /sys "$rootfs/sys"
mount --rbind /dev "$rootfs/dev"
# The host's cgroup mounts must go, not just be covered: runc takes the first cgroup mount it
# finds in mountinfo, and a covered host mount (root "/") makes it look for the container's cgroup
# at the wrong path.
umount -l "$rootfs/sys/fs/cgroup"
mount -t tmpfs -o mode=755 tmpfs "$rootfs/sys/fs/cgroup"
while read -r name dir; do
  mkdir "$rootfs/sys/fs/cgroup/$name"
  mount --bind "$dir" "$rootfs/sys/fs/cgroup/$name"
done <"$state/cgroups"
mount -t tmpfs -o mode=755 tmpfs "$rootfs/run"
mount -t tmpfs -o mode=1777 tmpfs "$rootfs/tmp"
# Mount points that are missing in the rootfs are made before it becomes read-only. Under /tmp they
# land in this node's tmpfs; elsewhere they are empty directories in the shared rootfs.
mkdir -p "$rootfs$state" "$rootfs/run/containers/storage" "$rootfs/var/lib/containers" \
  "$rootfs/etc/containers/networks"
touch "$rootfs/etc/containers/containers.conf" "$rootfs/etc/containers/storage.conf"
mount --bind "$state" "$rootfs$state"
mount --bind "$state/containers" "$rootfs/var/lib/containers"
mount --bind "$state/runroot" "$rootfs/run/containers/storage"
mount --bind "$state/var-tmp" "$rootfs/var/tmp"
mount --bind "$state/networks" "$rootfs/etc/containers/networks"
mount --bind "$state/containers.conf" "$rootfs/etc/containers/containers.conf"
mount --bind "$state/storage.conf" "$rootfs/etc/containers/storage.conf"
# Further binds of this node, "<host path> <path in the node>" per line (a kubelet node's, see
# hack/localenv/kubelet.py); the file is absent on other nodes.
if [ -f "$state/mounts" ]; then
  while read -r src dst; do
    if [ -d "$src" ]; then mkdir -p "$rootfs$dst"; elif [ ! -e "$rootfs$dst" ]; then touch "$rootfs$dst"; fi
    mount --bind "$src" "$rootfs$dst"
  done <"$state/mounts"
fi
mount -o remount,bind,ro "$rootfs"
cd "$rootfs"
pivot_root . .
umount -l .
cd /
# The service runs under a shell loop rather than as catatonit's child itself, so that it can be
# stopped (a fault the tests inject) without ending PID 1 and with it every container of the node.
# While the flag file exists the loop waits instead of starting the service again.
exec catatonit -- /bin/sh -c '
while :; do
  podman system service --time=0 "unix://$1/podman.sock" || :
  while [ -e "$1/podman-service.stopped" ]; do sleep 0.2; done
  sleep 0.2
done' podman-service "$state"
"""


def rootfs_path() -> Path:
    """The cached node rootfs; builds it (debootstrap, minutes) when missing."""
    out = run(["bash", REPO_ROOT / "hack/node/rootfs.sh"], timeout=1800).stdout.decode().strip()
    return Path(out.splitlines()[-1])


def _cgroup_hierarchies() -> list[tuple[str, Path]]:
    """(name under /sys/fs/cgroup, host directory of this process's cgroup) per mounted hierarchy."""
    own: dict[frozenset[str], str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[frozenset(controllers.split(",")) - {""}] = path
    known = frozenset[str]().union(*own)
    result = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, super_fields = line.partition(" - ")
        root, mountpoint = fields.split()[3:5]
        fstype, _, super_opts = super_fields.split()
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mount = Path(mountpoint)
        if mount.parent != Path("/sys/fs/cgroup"):
            raise LocalEnvError(
                f"unsupported cgroup layout: {fstype} mounted at {mount} (expected below /sys/fs/cgroup)"
            )
        keys = frozenset[str]() if fstype == "cgroup2" else frozenset(super_opts.split(",")) & known
        path = own[keys]
        rel = os.path.relpath(path, root)
        result.append((mount.name, (mount / rel).resolve()))
    if not result:
        raise LocalEnvError("no cgroup hierarchies mounted below /sys/fs/cgroup")
    return result


class NodeSandbox:
    """One simulated node named `name` with its state in `<workdir>/nodes/<name>/`."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        rootfs: Path | None = None,
        supervisor: Supervisor | None = None,
        mounts: Sequence[tuple[Path, str]] = (),
    ) -> None:
        """`mounts`: further (host path, path in the node) binds, made before the rootfs turns read-only."""
        self.name = name
        self._mounts = list(mounts)
        self.state_dir = (workdir / "nodes" / name).resolve()
        self.socket = self.state_dir / "podman.sock"
        # Where callers put export archives and FIFOs: the same path inside and outside the node.
        self.spool_dir = self.state_dir / "spool"
        self._rootfs = rootfs
        self._supervisor = supervisor or Supervisor(self.state_dir / "logs")
        self._process: Process | None = None
        self._init_pid: int | None = None
        self._pid_ns = ""
        self._mnt_ns = ""
        tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
        self._cgroup_leaf = f"checkpointer-{name}-{tag}"
        self._cgroups: list[tuple[str, Path]] = []

    def __repr__(self) -> str:
        return f"NodeSandbox({self.name!r}, pid={self._init_pid})"

    def __enter__(self) -> NodeSandbox:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def rootfs(self) -> Path:
        """The node's root filesystem on the host (shared by all nodes, read-only inside them)."""
        if self._rootfs is None:
            self._rootfs = rootfs_path()
        return self._rootfs

    @property
    def log(self) -> Path:
        """Output of the enter script and of `podman system service`."""
        return self._supervisor.log_dir / f"{self.name}.log"

    @property
    def init_pid(self) -> int:
        """Host PID of the node's PID 1: `nsenter --target <it> --mount --pid` enters the node."""
        if self._init_pid is None:
            raise LocalEnvError(f"node {self.name} is not running")
        return self._init_pid

    @property
    def pid_namespace(self) -> str:
        """e.g. "pid:[4026532301]"; processes of the node are those whose /proc/PID/ns/pid is this."""
        return self._pid_ns

    @property
    def mount_namespace(self) -> str:
        """e.g. "mnt:[4026532300]"; every mount of the node (overlays, binds) lives only there."""
        return self._mnt_ns

    @property
    def cgroup_dirs(self) -> list[Path]:
        """Host directories of the node's cgroups, one per hierarchy, while it runs."""
        return [leaf for _, leaf in self._cgroups]

    def running(self) -> bool:
        return self._process is not None and self._process.alive()

    def start(self, timeout: float = 60) -> None:
        if self.running():
            return
        rootfs = self.rootfs
        for sub in ("containers", "runroot", "var-tmp", "networks", "spool", "logs"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        self._service_stopped_flag.unlink(missing_ok=True)
        (self.state_dir / "containers.conf").write_text(CONTAINERS_CONF)
        (self.state_dir / "storage.conf").write_text(STORAGE_CONF)
        enter = self.state_dir / "enter.sh"
        enter.write_text(ENTER_SH)
        mounts = self.state_dir / "mounts"
        mounts.unlink(missing_ok=True)
        if self._mounts:
            mounts.write_text("".join(f"{src} {dst}\n" for src, dst in self._mounts))
        self._cgroups = self._make_cgroups()
        (self.state_dir / "cgroups").write_text("".join(f"{n} {d}\n" for n, d in self._cgroups))

        argv: list[str | os.PathLike[str]] = ["/bin/sh", enter, "outside", rootfs, self.state_dir]
        self._process = self._supervisor.start(self.name, argv, env=NODE_ENV)
        try:
            wait_until(f"node {self.name} podman API", self._ping, timeout=timeout, log=self._process.log)
        except BaseException:
            self.stop()
            raise
        # The podman service answers only after the whole enter script ran, so unshare's only child
        # is now the node's PID 1 (catatonit).
        init = self._child_of_unshare()
        if init is None:
            self.stop()
            raise LocalEnvError(f"node {self.name}: unshare has no child although the podman API answers")
        self._init_pid = init
        self._pid_ns = os.readlink(f"/proc/{init}/ns/pid")
        self._mnt_ns = os.readlink(f"/proc/{init}/ns/mnt")

    def stop(self, timeout: float = 30) -> None:
        """End every process of the node and remove its cgroups; its mounts go with its namespace."""
        init = self._init_pid or self._child_of_unshare()
        if init is not None:
            try:
                self._pid_ns = self._pid_ns or os.readlink(f"/proc/{init}/ns/pid")
                # SIGKILL to the PID namespace's init makes the kernel kill every process in it.
                os.kill(init, signal.SIGKILL)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.popen.wait(timeout)
            self._supervisor.stop(self.name)
            self._process = None
        wait_until(f"node {self.name} processes to exit", lambda: not self.processes(), timeout=timeout)
        self._init_pid = None
        self._remove_cgroups(timeout)

    def _child_of_unshare(self) -> int | None:
        if self._process is None or not self._process.alive():
            return None
        pid = self._process.popen.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return None
        # Before its exec of unshare the outside stage has no children; after it, exactly one.
        return int(children[0]) if len(children) == 1 else None

    def processes(self) -> list[int]:
        """Host PIDs of the node's processes: those in its PID namespace, and those in its cgroups.

        Container processes sit in nested PID namespaces, so /proc/PID/ns/pid does not name the
        node's; they are found by their cgroup. Processes that entered with nsenter (a podman CLI
        run from the host) keep the caller's cgroup; they are found by the namespace.
        """
        if not self._pid_ns:
            return []
        marker = f"/{self._cgroup_leaf}"
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") == self._pid_ns or marker in (entry / "cgroup").read_text():
                    pids.append(int(entry.name))
            except OSError:  # the process exited meanwhile
                continue
        return pids

    @property
    def _service_stopped_flag(self) -> Path:
        return self.state_dir / "podman-service.stopped"

    def service_pids(self) -> list[int]:
        """Host PIDs of the node's `podman system service` (none while it is stopped)."""
        pids = []
        for pid in self.processes():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:  # exited meanwhile
                continue
            if len(argv) >= 3 and argv[0].rsplit(b"/", 1)[-1] == b"podman" and argv[1:3] == [b"system", b"service"]:
                pids.append(pid)
        return pids

    def service_running(self) -> bool:
        try:
            return self._ping()
        except OSError:
            return False

    def stop_service(self, timeout: float = 30, kill: bool = False) -> None:
        """Stop the podman API service; the node, its containers and the podman CLI stay.

        SIGTERM lets podman close its socket (the file goes away); `kill` leaves a dead socket
        behind, as a crashed service does. Either way nothing answers on it until `start_service`.
        """
        self._service_stopped_flag.touch()
        deadline = time.monotonic() + timeout
        for pid in self.service_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        while self.service_pids():
            if time.monotonic() > deadline:
                # A graceful shutdown waits for open requests; past the deadline it is cut short.
                for pid in self.service_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + timeout
            time.sleep(0.1)

    def start_service(self, timeout: float = 60) -> None:
        """Start the podman API service again after `stop_service` and wait until it answers."""
        if not self.running():
            raise LocalEnvError(f"node {self.name} is not running")
        if not self.service_pids():
            # A killed service leaves its socket file; the next one must bind a fresh one.
            self.socket.unlink(missing_ok=True)
        self._service_stopped_flag.unlink(missing_ok=True)
        wait_until(f"node {self.name} podman API", self._ping, timeout=timeout, log=self.log)

    def nsenter_argv(self) -> list[str]:
        return ["nsenter", "--target", str(self.init_pid), "--mount", "--pid", "--"]

    def podman(
        self,
        *args: str | os.PathLike[str],
        timeout: float = 120,
        check: bool = True,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the podman CLI inside the node, as the product's CLI adapter does."""
        return run([*self.nsenter_argv(), "podman", *args], timeout=timeout, check=check, env=NODE_ENV, input=input)

    def load_image(self, archive: Path, timeout: float = 120) -> None:
        """`podman load` an image archive (docker-archive) that lives anywhere on the host."""
        self.podman("load", "--quiet", timeout=timeout, input=archive.read_bytes())

    def _ping(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(str(self.socket))
            s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            reply = s.recv(4096)
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply.split(b"\r\n", 1)[0]

    def _make_cgroups(self) -> list[tuple[str, Path]]:
        cgroups = []
        for name, parent in _cgroup_hierarchies():
            leaf = parent / self._cgroup_leaf
            leaf.mkdir(exist_ok=True)
            # A v1 cpuset cgroup starts with no CPUs and memory nodes and refuses tasks until given some.
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (leaf / knob).exists() and not (leaf / knob).read_text().strip():
                    (leaf / knob).write_text((parent / knob).read_text())
            cgroups.append((name, leaf))
        return cgroups

    def _remove_cgroups(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for _, leaf in self._cgroups:
            # Deepest first; a cgroup is removable once its last task is gone, which can lag a kill.
            while leaf.exists():
                try:
                    for dirpath, _dirs, _files in os.walk(leaf, topdown=False):
                        os.rmdir(dirpath)
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        self._cgroups = []
