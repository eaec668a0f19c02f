"""The controller: checks what needs the cluster, schedules objects onto nodes, keeps storage status.

Handlers are thin: parse, call a service, write status. One replica leads (see leadership.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import kopf

from checkpointer import CONTROLLER_FINALIZER, GROUP, NODE_LABEL, VERSION
from checkpointer.adapters.kube import CHECKPOINTS, RESTORES, STORAGES, Kube
from checkpointer.archive.store import RateLimiter, StorageError, Stores, Transfer
from checkpointer.errors import Failure
from checkpointer.layout import archive_dir
from checkpointer.models import CheckpointStorage, ContainerCheckpoint, ContainerRestore
from checkpointer.reasons import Phase, Reason
from checkpointer.services import scheduling, validation
from checkpointer.settings import Settings
from checkpointer.status import Conflict, StatusWriter, event_subject

log = logging.getLogger(__name__)
T = TypeVar("T")


def _fail(kube: Kube, plural: str, body: kopf.Body, error: Failure) -> None:
    try:
        StatusWriter(kube, plural, dict(body)).phase(Phase.FAILED, error.reason, error.message, scheduled=False)
    except Conflict as e:  # the agent moved it on first: its word stands
        log.info("not failing %s: %s", body["metadata"]["name"], e)
        return
    kopf.warn(body, reason=str(error.reason), message=error.message)


def _scheduled(kube: Kube, plural: str, patch: kopf.Patch, body: kopf.Body, node: str, extra: dict[str, Any]) -> None:
    message = f"handed to the agent on node {node}"
    # Status first, then the label: the agent's watch sees the object only once it carries the label,
    # and by then it is already Scheduled, so the agent can start at once. A controller that dies in
    # between leaves a Scheduled object without its label; the next one labels it (see _label).
    StatusWriter(kube, plural, dict(body)).phase(
        Phase.SCHEDULED, Reason.SCHEDULED, message, scheduled=True, nodeName=node, **extra
    )
    _label(patch, body, node)
    kopf.event(body, type="Normal", reason=str(Reason.SCHEDULED), message=message)


def _label(patch: kopf.Patch, body: kopf.Body, node: str) -> None:
    patch.metadata.setdefault("labels", {})[NODE_LABEL] = node
    # kopf's finalizer rides on the label's patch. The handlers that need it (the pickup deadline,
    # the archives' deletion) match only labelled objects, so kopf does not add it in a patch and
    # a watch round-trip of its own before the first handler runs.
    finalizers = list(body["metadata"].get("finalizers") or [])
    if CONTROLLER_FINALIZER not in finalizers:
        patch.metadata["finalizers"] = [*finalizers, CONTROLLER_FINALIZER]


def _needs_scheduling(plural: str, patch: kopf.Patch, body: kopf.Body) -> bool:
    """False for an object scheduled before; one left Scheduled without its label gets it now."""
    status = body.get("status") or {}
    phase = status.get("phase")
    if not phase:
        return True
    if phase == Phase.SCHEDULED and NODE_LABEL not in (body["metadata"].get("labels") or {}):
        log.info(
            "%s %s/%s is Scheduled without its node label: labelling it",
            plural,
            body["metadata"]["namespace"],
            body["metadata"]["name"],
        )
        _label(patch, body, str(status.get("nodeName") or body["spec"]["nodeName"]))
    return False


# Handlers that hold kopf's finalizer match only objects with the node label: see _scheduled.
LABELLED = {NODE_LABEL: kopf.PRESENT}


def _still_scheduled(body: kopf.Body, **_: Any) -> bool:
    # A `when` filter, not field=/value=: those make kopf keep status.phase in its last-handled
    # annotation and so patch every object once more on each phase change.
    return bool((body.get("status") or {}).get("phase") == Phase.SCHEDULED)


def register(registry: kopf.OperatorRegistry, settings: Settings, kube: Kube) -> None:
    leases = scheduling.AgentLeases(kube, settings.namespace)
    unlimited = RateLimiter(0)
    stores = Stores(kube, Transfer(settings.part_size, settings.upload_concurrency, unlimited, unlimited))

    @kopf.on.resume(GROUP, VERSION, CHECKPOINTS, registry=registry)
    @kopf.on.create(GROUP, VERSION, CHECKPOINTS, registry=registry)
    def schedule_checkpoint(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if not _needs_scheduling(CHECKPOINTS, patch, body):
            return
        ccp = ContainerCheckpoint.model_validate(dict(body))
        try:
            storage = with_fresh_storage(lambda: scheduling.schedule_checkpoint(kube, leases, ccp))
        except Failure as e:
            _fail(kube, CHECKPOINTS, body, e)
            return
        _scheduled(
            kube, CHECKPOINTS, patch, body, ccp.spec.node_name, {"storageRef": {"name": storage}} if storage else {}
        )

    @kopf.on.resume(GROUP, VERSION, RESTORES, registry=registry)
    @kopf.on.create(GROUP, VERSION, RESTORES, registry=registry)
    def schedule_restore(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if not _needs_scheduling(RESTORES, patch, body):
            return
        crst = ContainerRestore.model_validate(dict(body))
        try:
            scheduling.require_node_with_agent(kube, leases, crst.spec.node_name)
            archive = with_fresh_storage(lambda: scheduling.resolve_restore_archive(kube, crst))
        except Failure as e:
            _fail(kube, RESTORES, body, e)
            return
        _scheduled(
            kube,
            RESTORES,
            patch,
            body,
            crst.spec.node_name,
            {"archive": archive.model_dump(by_alias=True, exclude_none=True, mode="json")},
        )

    @kopf.timer(
        GROUP,
        VERSION,
        CHECKPOINTS,
        interval=10,
        idle=settings.agent_pickup_timeout_seconds,
        labels=LABELLED,
        when=_still_scheduled,
        registry=registry,
    )
    @kopf.timer(
        GROUP,
        VERSION,
        RESTORES,
        interval=10,
        idle=settings.agent_pickup_timeout_seconds,
        labels=LABELLED,
        when=_still_scheduled,
        registry=registry,
    )
    def agent_pickup_deadline(body: kopf.Body, **_: Any) -> None:
        """An object still Scheduled while its node's agent is silent would otherwise wait forever."""
        node = body["spec"]["nodeName"]
        if not leases.alive(node):
            _fail(
                kube,
                CHECKPOINTS if body["kind"] == "ContainerCheckpoint" else RESTORES,
                body,
                Failure(
                    Reason.AGENT_UNAVAILABLE,
                    f"the agent on node {node!r} stopped renewing its Lease before it picked this object up",
                ),
            )

    @kopf.on.delete(GROUP, VERSION, CHECKPOINTS, labels=LABELLED, registry=registry)
    def delete_archives(body: kopf.Body, **_: Any) -> None:
        ccp = ContainerCheckpoint.model_validate(dict(body))
        phase = ccp.status.phase
        if phase and not Phase(phase).finished and leases.alive(ccp.spec.node_name):
            # The agent sees the deletion in the answer to its next status write, gives the container
            # back and ends the object; podman may still be running. Only then is the bucket cleaned.
            raise kopf.TemporaryError(
                f"waiting for the agent on {ccp.spec.node_name} to stop this {phase} checkpoint", delay=2
            )
        if ccp.status.storage_ref is None or not ccp.spec.export:
            return
        storage = kube.storage(ccp.status.storage_ref.name)
        if storage is None:
            log.warning(
                "storage %s is gone; archives of %s/%s stay where they are",
                ccp.status.storage_ref.name,
                ccp.metadata.namespace,
                ccp.metadata.name,
            )
            return
        if storage.spec.deletion_policy == "Retain":
            return
        directory = archive_dir(storage.spec.prefix, ccp)
        try:
            if not any(a.key for a in ccp.status.archives):
                # Nothing of it was stored; an upload a killed agent left open is all there can be.
                stores.of(storage).abort_uploads_under(directory)
                return
            deleted = stores.of(storage).delete_dir(directory)
        except StorageError as e:
            raise kopf.TemporaryError(f"the archives could not be deleted yet: {e}", delay=10) from None
        kopf.event(body, type="Normal", reason="ArchivesDeleted", message=f"deleted {deleted} objects from the bucket")

    def revalidate(storage: CheckpointStorage) -> bool:
        """Ask the bucket now and write what it says; returns whether it is Available."""
        status = validation.validate(stores, storage)
        if status["phase"] != storage.status.get("phase"):
            log.info("CheckpointStorage %s is %s: %s", storage.metadata.name, status["phase"], status["message"])
            kopf.event(
                event_subject("CheckpointStorage", storage.metadata),
                type="Normal" if status["phase"] == "Available" else "Warning",
                reason=status["phase"],
                message=status["message"],
            )
        kube.patch_storage_status(storage.metadata.name, status)
        return bool(status["phase"] == "Available")

    def with_fresh_storage(schedule: Callable[[], T]) -> T:
        """`schedule()`, asked once more when it failed on a storage whose status may be stale: the
        timer's last look may predate the end of an outage by up to an interval."""
        try:
            return schedule()
        except Failure as e:
            if e.reason != Reason.STORAGE_UNAVAILABLE:
                raise
            if not any([revalidate(s) for s in kube.storages() if not s.available]):
                raise
        return schedule()

    @kopf.timer(GROUP, VERSION, STORAGES, interval=settings.storage_validation_seconds, registry=registry)
    def validate_storage(body: kopf.Body, **_: Any) -> None:
        revalidate(CheckpointStorage.model_validate(dict(body)))
