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
import logging
import posixpath
import time
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from checkpointer import layout
from checkpointer.adapters.kube import CHECKPOINTS, Kube
from checkpointer.archive import manifest, signature
from checkpointer.archive.store import ArchiveStore, CorruptArchive, Stores
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
    document = manifest.parse(raw)
    signed = document is not None and manifest.signed_before(document, ccp.status.manifest_sha256, key)
    sha256 = hashlib.sha256(raw).hexdigest()
    if sha256 != ccp.status.manifest_sha256 and not signed:
        raise Failure(
            Reason.ARCHIVE_UNTRUSTED,
            f"{untrusted}: it is not the one the agent wrote (sha256 {sha256}, the agent's "
            f"{ccp.status.manifest_sha256})",
        )
    if document is None:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{untrusted}: it is not JSON")
    problems = manifest.problems(document, ccp, directory)
    if problems:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{untrusted}: {'; '.join(problems)}")
    if not signed:
        store.put_manifest(directory, manifest.sign(document, key))
    names = ", ".join(a.container for a in ccp.status.archives)
    status.steps.took("sign", started)
    status.phase(Phase.SUCCEEDED, Reason.SUCCEEDED, f"checkpointed {names} to {store.uri(directory)}/ (signed)")


# --- the agent verifies --------------------------------------------------------------------------


def archive_trust(
    store: ArchiveStore,
    key: str,
    accept_unsigned: bool,
    keys: Callable[[], Mapping[str, Ed25519PublicKey]],
) -> manifest.Trust:
    """Whether the archive at `key` is one this cluster signed, before a byte of it is fetched: the
    manifest beside it judged by manifest.trust. Raises Failure(ArchiveUntrusted, ArchiveNotFound)."""
    try:
        raw = store.manifest_bytes(posixpath.dirname(key))
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{e}; nothing was restored") from None
    if raw is None and not accept_unsigned and not store.exists(key):
        raise Failure(Reason.ARCHIVE_NOT_FOUND, f"{store.uri(key)} does not exist")
    return manifest.trust(raw, key, store.prefix, store.uri(key), accept_unsigned, keys)
