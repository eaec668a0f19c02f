"""Signed archives: the controller's key, the controller signing a checkpoint's manifest, and the
agent's check of a manifest before a restore.

Who signs: the controller, the only holder of the private key. The agent, once every archive of a
checkpoint is confirmed in the bucket, writes the manifest unsigned and hands the object over
(phase Uploading, reason Signing, `status.manifestSHA256`). The controller reads the manifest back,
requires its sha256 to be the one the node's agent reported in status, and its namespace, name,
uid, node and archives (key, size, sha256) to be the object's; then it signs the manifest in place
and writes Succeeded. The agent's own status writes are confined to its node (docs/api.md), so a
manifest signed this way says what that node's agent stored for that object, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from checkpointer import layout
from checkpointer.adapters.kube import CHECKPOINTS, Kube
from checkpointer.archive import signature
from checkpointer.archive.store import ArchiveStore, CorruptArchive, Stores, manifest_body
from checkpointer.errors import Failure
from checkpointer.models import ContainerCheckpoint, ObjectStatus
from checkpointer.reasons import ConditionType, Phase, Reason
from checkpointer.settings import Settings
from checkpointer.status import StatusWriter

log = logging.getLogger(__name__)
LABELS = {"app.kubernetes.io/name": "checkpointer", "app.kubernetes.io/component": "controller"}


def signing_requested(status: ObjectStatus) -> bool:
    """The agent stored every archive and waits for the controller to sign the manifest. Pure."""
    ready = status.condition(ConditionType.READY)
    return status.phase == Phase.UPLOADING and ready is not None and ready.reason == Reason.SIGNING


# --- the controller's key ------------------------------------------------------------------------


def signing_key(kube: Kube, settings: Settings) -> Ed25519PrivateKey:
    """The key in the Secret, created on first start; its public half published for the agents.

    Two replicas starting at once both try to create the Secret: the API server lets one win (the
    other gets 409), and both then use the key that is stored.
    """
    namespace, name = settings.namespace, settings.signing_key_secret
    data = kube.secret_data(namespace, name)
    if data is None:
        created = signature.generate()
        if kube.create_secret(namespace, name, {signature.PRIVATE_KEY: signature.private_pem(created)}, LABELS):
            log.info("created the manifest signing key in Secret %s/%s", namespace, name)
        data = kube.secret_data(namespace, name)
        if data is None:
            raise RuntimeError(f"Secret {namespace}/{name} was created but cannot be read")
    if signature.PRIVATE_KEY not in data:
        raise ValueError(f"Secret {namespace}/{name} has no key {signature.PRIVATE_KEY}")
    key = signature.load_private(data[signature.PRIVATE_KEY])
    config_map = settings.signing_public_key_config_map
    entries = signature.published(key.public_key(), kube.config_map_data(namespace, config_map) or {})
    if entries is not None:
        kube.put_config_map(namespace, config_map, entries, LABELS)
        log.info("published the signing public key in ConfigMap %s/%s", namespace, config_map)
    log.info("manifests are signed with key %s", signature.key_id(key.public_key())[:16])
    return key


def published_keys(kube: Kube, settings: Settings) -> dict[str, Ed25519PublicKey]:
    """The public keys the controller published, by keyID; what an agent verifies manifests with."""
    namespace, name = settings.namespace, settings.signing_public_key_config_map
    return signature.public_keys(kube.config_map_data(namespace, name) or {})


# --- the controller signs ------------------------------------------------------------------------


def manifest_problems(manifest: Mapping[str, Any], ccp: ContainerCheckpoint, directory: str) -> list[str]:
    """How the manifest read back differs from what the object says was stored. Pure."""
    problems = []
    meta, status = ccp.metadata, ccp.status
    expected = {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid, "nodeName": ccp.spec.node_name}
    for field, value in expected.items():
        if manifest.get(field) != value:
            problems.append(f"its {field} is {manifest.get(field)!r}, the object's {value!r}")
    if status.node_name and status.node_name != ccp.spec.node_name:
        problems.append(f"the object was scheduled onto {status.node_name!r}, not {ccp.spec.node_name!r}")
    listed = manifest.get("archives")
    entries = {str(e.get("key")): e for e in listed if isinstance(e, dict)} if isinstance(listed, list) else {}
    stored = [a for a in status.archives if a.key]
    if not stored:
        problems.append("the object records no stored archive")
    if set(entries) != {a.key for a in stored}:
        problems.append(f"it lists archives {sorted(entries)}, the object {sorted(str(a.key) for a in stored)}")
    for archive in stored:
        if not str(archive.key).startswith(directory + "/"):
            problems.append(f"archive {archive.key} is outside the checkpoint's folder {directory}/")
        entry = entries.get(str(archive.key), {})
        for field in ("container", "size", "sha256"):
            if entry and entry.get(field) != getattr(archive, field):
                problems.append(f"archive {archive.key}: its {field} is {entry.get(field)!r}, the object's")
    return problems


def signed_before(manifest: dict[str, Any], agents_sha256: str | None, key: Ed25519PrivateKey) -> bool:
    """Whether `manifest` is the agent's one, signed already with `key`: a second signer of the same
    hand-over (after a restart, or a retry racing the first) finds it so, and only writes the status."""
    if signature.SIGNATURE not in manifest:
        return False
    unsigned = {k: v for k, v in manifest.items() if k != signature.SIGNATURE}
    if hashlib.sha256(manifest_body(unsigned)).hexdigest() != agents_sha256:
        return False
    try:
        signature.verify(manifest, {signature.key_id(key.public_key()): key.public_key()})
    except signature.Untrusted:
        return False
    return True


def sign_checkpoint(kube: Kube, stores: Stores, key: Ed25519PrivateKey, body: dict[str, Any]) -> None:
    """Check the manifest the agent wrote against the object, sign it, write Succeeded.

    Raises Failure when the manifest cannot be trusted, StorageError when the bucket does not answer
    (the caller tries again), status.Conflict when the object moved on.
    """
    ccp = ContainerCheckpoint.model_validate(body)
    status = StatusWriter(kube, CHECKPOINTS, body)
    started = time.monotonic()
    ref = ccp.status.storage_ref
    storage = kube.storage(ref.name) if ref else None
    if storage is None:
        raise Failure(Reason.STORAGE_NOT_FOUND, f"CheckpointStorage {ref.name if ref else ''!r} is gone")
    try:
        store = stores.of(storage)
    except ValueError as e:
        raise Failure(Reason.STORAGE_UNAVAILABLE, str(e)) from None
    directory = layout.archive_dir(storage.spec.prefix, ccp)
    where = store.uri(f"{directory}/{layout.MANIFEST}")
    untrusted = f"the archives are stored, but their manifest {where} was not signed"
    try:
        raw = store.manifest_bytes(directory)
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{untrusted}: {e}") from None
    if raw is None:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{untrusted}: it is gone")
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    signed = isinstance(manifest, dict) and signed_before(manifest, ccp.status.manifest_sha256, key)
    sha256 = hashlib.sha256(raw).hexdigest()
    if sha256 != ccp.status.manifest_sha256 and not signed:
        raise Failure(
            Reason.ARCHIVE_UNTRUSTED,
            f"{untrusted}: it is not the one the agent wrote (sha256 {sha256}, the agent's "
            f"{ccp.status.manifest_sha256})",
        )
    problems = manifest_problems(manifest, ccp, directory) if isinstance(manifest, dict) else ["it is not JSON"]
    if problems:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{untrusted}: {'; '.join(problems)}")
    if not signed:
        store.put_manifest(directory, signature.sign(manifest, key))
    names = ", ".join(a.container for a in ccp.status.archives)
    status.steps.took("sign", started)
    status.phase(Phase.SUCCEEDED, Reason.SUCCEEDED, f"checkpointed {names} to {store.uri(directory)}/ (signed)")


# --- the agent verifies --------------------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """What a restore may rely on for one archive."""

    # The sha256 the bytes must have: the signed one, or an unsigned manifest's when unsigned archives are admitted.
    sha256: str | None
    signed: bool
    # The size the manifest states the archive inflates to: what its download may write at most.
    uncompressed_size: int | None = None


def archive_trust(
    store: ArchiveStore,
    key: str,
    accept_unsigned: bool,
    keys: Callable[[], Mapping[str, Ed25519PublicKey]],
) -> Trust:
    """Whether the archive at `key` is one this cluster signed, before a byte of it is fetched.

    Signed means: the manifest beside it carries a valid signature of a published key, names the
    namespace whose folder holds the key, and lists the key. A signed manifest that lists the key
    but fails any check is refused always; an archive no signed manifest lists is unsigned, admitted
    only by a storage with acceptUnsignedArchives. Raises Failure(ArchiveUntrusted, ArchiveNotFound).
    """
    where = store.uri(key)
    try:
        raw = store.manifest_bytes(posixpath.dirname(key))
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{e}; nothing was restored") from None
    if raw is None:
        if accept_unsigned:
            return Trust(None, signed=False)
        if not store.exists(key):
            raise Failure(Reason.ARCHIVE_NOT_FOUND, f"{where} does not exist")
        raise Failure(Reason.ARCHIVE_UNTRUSTED, _unsigned(where, "there is no manifest beside it"))
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"the manifest beside {where} cannot be read; nothing was restored")
    entry = next((e for e in manifest.get("archives") or [] if isinstance(e, dict) and e.get("key") == key), None)
    try:
        signature.verify(manifest, keys())
    except signature.Unsigned:
        if accept_unsigned:
            if entry is None:
                return Trust(None, signed=False)
            return Trust(str(entry.get("sha256") or "") or None, signed=False, uncompressed_size=_stated(entry))
        raise Failure(Reason.ARCHIVE_UNTRUSTED, _unsigned(where, "its manifest is not signed")) from None
    except signature.BadSignature as e:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{where}: {e}; nothing was restored") from None
    if entry is None:
        if accept_unsigned:
            return Trust(None, signed=False)
        raise Failure(Reason.ARCHIVE_UNTRUSTED, _unsigned(where, "the signed manifest beside it does not list it"))
    folder = layout.namespace_of_key(store.prefix, key)
    if manifest.get("namespace") != folder:
        raise Failure(
            Reason.ARCHIVE_UNTRUSTED,
            f"{where} was signed for namespace {manifest.get('namespace')!r}, but lies in the folder of "
            f"{folder!r}; nothing was restored",
        )
    sha256 = str(entry.get("sha256") or "")
    if len(sha256) != 64:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"the signed manifest records no sha256 for {where}")
    return Trust(sha256, signed=True, uncompressed_size=_stated(entry))


def _stated(entry: Mapping[str, Any]) -> int | None:
    size = entry.get("uncompressedSize")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _unsigned(where: str, why: str) -> str:
    return (
        f"{where} is not signed by this cluster's controller: {why}. Nothing was restored; a storage with "
        "acceptUnsignedArchives: true admits archives made by plain podman"
    )
