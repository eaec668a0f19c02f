"""The controller's signer: the one writer of Succeeded for an exported ContainerCheckpoint (one
kept on the node only, its agent ends itself).

The agent stores the archives, writes their manifest unsigned and hands the object over (phase
Uploading, reason Signing). The Signer holds the key, takes the hand-over from the watch event,
signs through services/signing.py (which checks the manifest against the object with
archive/manifest.py) and writes Succeeded there, or Failed here when it may not. A manifest the
bucket did not take while it was away is signed again by one loop of the controller's own
(Signer.sign_again), not by a kopf timer: a timer on checkpoints makes kopf keep every checkpoint's
latest body in memory.
"""

from __future__ import annotations

import logging
import threading
from typing import cast

import kopf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from checkpointer.adapters.kube import CHECKPOINTS, Kube
from checkpointer.archive.store import StorageError, Stores
from checkpointer.errors import Failure
from checkpointer.models import CheckpointStatus, Metadata
from checkpointer.reasons import Phase
from checkpointer.services import signing
from checkpointer.settings import Settings
from checkpointer.status import Conflict, StatusWriter, post_event

log = logging.getLogger(__name__)


class Signer:
    """Holds the signing key; signs each checkpoint handed over, one at a time per object, and again
    while the bucket does not answer."""

    # How often a manifest the bucket did not take is signed again.
    RETRY_SECONDS = 10.0

    def __init__(self, kube: Kube, settings: Settings, stores: Stores) -> None:
        self.kube = kube
        self.settings = settings
        self.stores = stores
        self._key: Ed25519PrivateKey | None = None
        self._lock = threading.Lock()
        self._signing: set[str] = set()
        # Checkpoints whose manifest could not be signed while the bucket did not answer, by uid: (namespace, name).
        self._unsigned: dict[str, tuple[str, str]] = {}

    def load_key(self) -> None:
        """The key from its Secret, created on first start (services/signing.py, signing_key)."""
        self._key = signing.signing_key(self.kube, self.settings)

    def handed_over(self, body: kopf.Body) -> None:
        """The agent handed this checkpoint over: sign its manifest and write Succeeded, or Failed."""
        if body["metadata"].get("deletionTimestamp"):
            return  # controller.delete_archives removes what it stored, the unsigned manifest included
        uid = str(body["metadata"]["uid"])
        with self._lock:  # the event handler and the retry loop: one at a time signs an object
            if uid in self._signing:
                return
            self._signing.add(uid)
        try:
            self._sign(body)
        finally:
            with self._lock:
                self._signing.discard(uid)

    def sign_again(self) -> None:
        """One round of the retry loop: each manifest the bucket did not take, from its object as it is now."""
        with self._lock:
            due = list(self._unsigned.items())
        for uid, (namespace, name) in due:
            try:
                fresh = self.kube.get(CHECKPOINTS, namespace, name)
            except Exception as e:  # ApiException or the connection itself: the next round asks again
                log.warning("could not read %s/%s to sign its manifest: %s", namespace, name, e)
                continue
            if (
                fresh is None
                or fresh["metadata"]["uid"] != uid
                or not signing.signing_requested(CheckpointStatus.of(fresh))
            ):
                with self._lock:
                    self._unsigned.pop(uid, None)
                continue
            self.handed_over(kopf.Body(cast(kopf.RawBody, fresh)))

    def _sign(self, body: kopf.Body) -> None:
        meta = body["metadata"]
        uid, where = str(meta["uid"]), f"{meta['namespace']}/{meta['name']}"
        if self._key is None:
            raise RuntimeError("the signing key is not loaded: it is read at the operator's start")
        try:
            signing.sign_checkpoint(self.kube, self.stores, self._key, dict(body))
        except Failure as e:
            log.warning("checkpoint %s: %s: %s", where, e.reason, e.message)
            # The agent kept podman's local checkpoints for this: seeing Failed, it restores in place
            # the containers this checkpoint stopped (services/checkpoint.py, settle). The archives and
            # their unsigned manifest stay together, and go together with the object.
            message = (
                f"{e.message}; the node's agent restores the containers it stopped in place; the archives and "
                "their unsigned manifest stay until the ContainerCheckpoint is deleted"
            )
            try:
                StatusWriter(self.kube, CHECKPOINTS, dict(body)).phase(Phase.FAILED, e.reason, message)
            except Conflict:
                return
            post_event("ContainerCheckpoint", Metadata.model_validate(meta), "Warning", e.reason, message)
        except Conflict as e:  # signed already (the other handler), or gone
            log.info("not signing %s: %s", where, e)
        except StorageError as e:
            log.warning(
                "could not sign the manifest of %s yet, trying again in %.0fs: %s", where, self.RETRY_SECONDS, e
            )
            with self._lock:
                self._unsigned[uid] = (meta["namespace"], meta["name"])
            return
        with self._lock:
            self._unsigned.pop(uid, None)
