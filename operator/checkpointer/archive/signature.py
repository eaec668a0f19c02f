"""Signed manifests: Ed25519 over a manifest's canonical bytes. Pure functions, no I/O.

The canonical bytes of a manifest are its JSON without the `signature` field, with sorted keys,
compact separators, in UTF-8. The signature goes into the manifest itself:
`signature: {algorithm: Ed25519, keyID: <sha256 of the raw public key>, value: <base64>}`.
Ed25519 is deterministic: signing the same manifest twice gives the same bytes, so two signers
racing on one manifest write the same object.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"
SIGNATURE = "signature"
# Where the controller keeps its key, and where it publishes the public half for the agents.
PRIVATE_KEY = "ed25519.key"
PUBLIC_KEY = "ed25519.pub"
PUBLIC_SUFFIX = ".pub"


class Untrusted(Exception):
    """The manifest does not prove that this cluster's controller wrote it."""


class Unsigned(Untrusted):
    """The manifest carries no signature at all (a plain podman export, or a manifest of old)."""


class BadSignature(Untrusted):
    """The manifest carries a signature that is malformed, of an unknown key, or does not match."""


def canonical(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: every field but the signature, sorted, compact, UTF-8."""
    content = {k: v for k, v in manifest.items() if k != SIGNATURE}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign(manifest: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The manifest with its signature; one it carried before is replaced."""
    value = base64.b64encode(key.sign(canonical(manifest))).decode()
    signature = {"algorithm": ALGORITHM, "keyID": key_id(key.public_key()), "value": value}
    return {**{k: v for k, v in manifest.items() if k != SIGNATURE}, SIGNATURE: signature}


def verify(manifest: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    """Return the keyID that signed `manifest`; raise Unsigned or BadSignature. `keys` by keyID."""
    signature = manifest.get(SIGNATURE)
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
        public.verify(value, canonical(manifest))
    except (binascii.Error, InvalidSignature, ValueError):
        raise BadSignature("the manifest's signature does not match its content: it was edited") from None
    return kid


# --- keys as they are stored ---------------------------------------------------------------------


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the signing key is not an Ed25519 key")
    return key


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the public key is not an Ed25519 key")
    return key


def public_keys(published: Mapping[str, str]) -> dict[str, Ed25519PublicKey]:
    """The trusted public keys by keyID, from the published entries (`*.pub`); others are ignored."""
    keys: dict[str, Ed25519PublicKey] = {}
    for name, pem in published.items():
        if not name.endswith(PUBLIC_SUFFIX):
            continue
        try:
            public = load_public(pem)
        except ValueError:
            continue  # an entry that is no key trusts nothing
        keys[key_id(public)] = public
    return keys


def published(current: Ed25519PublicKey, before: Mapping[str, str]) -> dict[str, str] | None:
    """The published entries once `current` is the signing key; None when nothing changes.

    A public key the controller signed with before stays published under its keyID, so archives it
    signed still restore after a rotation; an operator removes it to stop trusting them.
    """
    pem = public_pem(current)
    if before.get(PUBLIC_KEY) == pem:
        return None
    entries = dict(before)
    old = entries.pop(PUBLIC_KEY, None)
    if old is not None:
        with contextlib.suppress(ValueError):  # not a key: nothing to keep trusting
            entries[f"ed25519-{key_id(load_public(old))[:16]}{PUBLIC_SUFFIX}"] = old
    entries[PUBLIC_KEY] = pem
    return entries
