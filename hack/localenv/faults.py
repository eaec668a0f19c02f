"""Real faults on a running local environment, for the fault tests and the soak.

Nothing here is simulated: a stopped S3 server or API server is a process that has exited, a
stopped podman service no longer answers on its socket, a killed agent got SIGKILL, and a full spool
is a filesystem of its own that has run out of blocks. Every fault has its repair, and the context
managers repair on exit, so that later tests see the whole environment again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from localenv.cluster import Cluster
from localenv.env import LocalEnv
from localenv.procs import LocalEnvError, ProcessExited, run, wait_until

# --- S3 ------------------------------------------------------------------------------------------


def stop_s3(env: LocalEnv, kill: bool = False) -> None:
    """Stop the S3 server; its data, open multipart uploads included, stays on disk."""
    env.s3.stop_process(kill=kill)


def start_s3(env: LocalEnv, timeout: float = 60) -> None:
    """Serve the same data again on the same endpoint with the same credentials."""
    env.s3.start_again(timeout=timeout)


@contextlib.contextmanager
def s3_down(env: LocalEnv) -> Iterator[None]:
    stop_s3(env)
    try:
        yield
    finally:
        start_s3(env)


# --- control plane -------------------------------------------------------------------------------


def stop_apiserver(env: LocalEnv, kill: bool = False) -> None:
    """Stop kube-apiserver only: etcd keeps the cluster's state, the controller manager keeps running."""
    env.control_plane.stop_apiserver(kill=kill)


def start_apiserver(env: LocalEnv, timeout: float = 120) -> None:
    """Start kube-apiserver with the flags, port and certificates it had; return once it is ready."""
    env.control_plane.start_apiserver(timeout=timeout)


@contextlib.contextmanager
def apiserver_down(env: LocalEnv) -> Iterator[None]:
    """The API server stopped, then started again; a controller that stopped meanwhile because it
    could not renew its Lease is started again, as its Deployment would."""
    stop_apiserver(env)
    try:
        yield
    finally:
        start_apiserver(env)
        env.restart_exited_controllers()


# --- podman on a node ----------------------------------------------------------------------------


def stop_podman_service(env: LocalEnv, node: str, kill: bool = False) -> None:
    """Stop the node's `podman system service`: its API socket goes away, the node and its containers stay.

    The podman CLI inside the node keeps working, as it does on a host whose podman.socket is stopped.
    """
    env.nodes[node].stop_service(kill=kill)


def start_podman_service(env: LocalEnv, node: str, timeout: float = 60) -> None:
    env.nodes[node].start_service(timeout=timeout)


@contextlib.contextmanager
def podman_service_down(env: LocalEnv, node: str) -> Iterator[None]:
    stop_podman_service(env, node)
    try:
        yield
    finally:
        start_podman_service(env, node)


# --- agents --------------------------------------------------------------------------------------


def _healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
        return bool(reply.status == 200)


def restart_agent(
    env: LocalEnv, node: str, settings: Mapping[str, str] | None = None, kill: bool = False, timeout: float = 60
) -> None:
    """Stop (or SIGKILL, with `kill`) the node's agent and start it again with `settings` added.

    `settings` are CHECKPOINTER_* variables on top of the environment's defaults; without them the
    agent starts as the environment starts it. Returns once the new agent answers its liveness
    probe: its Lease may be the old agent's, so the Lease alone says nothing.
    """
    env.stop_agent(node, kill=kill)
    process = env.start_agent(node, dict(settings or {}))
    port = env.health_ports[f"agent-{node}"]

    def up() -> bool:
        if not process.alive():
            raise ProcessExited(f"agent {node} exited with {process.popen.returncode}, see {process.log}")
        return _healthy(port)

    wait_until(f"agent {node} /healthz", up, timeout=timeout, log=process.log)


@contextlib.contextmanager
def agent_settings(env: LocalEnv, node: str, settings: Mapping[str, str]) -> Iterator[None]:
    """The node's agent runs with `settings` inside the block and with the defaults after it."""
    restart_agent(env, node, settings)
    try:
        yield
    finally:
        restart_agent(env, node, None)


# --- the spool's filesystem ----------------------------------------------------------------------

SMALL_SPOOL_PREFIX = "small-spool-"


def small_spools(env: Cluster, node: str) -> list[Path]:
    """The small spools mounted on `node` now (each one a possible CHECKPOINTER_SPOOL_DIR)."""
    state = env.nodes[node].state_dir
    return sorted(p / "mnt" for p in state.glob(f"{SMALL_SPOOL_PREFIX}*") if os.path.ismount(p / "mnt"))


@contextlib.contextmanager
def small_spool(env: LocalEnv, node: str, size_mib: int) -> Iterator[Path]:
    """A filesystem of `size_mib` MiB of its own under the node's state directory; yields its path.

    The same path has to be the same filesystem inside the node and outside it: the podman CLI
    writes exports at the spool path from inside the node, the agent reads them from outside. The
    node's mount namespace does not receive new host mounts (its propagation is private), so the
    filesystem is an ext4 image on a loop device, mounted once in each namespace: two mounts of one
    block device share one superblock, hence one set of files and one count of free blocks.
    """
    sandbox = env.nodes[node]
    base = sandbox.state_dir / f"{SMALL_SPOOL_PREFIX}{uuid.uuid4().hex[:6]}"
    mountpoint = base / "mnt"
    image = base / "fs.img"
    mountpoint.mkdir(parents=True)
    with image.open("wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    # No reserved blocks and no journal: the whole size is there for the spool, as tmpfs's would be.
    run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", image])
    device = run(["losetup", "--find", "--show", image]).stdout.decode().strip()
    mounted_host = mounted_node = False
    try:
        run(["mount", device, mountpoint])
        mounted_host = True
        run([*sandbox.nsenter_argv(), "mount", device, mountpoint])
        mounted_node = True
        yield mountpoint
    finally:
        errors = []
        if mounted_node and sandbox.running():
            errors += _umount([*sandbox.nsenter_argv(), "umount"], mountpoint)
        if mounted_host:
            errors += _umount(["umount"], mountpoint)
        run(["losetup", "-d", device], check=False)
        if not errors:
            image.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                mountpoint.rmdir()
                base.rmdir()
        if errors:
            raise LocalEnvError(f"small spool {mountpoint} on {node}: {'; '.join(errors)}")


def _umount(argv: list[str], mountpoint: Path) -> list[str]:
    # An agent or podman killed a moment ago may still hold a file open; a lazy unmount then
    # detaches the filesystem at once and frees it when the last file closes.
    try:
        run([*argv, mountpoint], timeout=30)
    except (LocalEnvError, subprocess.TimeoutExpired):
        try:
            run([*argv, "-l", mountpoint], timeout=30)
        except (LocalEnvError, subprocess.TimeoutExpired) as e:
            return [str(e)]
    return []
