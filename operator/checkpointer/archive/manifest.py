"""The manifest: what a checkpoint's folder says of its archives, its stored and signed bytes, and
every judgment made of one read back. Pure functions, no I/O.

The agent builds it typed (Manifest, Entry) from the object, its node and its spools, and stores its
`body`. The controller and a restore judge what the bucket holds instead: the document as read
(`parse`), never a typed reading of it. What they judge may have been written by anyone, and a typed
parse would coerce a field (`"1234"` to 1234) or drop one it does not know, while a signature covers
every field exactly as stored.

A signature goes into the manifest itself: `signature: {algorithm: Ed25519, keyID: <sha256 of the raw
public key>, value: <base64>}`, over the canonical bytes of the rest: its JSON without `signature`,
with sorted keys, compact separators, in UTF-8 (docs/api.md). Ed25519 is deterministic: signing the
same manifest twice gives the same bytes, so two signers racing on one manifest write the same
object. The keys themselves (their stored forms, ids and publication) are archive/signature.py's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field

from checkpointer import layout
from checkpointer.archive import encryption
from checkpointer.archive.signature import key_id
from checkpointer.archive.workfolder import SpoolRecord
from checkpointer.errors import Failure
from checkpointer.models import Archive, Compression, ContainerCheckpoint, Model
from checkpointer.reasons import Reason

VERSION = 1
KIND = "ContainerCheckpoint"
SIGNATURE = "signature"
ALGORITHM = "Ed25519"
# The files of an archive that say how podman builds the container; the manifest records their sha256.
CONFIGURATION_FILES = ("config.dump", "spec.dump")


# --- its content ---------------------------------------------------------------------------------


class Encryption(Model):
    """How an archive is encrypted, and to whom."""

    format: str
    recipients: list[str]


class Entry(Model):
    """One archive of the manifest, its fields in their stored order.

    Declared here rather than taken from status's Archive, so that a field added to status does not
    change what is signed.
    """

    container: str
    container_id: str = Field(default="", alias="containerID")
    uri: str | None = None
    key: str | None = None
    size: int | None = None  # of the stored bytes
    sha256: str | None = None  # of the stored bytes
    compression: Compression | None = None
    stats: dict[str, Any] | None = None  # podman's, as it reported them
    config_dump_sha256: str | None = Field(default=None, alias="configDumpSHA256")
    spec_dump_sha256: str | None = Field(default=None, alias="specDumpSHA256")
    # The tar's size before compression: what a restore's download may write at most. None when
    # podman compressed it (its zstd frame does not say).
    uncompressed_size: int | None = None
    encryption: Encryption | None = None
    # A Pod's container (podRef): the image as the Pod's spec names it, and the runtime's reference to
    # it, the repository digest (`<repository>@sha256:…`) of an image pulled from a registry.
    image: str | None = None
    image_id: str | None = Field(default=None, alias="imageID")


class PodImage(Model):
    """A Pod's container's image, for its manifest entry."""

    image: str
    image_id: str = Field(default="", alias="imageID")


class Manifest(Model):
    """Everything needed to restore without the cluster that made the archives; its fields in their
    stored order."""

    manifest_version: int = VERSION
    kind: str = KIND
    namespace: str
    name: str
    uid: str
    node_name: str
    flags: dict[str, Any]  # the checkpoint's spec, as the user wrote it
    host: dict[str, str]  # the node and its podman, CRIU, runtime and kernel versions
    start_time: str
    completion_time: str
    archives: list[Entry]
    # A Pod's checkpoint (podRef): the Pod's name, uid, labels and whole spec, for a restore.
    pod: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        checkpoint: ContainerCheckpoint,
        entries: list[Entry],
        host: dict[str, str],
        started: str,
        finished: str,
        pod: dict[str, Any] | None = None,
    ) -> Manifest:
        spec, meta = checkpoint.spec, checkpoint.metadata
        return cls(
            namespace=meta.namespace,
            name=meta.name,
            uid=meta.uid,
            node_name=checkpoint.node_name,
            flags=spec.model_dump(by_alias=True, exclude_defaults=True, mode="json"),
            host=host,
            start_time=started,
            completion_time=finished,
            archives=entries,
            pod=pod,
        )

    def document(self) -> dict[str, Any]:
        """The manifest as JSON holds it; a field without a value is left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


@dataclass(frozen=True)
class Configuration:
    """The sha256 of an archive's config.dump and spec.dump, as podman's local checkpoint holds them;
    None for a file that could not be read (the archive's own sha256 binds it all the same)."""

    config_dump: str | None = None
    spec_dump: str | None = None

    @classmethod
    def of(cls, files: Mapping[str, bytes]) -> Configuration:
        """From the contents of the CONFIGURATION_FILES that could be read, by name."""

        def sha256(name: str) -> str | None:
            return hashlib.sha256(files[name]).hexdigest() if name in files else None

        return cls(config_dump=sha256("config.dump"), spec_dump=sha256("spec.dump"))


def entry(
    archive: Archive, configuration: Configuration, spooled: SpoolRecord | None, image: PodImage | None = None
) -> Entry:
    """An archive's entry: what the object's status records of it, the digests of its configuration,
    and what its spool knows beyond status: the size it inflates to and the recipients it is
    encrypted to; for a Pod's container, its image."""
    recipients = list(spooled.recipients) if spooled is not None else []
    return Entry(
        container=archive.container,
        containerID=archive.container_id,
        uri=archive.uri,
        key=archive.key,
        size=archive.size,
        sha256=archive.sha256,
        compression=archive.compression,
        stats=archive.stats,
        configDumpSHA256=configuration.config_dump,
        specDumpSHA256=configuration.spec_dump,
        uncompressed_size=spooled.uncompressed_size if spooled is not None else None,
        encryption=Encryption(format=encryption.FORMAT, recipients=recipients) if recipients else None,
        image=image.image if image is not None else None,
        imageID=(image.image_id or None) if image is not None else None,
    )


# --- its bytes -----------------------------------------------------------------------------------


def body(document: dict[str, Any]) -> bytes:
    """The bytes stored: readable JSON, its fields in the writer's order."""
    return json.dumps(document, indent=2).encode()


def parse(raw: bytes) -> dict[str, Any] | None:
    """The document of stored bytes; None when they are not a JSON object."""
    try:
        document = json.loads(raw)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def canonical(document: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: every field but the signature, sorted, compact, UTF-8."""
    content = {k: v for k, v in document.items() if k != SIGNATURE}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# --- its signature -------------------------------------------------------------------------------


class Untrusted(Exception):
    """The manifest does not prove that this cluster's controller wrote it."""


class Unsigned(Untrusted):
    """The manifest carries no signature at all (a plain podman export, or a manifest of old)."""


class BadSignature(Untrusted):
    """The manifest carries a signature that is malformed, of an unknown key, or does not match."""


def sign(document: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The manifest with its signature; one it carried before is replaced."""
    value = base64.b64encode(key.sign(canonical(document))).decode()
    signature = {"algorithm": ALGORITHM, "keyID": key_id(key.public_key()), "value": value}
    return {**{k: v for k, v in document.items() if k != SIGNATURE}, SIGNATURE: signature}


def verify(document: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    """Return the keyID that signed `document`; raise Unsigned or BadSignature. `keys` by keyID."""
    signature = document.get(SIGNATURE)
    if signature is None:
        raise Unsigned("the manifest is not signed")
    if not isinstance(signature, dict):
        raise BadSignature("the manifest's signature is malformed")
    if signature.get("algorithm") != ALGORITHM:
        raise BadSignature(f"the manifest's signature is not {ALGORITHM} but {signature.get('algorithm')!r}")
    kid = str(signature.get("keyID") or "")
    public = keys.get(kid)
    if public is None:
        raise BadSignature(f"the manifest is signed by key {kid[:16]!r}, which is not one of this cluster's")
    try:
        value = base64.b64decode(str(signature.get("value") or ""), validate=True)
        public.verify(value, canonical(document))
    except (binascii.Error, InvalidSignature, ValueError):
        raise BadSignature("the manifest's signature does not match its content: it was edited") from None
    return kid


# --- the controller's checks before it signs -----------------------------------------------------


def problems(document: Mapping[str, Any], ccp: ContainerCheckpoint, directory: str) -> list[str]:
    """How the manifest read back differs from what the object says was stored."""
    found = []
    meta, status = ccp.metadata, ccp.status
    expected = {"namespace": meta.namespace, "name": meta.name, "uid": meta.uid, "nodeName": ccp.node_name}
    for field, value in expected.items():
        if document.get(field) != value:
            found.append(f"its {field} is {document.get(field)!r}, the object's {value!r}")
    if ccp.spec.node_name and status.node_name and status.node_name != ccp.spec.node_name:
        found.append(f"the object was scheduled onto {status.node_name!r}, not {ccp.spec.node_name!r}")
    listed = document.get("archives")
    entries = {str(e.get("key")): e for e in listed if isinstance(e, dict)} if isinstance(listed, list) else {}
    stored = [a for a in status.archives if a.key]
    if not stored:
        found.append("the object records no stored archive")
    if set(entries) != {a.key for a in stored}:
        found.append(f"it lists archives {sorted(entries)}, the object {sorted(str(a.key) for a in stored)}")
    for archive in stored:
        if not str(archive.key).startswith(directory + "/"):
            found.append(f"archive {archive.key} is outside the checkpoint's folder {directory}/")
        listed_entry = entries.get(str(archive.key), {})
        for field in ("container", "size", "sha256"):
            if listed_entry and listed_entry.get(field) != getattr(archive, field):
                found.append(f"archive {archive.key}: its {field} is {listed_entry.get(field)!r}, the object's")
    return found


def signed_before(document: Mapping[str, Any], agents_sha256: str | None, key: Ed25519PrivateKey) -> bool:
    """Whether `document` is the agent's one, signed already with `key`: a second signer of the same
    hand-over (after a restart, or a retry racing the first) finds it so, and only writes the status."""
    if SIGNATURE not in document:
        return False
    unsigned = {k: v for k, v in document.items() if k != SIGNATURE}
    if hashlib.sha256(body(unsigned)).hexdigest() != agents_sha256:
        return False
    try:
        verify(document, {key_id(key.public_key()): key.public_key()})
    except Untrusted:
        return False
    return True


# --- a restore's trust in an archive -------------------------------------------------------------


@dataclass(frozen=True)
class Trust:
    """What a restore may rely on for one archive."""

    # The sha256 the bytes must have: the signed one, or an unsigned manifest's when unsigned archives are admitted.
    sha256: str | None
    signed: bool
    # The size the manifest states the archive inflates to: what its download may write at most.
    uncompressed_size: int | None = None


def trust(
    raw: bytes | None,
    key: str,
    prefix: str,
    where: str,
    accept_unsigned: bool,
    keys: Callable[[], Mapping[str, Ed25519PublicKey]],
) -> Trust:
    """Whether the archive at `key` is one this cluster signed, from the manifest beside it (`raw`,
    None when there is none; `where` names the archive in messages).

    Signed means: the manifest carries a valid signature of a published key, names the namespace
    whose folder holds the key, and lists the key. A signed manifest that lists the key but fails
    any check is refused always; an archive no signed manifest lists is unsigned, admitted only
    with `accept_unsigned`. Raises Failure(ArchiveUntrusted). `keys` is asked only for a manifest
    that can be read.
    """
    if raw is None:
        if accept_unsigned:
            return Trust(None, signed=False)
        raise Failure(Reason.ARCHIVE_UNTRUSTED, _unsigned(where, "there is no manifest beside it"))
    document = parse(raw)
    if document is None:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"the manifest beside {where} cannot be read; nothing was restored")
    listed = next((e for e in document.get("archives") or [] if isinstance(e, dict) and e.get("key") == key), None)
    try:
        verify(document, keys())
    except Unsigned:
        if accept_unsigned:
            if listed is None:
                return Trust(None, signed=False)
            return Trust(str(listed.get("sha256") or "") or None, signed=False, uncompressed_size=_stated(listed))
        raise Failure(Reason.ARCHIVE_UNTRUSTED, _unsigned(where, "its manifest is not signed")) from None
    except BadSignature as e:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"{where}: {e}; nothing was restored") from None
    if listed is None:
        if accept_unsigned:
            return Trust(None, signed=False)
        raise Failure(Reason.ARCHIVE_UNTRUSTED, _unsigned(where, "the signed manifest beside it does not list it"))
    folder = layout.namespace_of_key(prefix, key)
    if document.get("namespace") != folder:
        raise Failure(
            Reason.ARCHIVE_UNTRUSTED,
            f"{where} was signed for namespace {document.get('namespace')!r}, but lies in the folder of "
            f"{folder!r}; nothing was restored",
        )
    sha256 = str(listed.get("sha256") or "")
    if len(sha256) != 64:
        raise Failure(Reason.ARCHIVE_UNTRUSTED, f"the signed manifest records no sha256 for {where}")
    return Trust(sha256, signed=True, uncompressed_size=_stated(listed))


def _stated(listed: Mapping[str, Any]) -> int | None:
    size = listed.get("uncompressedSize")
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _unsigned(where: str, why: str) -> str:
    return (
        f"{where} is not signed by this cluster's controller: {why}. Nothing was restored; a storage with "
        "acceptUnsignedArchives: true admits archives made by plain podman"
    )
