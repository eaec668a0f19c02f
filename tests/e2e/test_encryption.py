"""Encrypted at rest, end to end: a counter checkpointed on node-a into a storage that encrypts (age),
restored on node-b, and decrypted by hand with the standard age tool; and a zstd bomb restored from
a storage that admits hand-made archives, which ends ArchiveCorrupt with the agent unharmed.

Each test makes its own non-default CheckpointStorage on the environment's bucket and deletes it:
the environment keeps exactly one default storage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from pyrage import x25519

from helpers import apply, counter, extra_storage, reason_and_message, storage_accepting_unsigned, unique
from invariants import check_invariants
from localenv.env import ENCRYPTION_SECRET, NAMESPACE, LocalEnv
from localenv.images import read_count
from localenv.procs import run

pytestmark = pytest.mark.e2e

AGE_MAGIC = b"age-encryption.org/v1\n"
# The chart's memory limit of the agent.
AGENT_MEMORY_LIMIT = 512 * 1024 * 1024


@pytest.fixture
def encrypted(local_env: LocalEnv) -> Iterator[tuple[str, x25519.Identity]]:
    """A storage that encrypts to a fresh age key, and that key."""
    identity = x25519.Identity.generate()
    local_env.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": ENCRYPTION_SECRET, "namespace": NAMESPACE},
            "stringData": {"recipients": f"{identity.to_public()}\n", "identity": f"{identity}\n"},
        }
    )
    try:
        with extra_storage(
            local_env, encryption={"secretRef": {"namespace": NAMESPACE, "name": ENCRYPTION_SECRET}}
        ) as storage:
            yield storage, identity
    finally:
        local_env.kubectl("delete", "secret", ENCRYPTION_SECRET, "-n", NAMESPACE, "--ignore-not-found")


def test_encrypted_checkpoint_migrates_and_decrypts_by_hand_with_age(
    local_env: LocalEnv, encrypted: tuple[str, x25519.Identity], tmp_path: Path
) -> None:
    env = local_env
    storage, identity = encrypted
    source, target = env.nodes["node-a"], env.nodes["node-b"]
    container = counter(env, "node-a", running_for=1)
    name = unique("ccp")
    spec = {"nodeName": source.name, "containers": [container], "export": {"storageRef": {"name": storage}}}
    apply(env, "ContainerCheckpoint", name, spec)
    status = env.wait_phase("ccp", name, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    counted = int(source.podman("logs", container).stdout.decode().split()[-1])
    source.podman("rm", "-f", container)

    # In the bucket: an age file under the .age suffix, whose sha256 and size status reports.
    [archive] = status["archives"]
    assert archive["key"].endswith(f"/{container}.tar.zst.age"), archive
    s3 = env.s3.client()
    stored = s3.get_object(Bucket=env.s3.bucket, Key=archive["key"])["Body"].read()
    assert stored.startswith(AGE_MAGIC)
    assert (len(stored), hashlib.sha256(stored).hexdigest()) == (archive["size"], archive["sha256"])
    assert b"criu" not in stored and b"config.dump" not in stored, "nothing of the checkpoint is in the clear"
    # The manifest stays readable and says to whom the archive is encrypted.
    manifest_key = archive["key"].rsplit("/", 1)[0] + "/manifest.json"
    manifest = json.loads(s3.get_object(Bucket=env.s3.bucket, Key=manifest_key)["Body"].read())
    [entry] = [a for a in manifest["archives"] if a["key"] == archive["key"]]
    assert entry["encryption"] == {"format": "age", "recipients": [str(identity.to_public())]}
    assert str(identity) not in json.dumps(manifest)

    # The agent decrypts while it downloads: the count continues on node-b.
    restored = unique("crst")
    apply(env, "ContainerRestore", restored, {"nodeName": target.name, "source": {"checkpointRef": {"name": name}}})
    obj = env.wait_phase("crst", restored, ["Succeeded", "Failed"])
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    time.sleep(1)
    assert read_count(target, container) > counted
    target.podman("rm", "-f", container)

    # By hand: the standard age tool decrypts the object, and podman restores what it wrote.
    age = shutil.which("age")
    assert age, "the age tool is missing (hack/install.sh installs Debian's age)"
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"{identity}\n")
    (tmp_path / "x.tar.zst.age").write_bytes(stored)
    # The node sees its spool folder at the same path as the host.
    by_hand = target.spool_dir / f"by-hand-{container}"
    by_hand.mkdir()
    try:
        plain = by_hand / "x.tar.zst"
        run([age, "-d", "-i", key_file, "-o", plain, tmp_path / "x.tar.zst.age"])
        assert plain.read_bytes().startswith(b"\x28\xb5\x2f\xfd")
        moved = f"{container}-by-hand"
        target.podman("container", "restore", f"--import={plain}", "--name", moved, timeout=300)
        time.sleep(1)
        assert read_count(target, moved) > counted
        target.podman("rm", "-f", moved)
    finally:
        shutil.rmtree(by_hand, ignore_errors=True)
    env.kubectl("delete", "crst", restored, "-n", "default")
    env.kubectl("delete", "ccp", name, "-n", "default")


def agent(env: LocalEnv, node: str) -> int:
    """The pid of the node's running agent."""
    [process] = [p for p in env.supervisor.processes if p.name == f"agent-{node}" and p.alive()]
    return process.popen.pid


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def test_zstd_bomb_is_archive_corrupt_with_the_agent_unharmed(local_env: LocalEnv) -> None:
    env = local_env
    node = env.nodes["node-b"]
    with storage_accepting_unsigned(env) as storage:
        # A few MiB that inflate to 64 GiB; its manifest says 1 MiB, as a small archive's would.
        frame = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(64 * 1024 * 1024))
        bomb = frame * 1024
        assert len(bomb) < 8 * 1024 * 1024
        folder = unique("bomb")
        key = f"default/{folder}/web.tar.zst"
        s3 = env.s3.client()
        s3.put_object(Bucket=env.s3.bucket, Key=key, Body=bomb)
        manifest = {
            "manifestVersion": 1,
            "kind": "ContainerCheckpoint",
            "namespace": "default",
            "archives": [
                {
                    "container": "web",
                    "key": key,
                    "size": len(bomb),
                    "sha256": hashlib.sha256(bomb).hexdigest(),
                    "compression": "zstd",
                    "uncompressedSize": 1024 * 1024,
                }
            ],
        }
        s3.put_object(Bucket=env.s3.bucket, Key=f"default/{folder}/manifest.json", Body=json.dumps(manifest).encode())
        pid = agent(env, "node-b")

        name = unique("crst")
        source = {"archive": {"storageRef": {"name": storage}, "key": f"{folder}/web.tar.zst"}}
        apply(env, "ContainerRestore", name, {"nodeName": node.name, "source": source, "name": unique("web")})
        obj = env.wait_phase("crst", name, ["Succeeded", "Failed"], timeout=120)
        reason, message = reason_and_message(obj)
        assert (obj["status"]["phase"], reason) == ("Failed", "ArchiveCorrupt"), obj["status"]
        assert "inflates past 1048576 bytes" in message, message

        # The agent is the same process, its memory stayed under its limit, and nothing of the
        # download is left on the node.
        assert agent(env, "node-b") == pid, "the agent restarted"
        assert peak_rss(pid) < AGENT_MEMORY_LIMIT
        uid = obj["metadata"]["uid"]
        assert not (node.spool_dir / "checkpointer" / f"restore_default_{name}_{uid}").exists()
        assert not list(node.spool_dir.rglob("web.tar")), "the partial download is removed"
        env.kubectl("delete", "crst", name, "-n", "default")
        check_invariants(env)
        s3.delete_objects(
            Bucket=env.s3.bucket, Delete={"Objects": [{"Key": key}, {"Key": f"default/{folder}/manifest.json"}]}
        )
