"""The manifest's content and its bytes: the same for the same inputs as before it had a module of its
own, so that the manifests in buckets keep verifying and a new one signs to the same bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from checkpointer.archive import manifest
from checkpointer.archive.signature import key_id
from checkpointer.archive.spool import Digest
from checkpointer.archive.workfolder import SpoolRecord
from checkpointer.models import Archive, Compression, ContainerCheckpoint

# The signed manifest the code before archive/manifest.py stored for pinned(), with PIN_KEY.
PINNED = Path(__file__).parent / "fixtures" / "signed_manifest.json"
# Ed25519 is deterministic: with a fixed key the same manifest signs to the same bytes.
PIN_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"checkpointer manifest pin").digest())
DIRECTORY = "cluster/team-a/nightly-0a1b2c3d"


def pinned() -> manifest.Manifest:
    """Two archives: `web` encrypted, with its uncompressed size and both configuration digests; `db`
    with no spool record and only spec.dump read. A host version that is not ASCII: stored escaped,
    signed as UTF-8."""
    ccp = ContainerCheckpoint.model_validate(
        {
            "metadata": {
                "name": "web-before-drain",
                "namespace": "team-a",
                "uid": "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
            },
            "spec": {
                "nodeName": "node-a",
                "containers": ["web", "db"],
                "leaveRunning": True,
                "export": {"storageRef": {"name": "archive"}, "key": "nightly"},
            },
        }
    )
    web = Archive(
        container="web",
        containerID="a" * 64,
        uri=f"s3://checkpoints/{DIRECTORY}/web.tar.zst.age",
        key=f"{DIRECTORY}/web.tar.zst.age",
        size=512,
        sha256=hashlib.sha256(b"web").hexdigest(),
        compression=Compression.ZSTD,
        stats={
            "runtime_checkpoint_duration": 123456,
            "podman_checkpoint_duration": 234567,
            "container_statistics": [{"id": "a" * 64, "rootfs_diff": None}],
        },
    )
    db = Archive(
        container="db",
        containerID="b" * 64,
        uri=f"s3://checkpoints/{DIRECTORY}/db.tar.zst",
        key=f"{DIRECTORY}/db.tar.zst",
        size=2048,
        sha256=hashlib.sha256(b"db").hexdigest(),
        compression=Compression.ZSTD,
    )
    recipients = ("age1" + "q" * 58, "age1" + "p" * 58)
    spooled = SpoolRecord("web", "a" * 64, Compression.ZSTD, 1000, Digest(512, "x", 8, (1,)), {}, recipients, 4096)
    entries = [
        manifest.entry(
            web,
            manifest.Configuration.of({"config.dump": b'{"name":"web"}', "spec.dump": b'{"ociVersion":"1.2.0"}'}),
            spooled,
        ),
        manifest.entry(db, manifest.Configuration.of({"spec.dump": b'{"ociVersion":"1.2.0","process":{}}'}), None),
    ]
    host = {"node": "node-a", "podman": "5.8.0", "criu": "4.2.1", "ociRuntime": "runc", "kernel": "6.1.0-31-amd64 ü"}
    return manifest.Manifest.of(ccp, entries, host, "2026-01-02T03:04:05.123456Z", "2026-01-02T03:04:09.654321Z")


def test_the_stored_and_the_signed_bytes_are_those_of_before() -> None:
    document = pinned().document()
    assert hashlib.sha256(manifest.body(document)).hexdigest() == (
        "66f22e33747e59b1b87b0f8a11de1fce1e0bf3adc6d05266025239dccf6e01c7"
    )
    assert hashlib.sha256(manifest.canonical(document)).hexdigest() == (
        "07ef98855bdfaa47de22863c491a3d8865aa1ad038def5371c521a593be880b3"
    )
    assert manifest.body(manifest.sign(document, PIN_KEY)) == PINNED.read_bytes()


def test_a_manifest_signed_before_still_verifies() -> None:
    stored = manifest.parse(PINNED.read_bytes())
    assert stored is not None
    public = PIN_KEY.public_key()
    assert manifest.verify(stored, {key_id(public): public}) == (
        "5544ebbe511c362e39904d0cf099bd8f7d7b73ecf87357540c8057662a50f526"
    )


def test_an_entry_holds_only_the_facts_it_has() -> None:
    web, db = pinned().document()["archives"]
    assert list(web)[-4:] == ["configDumpSHA256", "specDumpSHA256", "uncompressedSize", "encryption"]
    assert web["encryption"] == {"format": "age", "recipients": ["age1" + "q" * 58, "age1" + "p" * 58]}
    assert "configDumpSHA256" not in db and "uncompressedSize" not in db and "encryption" not in db
    assert db["containerID"] == "b" * 64 and "stats" not in db


def test_stored_bytes_that_are_no_json_object_are_no_manifest() -> None:
    assert manifest.parse(b"{not json") is None
    assert manifest.parse(b"\xff") is None
    assert manifest.parse(b"[1, 2]") is None
    assert manifest.parse(b'{"kind": "ContainerCheckpoint"}') == {"kind": "ContainerCheckpoint"}
