"""What an agent needs to act on its node: settings, the API server, podman, the CRI runtime and the archive stores."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from checkpointer.adapters.cri import CriRuntime
from checkpointer.adapters.kube import Kube
from checkpointer.adapters.podman import PodmanError, Runtime, criu_check
from checkpointer.archive.encryption import Keys, keys_from_secret
from checkpointer.archive.ledger import Ledger
from checkpointer.archive.store import ArchiveStore, RateLimiter, StorageError, Stores, Transfer
from checkpointer.errors import Failure, Retry
from checkpointer.models import NameRef
from checkpointer.reasons import Reason
from checkpointer.services.capabilities import CRIU_FEATURES, CriFacts, NodeFacts
from checkpointer.settings import Settings

log = logging.getLogger(__name__)
EXCLUDE_LABEL = "checkpointer.dev/exclude"
# The namespace a podman container belongs to: only its ContainerCheckpoints may take it (docs/api.md).
NAMESPACE_LABEL = "checkpointer.dev/namespace"


@dataclass
class Node:
    settings: Settings
    kube: Kube
    runtime: Runtime
    # The node's container runtime over its CRI socket, for Pods' containers; None without a socket.
    cri: CriRuntime | None = None
    stores: Stores = field(init=False)
    # The uploads this agent opened and the local checkpoints `keep` left, for its sweep.
    ledger: Ledger = field(init=False)
    _host: dict[str, str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        transfer = Transfer(
            part_size=self.settings.part_size,
            concurrency=self.settings.upload_concurrency,
            upload_limiter=RateLimiter(self.settings.upload_bytes_per_second),
            download_limiter=RateLimiter(self.settings.download_bytes_per_second),
        )
        self.stores = Stores(self.kube, transfer)
        self.ledger = Ledger(self.settings.spool_dir)

    def host(self) -> dict[str, str]:
        if self._host is None:
            self._host = {"node": self.settings.node_name, **self.runtime.versions()}
        return self._host

    def facts(self) -> NodeFacts:
        """What the agent records on its Lease for the controller: versions and CRIU's feature checks."""
        check = criu_check(self.settings, CRIU_FEATURES)
        host = self.host()
        return NodeFacts(
            criu=check.criu,
            podman=host.get("podman", ""),
            runc=check.runc or host.get("ociRuntime", ""),
            kernel=check.kernel or host.get("kernel", ""),
            supported=check.supported,
            missing=check.missing,
            cri=self.cri_facts(),
        )

    def cri_facts(self) -> CriFacts | None:
        """The node's CRI runtime and whether it would checkpoint; None without a socket, or when the
        runtime does not answer (the controller then refuses nothing up front)."""
        if self.cri is None:
            return None
        try:
            version = self.cri.version()
            refusal = self.cri.checkpoint_refusal(self.settings.spool_dir / ".cri-probe.tar")
        except (Failure, Retry) as e:
            log.warning("the container runtime at %s: %s", self.cri.socket, e.message)
            return None
        return CriFacts(
            runtime=version.runtime_name,
            version=version.runtime_version,
            api_version=version.runtime_api_version,
            checkpoint=refusal is None,
            refusal=refusal or "",
        )

    def store(self, ref: NameRef) -> ArchiveStore:
        """The store of a CheckpointStorage the controller resolved."""
        storage = self.kube.storage(ref.name)
        if storage is None:
            raise Failure(Reason.STORAGE_NOT_FOUND, f"CheckpointStorage {ref.name!r} does not exist")
        try:
            return self.stores.of(storage)
        except (ValueError, *StorageError) as e:
            raise Failure(Reason.STORAGE_UNAVAILABLE, str(e)) from None

    def encryption(self, ref: NameRef) -> Keys | None:
        """The age keys of a CheckpointStorage the controller resolved; None when it does not encrypt."""
        storage = self.kube.storage(ref.name)
        if storage is None:
            raise Failure(Reason.STORAGE_NOT_FOUND, f"CheckpointStorage {ref.name!r} does not exist")
        try:
            secret = self.kube.encryption_secret(storage)
            return None if secret is None else keys_from_secret(*secret)
        except ValueError as e:
            raise Failure(Reason.STORAGE_UNAVAILABLE, str(e)) from None


def classify(error: PodmanError, default: Reason) -> Reason:
    """Podman's message to a reason. Pure, for unit tests."""
    if error.unavailable:
        return Reason.RUNTIME_UNAVAILABLE
    text = error.message.lower()
    if error.status == 404 or "no such container" in text or "no container with name or id" in text:
        return Reason.CONTAINER_NOT_FOUND
    if "missing features" in text or "feature check failed" in text or "not supported by criu" in text:
        return Reason.CRIU_FEATURE_MISSING
    if "not running" in text or "state improper" in text:
        return Reason.CONTAINER_NOT_RUNNING
    if "no such image" in text or "image not known" in text or "unable to find image" in text:
        return Reason.IMAGE_NOT_FOUND
    if "already in use" in text or "name is in use" in text:
        return Reason.NAME_IN_USE
    return default
