"""Archives cannot carry node files in or out (docs/security.md).

Out: a live export (leaveRunning with export) copies the running container's root file system
changes from the node's side; a container that keeps swapping a directory for a symlink to /tmp
must not get a file of the node's /tmp into its archive. The nodes run podman 5.8, which copies
within the container's tree; outside admin namespaces the controller refuses a live export on a node
whose Lease records an older podman (LiveExportNotPermitted).

In: a hand-made archive whose rootfs-diff.tar holds a member below a symlink member is refused
ArchiveNotPermitted before podman sees it, in an admin namespace too, and leaves nothing on the node.
"""

from __future__ import annotations

import io
import tarfile
import time
import uuid

import pytest

from helpers import archive_source, condition, create, members, ready, remove, restore, state, unique, until
from invariants import check_invariants
from localenv.env import NAMESPACE, LocalEnv
from localenv.images import COUNTER, owned_by, read_count
from localenv.procs import run
from tenants import NODE, TEAM_A, Tenants

pytestmark = pytest.mark.e2e

PODMAN_VERSION = "checkpointer.dev/podman-version"
# The directories the container swaps for a symlink to the node's /tmp, each holding a file named
# like the node's marker, each by a loop of its own: podman lists the container's changes, then
# copies them, and a copy that follows a directory swapped in between reads the node's file. The
# bulk, copied first, widens that gap; podman 5.4.2 leaked the node's file in about one export of
# six with six directories and no pauses, so the test makes several exports of more.
SWAPPED = 8
BULK_MIB = 16
EXPORTS = 3


def on_node(env: LocalEnv, node: str, script: str) -> str:
    out = run([*env.nodes[node].nsenter_argv(), "sh", "-c", script], timeout=30)
    return out.stdout.decode()


def swapping_container(env: LocalEnv, node: str, marker: str) -> str:
    """A container that keeps swapping directories /w/d<i> (each holding a file `marker`) for symlinks to /tmp."""
    script = f"""
B=/bin/busybox
$B mkdir -p /a /w && $B dd if=/dev/zero of=/a/bulk bs=1M count={BULK_MIB} 2>/dev/null
cd /w
i=0
while [ $i -lt {SWAPPED} ]; do
  $B mkdir d$i && echo inside >d$i/{marker}
  (while :; do
    $B mv d$i d$i.real; $B ln -s /tmp d$i; $B true; $B true
    $B rm d$i; $B mv d$i.real d$i; $B true; $B true
  done) &
  i=$((i + 1))
done
echo ready >/tmp/count
wait
"""
    name = unique("swapper")
    env.nodes[node].podman("run", "-d", *owned_by(TEAM_A), "--name", name, COUNTER, "/bin/busybox", "sh", "-c", script)
    until(
        f"{name} to start swapping",
        lambda: env.nodes[node].podman("exec", name, "cat", "/tmp/count", check=False).stdout.strip() == b"ready",
        timeout=30,
    )
    return name


def test_a_live_export_never_carries_a_file_of_the_node(local_env: LocalEnv) -> None:
    env = local_env
    marker = f"node-marker-{uuid.uuid4().hex[:8]}"
    secret = f"a file of the node, {uuid.uuid4().hex}".encode()
    on_node(env, NODE, f"printf '%s' '{secret.decode()}' >/tmp/{marker}")
    container = swapping_container(env, NODE, marker)
    try:
        for _ in range(EXPORTS):
            live_export_of(env, container, marker, secret)
    finally:
        remove(env, NODE, container)
        on_node(env, NODE, f"rm -f /tmp/{marker}")
    check_invariants(env)


def live_export_of(env: LocalEnv, container: str, marker: str, secret: bytes) -> None:
    """One live export from the admin namespace (what podman copies is judged, whatever the Lease
    says), its archive read from the bucket."""
    spec = {"nodeName": NODE, "containers": [container], "leaveRunning": True, "export": {}, "compress": "none"}
    name = create(env, "ContainerCheckpoint", spec, NAMESPACE)
    obj = env.wait_phase("ccp", name, ["Succeeded", "Failed"], namespace=NAMESPACE)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    [archive] = obj["status"]["archives"]
    data = env.s3.client().get_object(Bucket=env.s3.bucket, Key=archive["key"])["Body"].read()
    outer = members(data)
    rootfs = members(outer.get("rootfs-diff.tar", outer.get("./rootfs-diff.tar", b"")))
    copied = {n: c for n, c in rootfs.items() if n.endswith(f"/{marker}")}
    print(f"rootfs-diff.tar holds {len(rootfs)} members, {len(copied)} named {marker}")
    assert copied, f"the container's files named {marker} are not in rootfs-diff.tar: {sorted(rootfs)}"
    assert secret not in data, "the archive carries the node's file"
    assert all(content == b"inside\n" for content in copied.values()), copied
    assert state(env, NODE, container) == "running"
    env.kubectl("delete", "ccp", name, "-n", NAMESPACE, "--wait=true", "--timeout=60s")


def with_escape(archive: bytes, marker: str) -> bytes:
    """The archive with its rootfs-diff.tar extended by a symlink to the node's /tmp and a file below it."""
    rootfs = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as source,
        tarfile.open(fileobj=rootfs, mode="w") as target,
    ):
        [diff_member] = [m for m in source if m.name.removeprefix("./") == "rootfs-diff.tar"]
        original = source.extractfile(diff_member)
        assert original is not None
        with tarfile.open(fileobj=original, mode="r:") as diff:
            for member in diff:
                target.addfile(member, diff.extractfile(member) if member.isreg() else None)
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/tmp"
        target.addfile(link)
        payload = b"written on the node\n"
        below = tarfile.TarInfo(f"escape/{marker}")
        below.size = len(payload)
        target.addfile(below, io.BytesIO(payload))
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as source, tarfile.open(fileobj=out, mode="w") as tar:
        for member in source:
            if member.name.removeprefix("./") == "rootfs-diff.tar":
                member.size = len(rootfs.getvalue())
                tar.addfile(member, io.BytesIO(rootfs.getvalue()))
            else:
                tar.addfile(member, source.extractfile(member) if member.isreg() else None)
    return out.getvalue()


def test_an_archive_writing_through_a_symlink_is_refused_in_every_namespace(local_env: LocalEnv, unsigned: str) -> None:
    env = local_env
    node = env.nodes["node-a"]
    container = unique("escape")
    node.podman("run", "-d", *owned_by("default"), "--name", container, COUNTER)
    read_count(node, container)  # it has written /tmp/count: rootfs-diff.tar holds it
    export = node.spool_dir / f"{container}.tar"
    node.podman("container", "checkpoint", f"--export={export}", "--compress=none", container, timeout=300)
    node.podman("rm", "-f", container)
    try:
        real = export.read_bytes()
    finally:
        export.unlink()
    marker = f"escaped-{uuid.uuid4().hex[:8]}"
    key = f"{unique('escape')}/{container}.tar"
    env.s3.client().put_object(Bucket=env.s3.bucket, Key=f"default/{key}", Body=with_escape(real, marker))
    target = env.nodes["node-b"]
    spool = target.spool_dir / "checkpointer"
    try:
        for namespace in ("default", NAMESPACE):
            obj = restore(env, "node-b", archive_source(unsigned, key, namespace), namespace=namespace)
            assert (obj["status"]["phase"], ready(obj)["reason"]) == ("Failed", "ArchiveNotPermitted"), obj["status"]
            message = ready(obj)["message"]
            assert f"rootfs-diff.tar member 'escape/{marker}', below symlink member 'escape'" in message, message
            assert "nothing was restored" in message
            # Refused before podman: no container, no file in the node's /tmp, no work folder left.
            assert target.podman("container", "exists", container, check=False).returncode == 1
            assert on_node(env, "node-b", f"ls /tmp/{marker} 2>/dev/null || true").strip() == ""
            assert not list(spool.glob(f"*{obj['metadata']['uid']}*")), "the restore's work folder stays on the node"
    finally:
        env.s3.client().delete_object(Bucket=env.s3.bucket, Key=f"default/{key}")
    check_invariants(env)


def test_a_live_export_on_a_podman_before_5_8_2_is_refused_outside_admin_namespaces(tenants: Tenants) -> None:
    t, env = tenants, tenants.env
    lease = ("lease", f"checkpointer-agent-{NODE}", "-n", NAMESPACE)
    recorded = env.kubectl("get", *lease, "-o", "jsonpath={.metadata.annotations.checkpointer\\.dev/podman-version}")
    actual = recorded.stdout.strip()
    assert actual.startswith("5.8."), f"the node's agent recorded podman {actual!r}"
    count = read_count(env.nodes[NODE], t.ours)
    env.kubectl("annotate", *lease, "--overwrite", f"{PODMAN_VERSION}=5.4.2")
    try:
        name = t.create("ContainerCheckpoint", TEAM_A, {"containers": [t.ours], "leaveRunning": True, "export": {}})
        obj = t.finished("ccp", TEAM_A, name)
    finally:
        env.kubectl("annotate", *lease, "--overwrite", f"{PODMAN_VERSION}={actual}")
    assert (obj["status"]["phase"], ready(obj)["reason"]) == ("Failed", "LiveExportNotPermitted"), obj["status"]
    message = ready(obj)["message"]
    assert f"node {NODE} runs podman 5.4.2" in message and "5.8.2" in message, message
    # Refused by the controller: never handed to the agent, the container untouched.
    scheduled = condition(obj, "Scheduled")
    assert scheduled["status"] == "False" and not obj["status"].get("archives"), obj["status"]
    assert t.state(t.ours) == "running"
    time.sleep(0.5)
    assert read_count(env.nodes[NODE], t.ours) > count, "the container kept counting"
    t.delete("ccp", name)
    check_invariants(env)
