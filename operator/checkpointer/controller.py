"""The controller: checks what needs the cluster, schedules objects onto nodes, keeps storage status.

Handlers are thin: parse, call a service, write status. Runs as one active replica.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from checkpointer import CONTROLLER_FINALIZER, GROUP, NODE_LABEL, VERSION
from checkpointer.adapters import storage as s3
from checkpointer.adapters.kube import CHECKPOINTS, RESTORES, STORAGES, Kube
from checkpointer.conditions import phase_patch, set_condition
from checkpointer.errors import Failure
from checkpointer.layout import archive_dir
from checkpointer.models import CheckpointStorage, ContainerCheckpoint, ContainerRestore
from checkpointer.reasons import ConditionType, Phase, Reason
from checkpointer.services import scheduling
from checkpointer.services import storage as storage_service
from checkpointer.settings import Settings

log = logging.getLogger(__name__)


def _fail(patch: kopf.Patch, body: kopf.Body, error: Failure) -> None:
    status = dict(body.get("status") or {})
    generation = int(body["metadata"].get("generation", 0))
    fields = phase_patch(status, Phase.FAILED, error.reason, error.message, generation)
    fields["conditions"] = set_condition(
        fields["conditions"], ConditionType.SCHEDULED, False, error.reason, error.message, generation
    )
    patch.status.update(fields)
    kopf.warn(body, reason=str(error.reason), message=error.message)


def _scheduled(kube: Kube, plural: str, patch: kopf.Patch, body: kopf.Body, node: str, extra: dict[str, Any]) -> None:
    status = dict(body.get("status") or {})
    generation = int(body["metadata"].get("generation", 0))
    message = f"handed to the agent on node {node}"
    fields = phase_patch(status, Phase.SCHEDULED, Reason.SCHEDULED, message, generation)
    fields["conditions"] = set_condition(
        fields["conditions"], ConditionType.SCHEDULED, True, Reason.SCHEDULED, message, generation
    )
    # Status first, then the label: the agent's watch sees the object only once it carries the label,
    # and by then it is already Scheduled, so the agent can start at once.
    kube.patch_status(
        plural, body["metadata"]["namespace"], body["metadata"]["name"], {**fields, "nodeName": node, **extra}
    )
    patch.metadata.setdefault("labels", {})[NODE_LABEL] = node
    # kopf's finalizer rides on the label's patch. The handlers that need it (the pickup deadline,
    # the archives' deletion) match only labelled objects, so kopf does not add it in a patch and
    # a watch round-trip of its own before the first handler runs.
    finalizers = list(body["metadata"].get("finalizers") or [])
    if CONTROLLER_FINALIZER not in finalizers:
        patch.metadata["finalizers"] = [*finalizers, CONTROLLER_FINALIZER]
    kopf.event(body, type="Normal", reason=str(Reason.SCHEDULED), message=message)


# Handlers that hold kopf's finalizer match only objects with the node label: see _scheduled.
LABELLED = {NODE_LABEL: kopf.PRESENT}


def _still_scheduled(body: kopf.Body, **_: Any) -> bool:
    # A `when` filter, not field=/value=: those make kopf keep status.phase in its last-handled
    # annotation and so patch every object once more on each phase change.
    return bool((body.get("status") or {}).get("phase") == Phase.SCHEDULED)


def register(registry: kopf.OperatorRegistry, settings: Settings, kube: Kube) -> None:
    leases = scheduling.AgentLeases(kube, settings.namespace)

    @kopf.on.resume(GROUP, VERSION, CHECKPOINTS, registry=registry)
    @kopf.on.create(GROUP, VERSION, CHECKPOINTS, registry=registry)
    def schedule_checkpoint(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if (body.get("status") or {}).get("phase"):
            return  # already scheduled or finished
        ccp = ContainerCheckpoint.model_validate(dict(body))
        try:
            storage = scheduling.schedule_checkpoint(kube, leases, ccp)
        except Failure as e:
            _fail(patch, body, e)
            return
        _scheduled(
            kube, CHECKPOINTS, patch, body, ccp.spec.node_name, {"storageRef": {"name": storage}} if storage else {}
        )

    @kopf.on.resume(GROUP, VERSION, RESTORES, registry=registry)
    @kopf.on.create(GROUP, VERSION, RESTORES, registry=registry)
    def schedule_restore(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        if (body.get("status") or {}).get("phase"):
            return
        crst = ContainerRestore.model_validate(dict(body))
        try:
            scheduling.require_node_with_agent(kube, leases, crst.spec.node_name)
            archive = scheduling.resolve_restore_archive(kube, crst)
        except Failure as e:
            _fail(patch, body, e)
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
    def agent_pickup_deadline(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        """An object still Scheduled while its node's agent is silent would otherwise wait forever."""
        node = body["spec"]["nodeName"]
        if not leases.alive(node):
            _fail(
                patch,
                body,
                Failure(
                    Reason.AGENT_UNAVAILABLE,
                    f"the agent on node {node!r} stopped renewing its Lease before it picked this object up",
                ),
            )

    @kopf.on.delete(GROUP, VERSION, CHECKPOINTS, labels=LABELLED, registry=registry)
    def delete_archives(body: kopf.Body, **_: Any) -> None:
        ccp = ContainerCheckpoint.model_validate(dict(body))
        if ccp.status.storage_ref is None or not any(a.key for a in ccp.status.archives):
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
        client = s3.client(storage, kube.credentials(storage))
        deleted = s3.delete_prefix(client, storage.spec.bucket, archive_dir(storage.spec.prefix, ccp))
        kopf.event(body, type="Normal", reason="ArchivesDeleted", message=f"deleted {deleted} objects from the bucket")

    @kopf.timer(GROUP, VERSION, STORAGES, interval=settings.storage_validation_seconds, registry=registry)
    def validate_storage(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        storage = CheckpointStorage.model_validate(dict(body))
        status = storage_service.validate(kube, storage)
        if status["phase"] != storage.status.get("phase"):
            kopf.event(
                body,
                type="Normal" if status["phase"] == "Available" else "Warning",
                reason=status["phase"],
                message=status["message"],
            )
        patch.status.update(status)
