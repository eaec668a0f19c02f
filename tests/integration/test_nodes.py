"""The local environment's own building blocks, exercised for real: node sandboxes with podman and
CRIU, the workload images, and the S3 server. Everything the e2e tests take for granted is proven
here first (cross-node restore, the CRIU feature gap of this kernel, multipart S3, clean teardown).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from localenv import images
from localenv.nodes import NodeSandbox, rootfs_path
from localenv.procs import LocalEnvError, Supervisor, require
from localenv.s3 import S3Server, s3_binary

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def rootfs() -> Path:
    require(os.geteuid() == 0, "node sandboxes need root (unshare, mount, nsenter)")
    for tool in ("unshare", "nsenter", "gcc"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    try:
        path = rootfs_path()
    except LocalEnvError as e:
        require(False, f"node rootfs unavailable (hack/node/rootfs.sh): {e}")
        raise
    require((path / "usr/bin/podman").exists(), f"node rootfs {path} has no podman")
    return path


@pytest.fixture(scope="module")
def workload_images(rootfs: Path) -> list[images.Image]:
    return images.workload_images(rootfs)


def start_nodes(workdir: Path, rootfs: Path, loaded: list[images.Image]) -> tuple[NodeSandbox, NodeSandbox]:
    supervisor = Supervisor(workdir / "logs")
    a = NodeSandbox("node-a", workdir, rootfs=rootfs, supervisor=supervisor)
    b = NodeSandbox("node-b", workdir, rootfs=rootfs, supervisor=supervisor)
    try:
        for node in (a, b):
            started = time.monotonic()
            node.start()
            print(f"{node.name} started in {time.monotonic() - started:.2f}s")
        images.load_images([a, b], loaded)
    except BaseException:
        a.stop()
        b.stop()
        raise
    return a, b


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, rootfs: Path, workload_images: list[images.Image]
) -> Iterator[tuple[NodeSandbox, NodeSandbox]]:
    a, b = start_nodes(tmp_path_factory.mktemp("nodes"), rootfs, workload_images)
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    require(s3_binary().exists(), f"{s3_binary()} is missing (hack/build/tools.sh builds it)")
    started = time.monotonic()
    server = S3Server.start(tmp_path_factory.mktemp("s3"))
    print(f"S3 started in {time.monotonic() - started:.2f}s")
    try:
        yield server
    finally:
        server.stop()


def inspect(node: NodeSandbox, container: str, template: str) -> str:
    return node.podman("inspect", "--format", template, container).stdout.decode().strip()


def wait_for_count(node: NodeSandbox, container: str, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (count := images.read_count(node, container)) < at_least:
        assert time.monotonic() < deadline, f"{container} counted only to {count} in {timeout}s"
        time.sleep(0.1)
    return count


def all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # exited meanwhile, e.g. the counter's `sleep`
        return b""


def ns_of(pid: int, kind: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:  # exited meanwhile
        return ""


def test_counter_checkpointed_on_node_a_continues_on_node_b(nodes: tuple[NodeSandbox, NodeSandbox]) -> None:
    a, b = nodes
    a.podman("run", "--detach", "--name", "migrating", images.COUNTER)
    before = wait_for_count(a, "migrating", at_least=10)

    archive = a.spool_dir / "migrating.tar.zst"
    started = time.monotonic()
    a.podman("container", "checkpoint", "--export", archive, "--compress", "zstd", "migrating")
    print(f"counter checkpoint + export: {time.monotonic() - started:.2f}s, {archive.stat().st_size} bytes")
    assert inspect(a, "migrating", "{{.State.Status}}") == "exited"

    # What the agent does with an archive from S3: put it in the target node's spool.
    shutil.copyfile(archive, b.spool_dir / archive.name)
    started = time.monotonic()
    b.podman("container", "restore", "--import", b.spool_dir / archive.name)
    print(f"counter restore --import: {time.monotonic() - started:.2f}s")

    assert inspect(b, "migrating", "{{.State.Restored}}") == "true"
    after = images.read_count(b, "migrating")
    # A fresh start would count 1, 2, 3 ...; a restored one goes on from where it was frozen.
    assert after >= before, f"count went back from {before} to {after}: not restored"
    assert wait_for_count(b, "migrating", at_least=after + 2) > after


def test_pre_checkpoint_fails_with_criu_missing_features(nodes: tuple[NodeSandbox, NodeSandbox]) -> None:
    a, _ = nodes
    a.podman("run", "--detach", "--name", "pre", images.COUNTER)
    wait_for_count(a, "pre", at_least=1)

    result = a.podman("container", "checkpoint", "--pre-checkpoint", "pre", check=False)

    # This kernel has no soft-dirty page tracking, so CRIU cannot pre-dump (docs/local-environment.md).
    assert result.returncode != 0
    assert "CRIU is missing features" in result.stderr.decode()
    assert inspect(a, "pre", "{{.State.Running}}") == "true", "a failed pre-checkpoint must leave it running"


def test_memory_workload_holds_incompressible_half(nodes: tuple[NodeSandbox, NodeSandbox]) -> None:
    a, _ = nodes
    a.podman("run", "--detach", "--name", "memory", images.MEMORY, "64")
    images.wait_for_log(a, "memory", "ready")

    raw = a.spool_dir / "memory.tar"
    zst = a.spool_dir / "memory.tar.zst"
    a.podman("container", "checkpoint", "--leave-running", "--export", raw, "--compress", "none", "memory")
    a.podman("container", "checkpoint", "--export", zst, "--compress", "zstd", "memory")

    assert raw.stat().st_size > 64 * MiB
    # Half random, half text: zstd takes the text away and leaves the random half.
    ratio = zst.stat().st_size / raw.stat().st_size
    assert 0.4 < ratio < 0.7, f"compressed/raw = {ratio:.2f}"


def test_s3_multipart_upload_round_trip(s3: S3Server) -> None:
    client = s3.client()
    key = "prefix/ns/checkpoint-0123abcd/counter.tar.zst"
    data = os.urandom(12 * MiB)
    part_size = 5 * MiB  # the S3 minimum for every part but the last

    upload = client.create_multipart_upload(Bucket=s3.bucket, Key=key)
    parts: list[CompletedPartTypeDef] = []
    for number, offset in enumerate(range(0, len(data), part_size), start=1):
        body = data[offset : offset + part_size]
        etag = client.upload_part(Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=body)[
            "ETag"
        ]
        parts.append({"PartNumber": number, "ETag": etag})
    assert len(parts) == 3
    pending = client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in pending] == [(key, upload["UploadId"])]

    client.complete_multipart_upload(
        Bucket=s3.bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )

    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []
    stored = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()

    aborted = client.create_multipart_upload(Bucket=s3.bucket, Key="aborted")
    client.upload_part(Bucket=s3.bucket, Key="aborted", UploadId=aborted["UploadId"], PartNumber=1, Body=b"x")
    client.abort_multipart_upload(Bucket=s3.bucket, Key="aborted", UploadId=aborted["UploadId"])
    assert client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


def test_stopped_nodes_leave_no_process_and_no_mount(
    tmp_path_factory: pytest.TempPathFactory, rootfs: Path, workload_images: list[images.Image]
) -> None:
    workdir = tmp_path_factory.mktemp("teardown")
    nodes = start_nodes(workdir, rootfs, workload_images)
    try:
        for node in nodes:
            node.podman("run", "--detach", "--name", "c", images.COUNTER)
            wait_for_count(node, "c", at_least=1)
        pids = {pid for node in nodes for pid in node.processes()}
        cmdlines = [cmdline(pid) for pid in pids]
        namespaces = {node.mount_namespace for node in nodes} | {node.pid_namespace for node in nodes}
        cgroups = [d for node in nodes for d in node.cgroup_dirs]
    finally:
        for node in nodes:
            node.stop()

    assert any(b"/bin/counter" in c for c in cmdlines), "containers' processes must count as the node's"
    assert any(b"conmon" in c for c in cmdlines)
    assert cgroups and all(d.name.startswith("checkpointer-node-") for d in cgroups)
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    assert [node.processes() for node in nodes] == [[], []]
    inside = [pid for pid in all_pids() if namespaces & {ns_of(pid, "mnt"), ns_of(pid, "pid")}]
    assert inside == [], "processes still in a node's namespaces"
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(workdir) not in mountinfo
    assert str(rootfs) not in mountinfo
    assert [d for d in cgroups if d.exists()] == []
