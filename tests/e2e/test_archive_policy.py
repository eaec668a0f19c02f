"""Archives may not smuggle privilege, and reading them is bounded (docs/security.md).

Archives that real podman made by hand on a node (a --privileged container, one with a host bind
mount), uploaded into the bucket, are refused with ArchiveNotPermitted outside an admin namespace
and pass the policy from the admin namespace. Crafted archives (an oversized config.dump, a tar
with an enormous pax header) end in ArchiveCorrupt with the agent's memory and the node's disk
bounded and the agent not restarted. Hand-made archives carry no signature: they are restored
through a second storage that admits unsigned archives.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from helpers import archive_source, ready, reason_of, restore, unique
from invariants import check_invariants
from localenv.env import NAMESPACE, LocalEnv
from localenv.images import COUNTER, owned_by, read_count

MiB = 1024 * 1024
# Far above what reading one archive's configuration takes, far below the chart's 512Mi limit.
AGENT_PEAK_RSS = 256 * MiB
# A host directory that every node has (in the nodes' shared root filesystem).
HOST_DIR = "/srv"


def agent_pid(env: LocalEnv, node: str) -> int:
    [process] = [p for p in env.supervisor.processes if p.name == f"agent-{node}" and p.alive()]
    return process.popen.pid


def memory(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def upload(env: LocalEnv, data: bytes, name: str) -> str:
    """Puts an archive into namespace default's folder; returns its key relative to that folder."""
    key = f"{unique(name)}/{name}.tar.zst"
    env.s3.client().put_object(Bucket=env.s3.bucket, Key=f"default/{key}", Body=data)
    return key


def exported_by_hand(env: LocalEnv, *run_flags: str) -> tuple[str, bytes]:
    """A counter run on node-a with `run_flags`, checkpointed and exported by podman itself."""
    node = env.nodes["node-a"]
    container = unique("by-hand")
    node.podman("run", "-d", *owned_by("default"), *run_flags, "--name", container, COUNTER)
    time.sleep(1)
    read_count(node, container)
    export = node.spool_dir / f"{container}.tar.zst"
    node.podman("container", "checkpoint", f"--export={export}", container, timeout=300)
    node.podman("rm", "-f", container)
    try:
        return container, export.read_bytes()
    finally:
        export.unlink()


@pytest.mark.parametrize(
    ("flags", "asked"),
    [
        pytest.param(("--privileged",), "privileged mode", id="privileged"),
        pytest.param(("-v", "{host}:/mnt"), "host path {host} mounted at /mnt", id="host-bind-mount"),
    ],
)
def test_archive_asking_for_the_host_needs_an_admin_namespace(
    local_env: LocalEnv, unsigned: str, flags: tuple[str, ...], asked: str
) -> None:
    env = local_env
    flags = tuple(f.format(host=HOST_DIR) for f in flags)
    container, data = exported_by_hand(env, *flags)
    key = upload(env, data, container)
    target = env.nodes["node-b"]

    refused = restore(env, "node-b", archive_source(unsigned, key))
    assert refused["status"]["phase"] == "Failed", refused["status"]
    assert reason_of(refused) == "ArchiveNotPermitted", refused["status"]
    message = ready(refused)["message"]
    assert asked.format(host=HOST_DIR) in message, message
    assert "nothing was restored" in message
    assert target.podman("container", "exists", container, check=False).returncode == 1

    admitted = restore(env, "node-b", archive_source(unsigned, key, NAMESPACE), namespace=NAMESPACE)
    print(f"{flags}: from {NAMESPACE}: {reason_of(admitted)}: {ready(admitted)['message']}")
    assert reason_of(admitted) != "ArchiveNotPermitted", admitted["status"]
    if admitted["status"]["phase"] == "Succeeded":
        time.sleep(1)
        assert read_count(target, container) > 0
        target.podman("rm", "-f", container)
    else:
        # The policy let it through to podman; whether CRIU can restore it on this node is podman's.
        assert reason_of(admitted) == "RestoreFailed", admitted["status"]
    env.s3.client().delete_object(Bucket=env.s3.bucket, Key=f"default/{key}")
    check_invariants(env)


def _tar(*parts: bytes) -> bytes:
    return b"".join(parts) + b"\0" * 2 * tarfile.BLOCKSIZE


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _oversized_config(size: int) -> bytes:
    body = b"{" + b" " * (size - 2) + b"}"
    return _tar(_header("config.dump", size), body, _member("spec.dump", b"{}"))


def _enormous_pax_header(size: int) -> bytes:
    record = b"%d comment=" % size
    body = record + b"a" * (size - len(record) - 1) + b"\n"
    return _tar(_header("././@PaxHeader", size, tarfile.XHDTYPE), body, _member("config.dump", b"{}"))


@pytest.mark.parametrize(
    ("craft", "message"),
    [
        pytest.param(_oversized_config, "config.dump has", id="oversized-config-dump"),
        pytest.param(_enormous_pax_header, "extended tar header of", id="enormous-pax-header"),
    ],
)
def test_crafted_archive_is_corrupt_with_the_agent_bounded(
    local_env: LocalEnv, unsigned: str, craft: Any, message: str
) -> None:
    env = local_env
    size = 256 * MiB
    # A few hundred KiB in the bucket; on the node, a tar of 256 MiB that Python's tar reader alone
    # would take into memory whole.
    data = zstandard.ZstdCompressor(level=3).compress(craft(size))
    assert len(data) < 2 * MiB
    key = upload(env, data, unique("crafted"))
    spool = env.nodes["node-b"].spool_dir / "checkpointer"
    pid = agent_pid(env, "node-b")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = memory(pid, "VmHWM")

    obj = restore(env, "node-b", archive_source(unsigned, key))
    peak = memory(pid, "VmHWM")
    print(f"agent peak RSS {peak / MiB:.0f} MiB (before {before / MiB:.0f} MiB) reading a {size // MiB} MiB {message}")
    assert reason_of(obj) == "ArchiveCorrupt", obj["status"]
    assert message in ready(obj)["message"], ready(obj)
    assert peak < AGENT_PEAK_RSS, f"agent peak RSS {peak / MiB:.0f} MiB"
    assert agent_pid(env, "node-b") == pid, "the agent restarted"
    uid = obj["metadata"]["uid"]
    assert not [p for p in spool.glob(f"*{uid}*")], "the restore's work folder stays on the node"
    assert du(spool) < 64 * MiB, f"{du(spool)} bytes left in the spool"
    env.s3.client().delete_object(Bucket=env.s3.bucket, Key=f"default/{key}")
    check_invariants(env)
