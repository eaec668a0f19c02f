"""What an agent needs to act on its node: settings, the API server, podman, storage clients."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from checkpointer.adapters import storage as s3
from checkpointer.adapters.kube import Kube
from checkpointer.adapters.podman import PodmanError, Runtime
from checkpointer.conditions import now, phase_patch
from checkpointer.errors import Failure
from checkpointer.models import NameRef
from checkpointer.reasons import Phase, Reason
from checkpointer.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

EXCLUDE_LABEL = "checkpointer.dev/exclude"


@dataclass
class Agent:
    settings: Settings
    kube: Kube
    runtime: Runtime
    limiter: s3.RateLimiter = field(init=False)  # uploads
    download_limiter: s3.RateLimiter = field(init=False)
    _host: dict[str, str] | None = field(default=None, init=False)
    # One client per storage configuration: a boto3 client costs megabytes and milliseconds to make.
    _clients: dict[tuple[str, str, s3.Credentials | None], S3Client] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.limiter = s3.RateLimiter(self.settings.upload_bytes_per_second)
        self.download_limiter = s3.RateLimiter(self.settings.download_bytes_per_second)

    def host(self) -> dict[str, str]:
        if self._host is None:
            self._host = {"node": self.settings.node_name, **self.runtime.versions()}
        return self._host

    def bucket(self, ref: NameRef) -> s3.Bucket:
        """The bucket of a storage the controller resolved."""
        storage = self.kube.storage(ref.name)
        if storage is None:
            raise Failure(Reason.STORAGE_NOT_FOUND, f"CheckpointStorage {ref.name!r} does not exist")
        try:
            credentials = self.kube.credentials(storage)
        except ValueError as e:
            raise Failure(Reason.STORAGE_UNAVAILABLE, str(e)) from None
        key = (ref.name, storage.spec.model_dump_json(), credentials)
        if key not in self._clients:
            self._clients[key] = s3.client(storage, credentials, max_connections=self.settings.upload_concurrency + 2)
        return s3.Bucket(self._clients[key], storage.spec.bucket, storage.spec.prefix)


class StatusWriter:
    """Status patches for one object; progress is written at most once a second."""

    def __init__(self, kube: Kube, plural: str, body: dict[str, Any]) -> None:
        self.kube = kube
        self.plural = plural
        self.namespace = body["metadata"]["namespace"]
        self.name = body["metadata"]["name"]
        self.generation = int(body["metadata"].get("generation", 0))
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self._last_progress = 0.0
        self._lock = threading.Lock()

    def patch(self, fields: dict[str, Any]) -> None:
        with self._lock:
            self.status.update(fields)
            self.kube.patch_status(self.plural, self.namespace, self.name, fields)

    def phase(self, phase: Phase, reason: Reason, message: str, **extra: Any) -> None:
        fields = phase_patch(self.status, phase, reason, message, self.generation)
        if phase in (Phase.CHECKPOINTING, Phase.DOWNLOADING) and not self.status.get("startTime"):
            fields["startTime"] = now(precise=True)
        self.patch({**fields, **extra})

    def progress(self, done: int, total: int | None = None, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_progress < 1.0:
            return
        self._last_progress = time.monotonic()
        progress = {"bytesDone": done}
        if total is not None:
            progress["bytesTotal"] = total
        # Progress is informative; a failed patch must not fail the checkpoint.
        with contextlib.suppress(Exception):
            self.patch({"progress": progress})


def classify(error: PodmanError, default: Reason) -> Reason:
    """Podman's message to a reason. Pure, for unit tests."""
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
