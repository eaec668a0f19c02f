"""Signed manifests: the signature, the controller's check of a manifest and its Signer, the agent's trust decision."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any, cast

import kopf
import pytest
from botocore.exceptions import EndpointConnectionError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from checkpointer import layout
from checkpointer.adapters.kube import Kube
from checkpointer.archive import signature
from checkpointer.archive.manifest import (
    BadSignature,
    Trust,
    Unsigned,
    canonical,
    problems,
    sign,
    signed_before,
    verify,
)
from checkpointer.archive.store import ArchiveStore, Stores
from checkpointer.controller.signer import Signer
from checkpointer.errors import Failure
from checkpointer.models import CheckpointStatus, ContainerCheckpoint
from checkpointer.reasons import Reason
from checkpointer.services import signing as controller_signing
from checkpointer.services.signing import archive_trust, signing_requested
from checkpointer.settings import Settings
from checkpointer.status import Conflict

KEY = signature.generate()
KEYS = {signature.key_id(KEY.public_key()): KEY.public_key()}
SHA = hashlib.sha256(b"archive").hexdigest()
DIRECTORY = "cluster/team-a/ccp-1-0a1b2c3d"
ARCHIVE_KEY = f"{DIRECTORY}/web.tar.zst"


def manifest() -> dict[str, Any]:
    return {
        "manifestVersion": 1,
        "kind": "ContainerCheckpoint",
        "namespace": "team-a",
        "name": "ccp-1",
        "uid": "0a1b2c3d-0000-0000-0000-000000000000",
        "nodeName": "node-a",
        "flags": {"nodeName": "node-a", "containers": ["web"], "export": {}},
        "host": {"node": "node-a", "podman": "5.4.2"},
        "startTime": "2025-01-01T00:00:00.000000Z",
        "completionTime": "2025-01-01T00:00:01.000000Z",
        "archives": [
            {
                "container": "web",
                "containerID": "f" * 64,
                "key": ARCHIVE_KEY,
                "size": 1234,
                "sha256": SHA,
                "compression": "zstd",
                "configDumpSHA256": hashlib.sha256(b"config").hexdigest(),
                "specDumpSHA256": hashlib.sha256(b"spec").hexdigest(),
                "stats": {"runtime_checkpoint_duration": 12345},
            }
        ],
    }


def leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    else:
        yield path


def changed(value: Any) -> Any:
    """The value with one byte different."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    text = str(value)
    return text[:-1] + ("0" if text[-1:] != "0" else "1")


# --- sign and verify -----------------------------------------------------------------------------


def test_a_signed_manifest_verifies_after_a_round_trip_through_json() -> None:
    signed = sign(manifest(), KEY)
    assert signed["signature"]["algorithm"] == "Ed25519"
    assert signed["signature"]["keyID"] == hashlib.sha256(KEY.public_key().public_bytes_raw()).hexdigest()
    # As the bucket holds it: indented, keys in the writer's order; the canonical bytes do not care.
    stored = json.loads(json.dumps(signed, indent=2))
    assert verify(stored, KEYS) == signed["signature"]["keyID"]


def test_the_signature_is_deterministic_and_replaces_an_old_one() -> None:
    once = sign(manifest(), KEY)
    assert sign(once, KEY) == once


def test_canonical_bytes_are_sorted_compact_utf8_without_the_signature() -> None:
    m = {"b": "ü", "a": [1, {"d": 2, "c": 3}], "signature": {"value": "x"}}
    assert canonical(m) == '{"a":[1,{"c":3,"d":2}],"b":"ü"}'.encode()


@pytest.mark.parametrize("path", list(leaves(manifest())), ids=lambda p: ".".join(map(str, p)))
def test_a_changed_byte_of_any_field_fails(path: tuple[Any, ...]) -> None:
    signed = sign(manifest(), KEY)
    edited = copy.deepcopy(signed)
    target: Any = edited
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = changed(target[path[-1]])
    with pytest.raises(BadSignature):
        verify(edited, KEYS)


def test_an_added_or_removed_field_fails() -> None:
    signed = sign(manifest(), KEY)
    with pytest.raises(BadSignature):
        verify({**signed, "privileged": True}, KEYS)
    without = {k: v for k, v in signed.items() if k != "host"}
    with pytest.raises(BadSignature):
        verify(without, KEYS)


def test_a_missing_signature_is_told_apart_from_a_bad_one() -> None:
    with pytest.raises(Unsigned):
        verify(manifest(), KEYS)
    signed = sign(manifest(), KEY)
    bad = [
        {**signed, "signature": "nonsense"},
        {**signed, "signature": {**signed["signature"], "algorithm": "RSA"}},
        {**signed, "signature": {**signed["signature"], "value": "not base64!"}},
        {**signed, "signature": {**signed["signature"], "value": ""}},
    ]
    for manifest_ in bad:
        with pytest.raises(BadSignature) as e:
            verify(manifest_, KEYS)
        assert not isinstance(e.value, Unsigned)


def test_a_signature_of_another_key_fails() -> None:
    other = signature.generate()
    with pytest.raises(BadSignature, match="not one of this cluster's"):
        verify(sign(manifest(), other), KEYS)
    # Even one that claims this cluster's keyID.
    forged = sign(manifest(), other)
    forged["signature"]["keyID"] = signature.key_id(KEY.public_key())
    with pytest.raises(BadSignature, match="edited"):
        verify(forged, KEYS)


# --- the keys as stored --------------------------------------------------------------------------


def test_keys_survive_their_stored_forms() -> None:
    again = signature.load_private(signature.private_pem(KEY))
    assert signature.key_id(again.public_key()) == signature.key_id(KEY.public_key())
    public = signature.load_public(signature.public_pem(KEY.public_key()))
    assert signature.key_id(public) == signature.key_id(KEY.public_key())


def test_publishing_keeps_the_keys_signed_with_before() -> None:
    assert signature.published(KEY.public_key(), {signature.PUBLIC_KEY: signature.public_pem(KEY.public_key())}) is None
    first = signature.published(KEY.public_key(), {})
    assert first == {signature.PUBLIC_KEY: signature.public_pem(KEY.public_key())}
    rotated = signature.generate()
    entries = signature.published(rotated.public_key(), first)
    assert entries is not None
    assert entries[signature.PUBLIC_KEY] == signature.public_pem(rotated.public_key())
    assert set(signature.public_keys(entries)) == {
        signature.key_id(KEY.public_key()),
        signature.key_id(rotated.public_key()),
    }


def test_only_pub_entries_that_are_keys_are_trusted() -> None:
    entries = {"notes": signature.public_pem(KEY.public_key()), "broken.pub": "not a key"}
    assert signature.public_keys(entries) == {}


# --- the controller's check before it signs ------------------------------------------------------


def checkpoint(**status: Any) -> ContainerCheckpoint:
    archive = {k: v for k, v in manifest()["archives"][0].items() if not k.endswith("DumpSHA256")}
    return ContainerCheckpoint.model_validate(
        {
            "metadata": {"name": "ccp-1", "namespace": "team-a", "uid": manifest()["uid"]},
            "spec": {"nodeName": "node-a", "containers": ["web"], "export": {}},
            "status": {"phase": "Uploading", "nodeName": "node-a", "archives": [archive], **status},
        }
    )


def test_a_manifest_that_says_what_the_object_says_has_no_problems() -> None:
    assert problems(manifest(), checkpoint(), DIRECTORY) == []


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.update(namespace="team-b"), "namespace"),
        (lambda m: m.update(nodeName="node-b"), "nodeName"),
        (lambda m: m.update(uid="other"), "uid"),
        (lambda m: m["archives"][0].update(sha256="0" * 64), "sha256"),
        (lambda m: m["archives"][0].update(size=1), "size"),
        (lambda m: m["archives"][0].update(key=f"{DIRECTORY}/other.tar.zst"), "lists archives"),
        (lambda m: m["archives"].append({**m["archives"][0], "key": "x"}), "lists archives"),
    ],
)
def test_a_manifest_that_differs_from_the_object_is_not_signed(edit: Any, problem: str) -> None:
    m = manifest()
    edit(m)
    found = problems(m, checkpoint(), DIRECTORY)
    assert any(problem in p for p in found), found


def test_an_archive_outside_the_checkpoints_folder_is_not_signed() -> None:
    found = problems(manifest(), checkpoint(), "cluster/team-a/other")
    assert any("outside" in p for p in found), found


def test_signing_is_requested_by_reason_signing_in_uploading() -> None:
    ready = {"type": "Ready", "status": "False", "reason": "Signing"}

    def requested(status: dict[str, Any]) -> bool:
        return signing_requested(CheckpointStatus.model_validate(status))

    assert requested({"phase": "Uploading", "conditions": [ready]})
    assert not requested({"phase": "Uploading", "conditions": [{**ready, "reason": "Uploading"}]})
    assert not requested({"phase": "Succeeded", "conditions": [ready]})
    assert not requested({})


def test_the_namespace_of_a_key_is_its_folder_under_the_prefix() -> None:
    assert layout.namespace_of_key("cluster", ARCHIVE_KEY) == "team-a"
    assert layout.namespace_of_key("", "team-a/x/web.tar") == "team-a"
    assert layout.namespace_of_key("/cluster/", ARCHIVE_KEY) == "team-a"
    assert layout.namespace_of_key("other", ARCHIVE_KEY) is None
    assert layout.namespace_of_key("", "web.tar") is None


# --- the controller's Signer --------------------------------------------------------------------


def handed_over(uid: str = "u1", version: str = "1", **meta: Any) -> dict[str, Any]:
    """A checkpoint its agent handed over for signature."""
    ready = {"type": "Ready", "status": "False", "reason": "Signing"}
    return {
        "metadata": {"name": "ccp-1", "namespace": "team-a", "uid": uid, "resourceVersion": version, **meta},
        "status": {"phase": "Uploading", "conditions": [ready]},
    }


class Cluster:
    """What the Signer reads of the API server between its tries: the checkpoint as it is now."""

    def __init__(self, now: dict[str, Any] | None) -> None:
        self.now = now
        self.reads = 0

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return self.now


class Signings:
    """services/signature.py's sign_checkpoint as the Signer calls it: each call takes the next answer."""

    def __init__(self, *answers: Exception | None) -> None:
        self.answers = list(answers)
        self.signed: list[tuple[str, str]] = []  # (uid, resourceVersion) of each body it was given
        self.meanwhile: Callable[[], None] | None = None  # run once, while the first call signs

    def __call__(self, kube: Kube, stores: Stores, key: Ed25519PrivateKey, body: dict[str, Any]) -> None:
        assert key is KEY, "the key loaded at the start"
        self.signed.append((body["metadata"]["uid"], body["metadata"]["resourceVersion"]))
        meanwhile, self.meanwhile = self.meanwhile, None
        if meanwhile:
            meanwhile()
        answer = self.answers.pop(0)
        if answer is not None:
            raise answer


def with_signer(
    monkeypatch: pytest.MonkeyPatch, cluster: Cluster, *answers: Exception | None
) -> tuple[Signer, Signings]:
    signings = Signings(*answers)
    monkeypatch.setattr(controller_signing, "signing_key", lambda kube, settings: KEY)
    monkeypatch.setattr(controller_signing, "sign_checkpoint", signings)
    signer = Signer(cast(Kube, cluster), cast(Settings, None), cast(Stores, None))
    signer.load_key()
    return signer, signings


def bucket_away() -> Exception:
    return EndpointConnectionError(endpoint_url="http://s3.example:9000")


@pytest.mark.parametrize("last", [None, Conflict("signed by the other replica")], ids=["signed", "moved-on"])
def test_a_manifest_the_bucket_did_not_take_is_signed_again_from_the_object_as_it_is_now(
    monkeypatch: pytest.MonkeyPatch, last: Exception | None
) -> None:
    cluster = Cluster(handed_over(version="2"))
    signer, signings = with_signer(monkeypatch, cluster, bucket_away(), bucket_away(), last)
    signer.handed_over(kopf.Body(handed_over(version="1")))
    signer.sign_again()
    signer.sign_again()
    assert signings.signed == [("u1", "1"), ("u1", "2"), ("u1", "2")]
    signer.sign_again()
    assert cluster.reads == 2, "once signed or moved on, it is not read again"


@pytest.mark.parametrize(
    "now",
    [None, handed_over(uid="u2"), {**handed_over(), "status": {"phase": "Failed"}}],
    ids=["gone", "made-anew", "moved-on"],
)
def test_a_checkpoint_no_longer_handed_over_is_not_signed_again(
    monkeypatch: pytest.MonkeyPatch, now: dict[str, Any] | None
) -> None:
    cluster = Cluster(now)
    signer, signings = with_signer(monkeypatch, cluster, bucket_away())
    signer.handed_over(kopf.Body(handed_over()))
    signer.sign_again()
    signer.sign_again()
    assert signings.signed == [("u1", "1")]
    assert cluster.reads == 1


def test_a_checkpoint_being_deleted_is_not_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    signer, signings = with_signer(monkeypatch, Cluster(None))
    signer.handed_over(kopf.Body(handed_over(deletionTimestamp="2026-12-07T00:00:00Z")))
    assert signings.signed == []


def test_one_at_a_time_signs_an_object(monkeypatch: pytest.MonkeyPatch) -> None:
    signer, signings = with_signer(monkeypatch, Cluster(None), None, None, None)
    first, other = handed_over(), handed_over(uid="u2")
    # The retry loop and the event handler at once: the second signer of the same object steps back.
    signings.meanwhile = lambda: (signer.handed_over(kopf.Body(first)), signer.handed_over(kopf.Body(other)))
    signer.handed_over(kopf.Body(first))
    assert signings.signed == [("u1", "1"), ("u2", "1")]
    signer.handed_over(kopf.Body(first))
    assert signings.signed[-1] == ("u1", "1"), "and signs it once the first is done"


# --- the agent's decision before a restore -------------------------------------------------------


class Bucket:
    """What archive_trust asks of a store: the manifest beside a key, and whether the key exists."""

    prefix = "cluster"

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def manifest_bytes(self, directory: str) -> bytes | None:
        return self.objects.get(f"{directory}/manifest.json")

    def exists(self, key: str) -> bool:
        return key in self.objects

    def uri(self, key: str) -> str:
        return f"s3://bucket/{key}"


def trust(objects: dict[str, bytes], key: str = ARCHIVE_KEY, accept_unsigned: bool = False) -> Trust:
    return archive_trust(cast(ArchiveStore, Bucket(objects)), key, accept_unsigned, lambda: KEYS)


def stored(m: dict[str, Any]) -> dict[str, bytes]:
    return {ARCHIVE_KEY: b"archive", f"{DIRECTORY}/manifest.json": json.dumps(m, indent=2).encode()}


def reason(objects: dict[str, bytes], **kwargs: Any) -> Reason:
    with pytest.raises(Failure) as e:
        trust(objects, **kwargs)
    return e.value.reason


def test_a_signed_archive_is_trusted_with_its_signed_sha256() -> None:
    assert trust(stored(sign(manifest(), KEY))) == Trust(SHA, signed=True)


def test_an_unsigned_archive_is_refused_unless_the_storage_accepts_them() -> None:
    plain = {ARCHIVE_KEY: b"archive"}
    assert reason(plain) == Reason.ARCHIVE_UNTRUSTED
    assert trust(plain, accept_unsigned=True) == Trust(None, signed=False)
    assert reason(stored(manifest())) == Reason.ARCHIVE_UNTRUSTED
    assert trust(stored(manifest()), accept_unsigned=True) == Trust(SHA, signed=False)


def test_a_missing_archive_is_not_found_rather_than_untrusted() -> None:
    assert reason({}) == Reason.ARCHIVE_NOT_FOUND


def test_a_bad_signature_is_refused_even_where_unsigned_archives_are_accepted() -> None:
    signed = sign(manifest(), KEY)
    signed["archives"][0]["sha256"] = "0" * 64
    for accept_unsigned in (False, True):
        assert reason(stored(signed), accept_unsigned=accept_unsigned) == Reason.ARCHIVE_UNTRUSTED


def test_a_signed_manifest_moved_to_another_namespaces_folder_is_refused() -> None:
    other = ARCHIVE_KEY.replace("team-a", "team-b")
    m = manifest()
    m["archives"][0]["key"] = other
    objects = {
        other: b"archive",
        f"{other.rsplit('/', 1)[0]}/manifest.json": json.dumps(sign(m, KEY)).encode(),
    }
    for accept_unsigned in (False, True):
        assert reason(objects, key=other, accept_unsigned=accept_unsigned) == Reason.ARCHIVE_UNTRUSTED


def test_an_archive_its_signed_manifest_does_not_list_is_unsigned() -> None:
    objects = stored(sign(manifest(), KEY))
    planted = f"{DIRECTORY}/planted.tar.zst"
    objects[planted] = b"other"
    assert reason(objects, key=planted) == Reason.ARCHIVE_UNTRUSTED
    assert trust(objects, key=planted, accept_unsigned=True) == Trust(None, signed=False)


def test_an_unreadable_manifest_is_refused() -> None:
    objects = {ARCHIVE_KEY: b"archive", f"{DIRECTORY}/manifest.json": b"{not json"}
    for accept_unsigned in (False, True):
        assert reason(objects, accept_unsigned=accept_unsigned) == Reason.ARCHIVE_UNTRUSTED


def test_a_second_signer_finds_the_agents_manifest_signed_already() -> None:
    agents = manifest()
    sha = hashlib.sha256(json.dumps(agents, indent=2).encode()).hexdigest()
    signed = json.loads(json.dumps(sign(agents, KEY), indent=2))
    assert signed_before(signed, sha, KEY)
    assert not signed_before(agents, sha, KEY), "not signed yet"
    assert not signed_before(signed, "0" * 64, KEY), "another manifest than the agent's"
    assert not signed_before(signed, sha, signature.generate()), "signed by another key"
