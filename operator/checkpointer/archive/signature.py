"""The controller's Ed25519 signing keys: made, stored, published, and named by their keyID. Pure
functions, no I/O.

What a key signs, and where its signature goes, is the manifest's (archive/manifest.py). The private
key lives in the controller's Secret, the public ones in a ConfigMap the agents read
(services/signing.py); a public key signed with before stays published after a rotation.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# Where the controller keeps its key, and where it publishes the public half for the agents.
PRIVATE_KEY = "ed25519.key"
PUBLIC_KEY = "ed25519.pub"
PUBLIC_SUFFIX = ".pub"


def key_id(public: Ed25519PublicKey) -> str:
    """The sha256 of the raw public key: what a manifest's signature names its key by."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


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
