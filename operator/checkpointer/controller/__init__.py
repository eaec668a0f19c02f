"""The controller: checks what needs the cluster, schedules objects onto nodes, keeps storage status.

`register` lists its kopf handlers, which stay thin: parse, call a service, write status. The
long-running work has modules of its own: `signer` (the signing key and its retry loop), `expiry`
and `schedules` (the two clocks). One replica leads (`leadership`).
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kopf

from checkpointer import CONTROLLER_FINALIZER, GROUP, NODE_LABEL, VERSION, layout, metrics
from checkpointer.adapters.kube import CHECKPOINTS, MIGRATIONS, RESTORES, STORAGES, Kube
from checkpointer.archive.store import RateLimiter, StorageError, Stores, Transfer
from checkpointer.controller import schedules
from checkpointer.controller.expiry import Expiring, ExpiryClock
from checkpointer.controller.signer import Signer
from checkpointer.errors import Failure
from checkpointer.models import (
    CheckpointStatus,
    CheckpointStorage,
    ContainerCheckpoint,
    ContainerRestore,
    Metadata,
    NameRef,
    ObjectStatus,
    RestoreStatus,
)
from checkpointer.reasons import FINISHED, Phase, Reason
from checkpointer.services import scheduling, signing, validation
from checkpointer.services.migration import Migrations, owner_of
from checkpointer.services.schedule_rules import SCHEDULED_TIME_ANNOTATION, start_delay
from checkpointer.settings import Settings
from checkpointer.status import Conflict, EventType, StatusWriter, post_event

log = logging.getLogger(__name__)
T = TypeVar("T")


def _fail(kube: Kube, plural: str, body: kopf.Body, error: Failure) -> None:
    try:
        StatusWriter(kube, plural, dict(body)).phase(Phase.FAILED, error.reason, error.message, scheduled=False)
    except Conflict as e:  # the agent moved it on first: its word stands
        log.info("not failing %s: %s", body["metadata"]["name"], e)
        return
    post_event(body["kind"], Metadata.model_validate(body["metadata"]), "Warning", error.reason, error.message)


def _scheduled(kube: Kube, plural: str, patch: kopf.Patch, body: kopf.Body, node: str, fields: ObjectStatus) -> str:
    """Writes Scheduled and labels the object; returns the resourceVersion of the Scheduled status."""
    message = f"handed to the agent on node {node}"
    annotations = body["metadata"].get("annotations") or {}
    if start_delay(annotations, datetime.datetime.now(datetime.UTC)) > 0:
        message += f"; it starts at its scheduled time, {annotations[SCHEDULED_TIME_ANNOTATION]}"
    # Status first, then the label: the agent's watch sees the object only once it carries the label,
    # and by then it is already Scheduled, so the agent can start at once. A controller that dies in
    # between leaves a Scheduled object without its label; the next one labels it (see _label).
    status = StatusWriter(kube, plural, dict(body))
    status.phase(Phase.SCHEDULED, Reason.SCHEDULED, message, scheduled=True, patch=fields)
    _label(plural, patch, body, node)
    post_event(body["kind"], Metadata.model_validate(body["metadata"]), "Normal", Reason.SCHEDULED, message)
    return status.resource_version


def _label(plural: str, patch: kopf.Patch, body: kopf.Body, node: str) -> None:
    patch.metadata.setdefault("labels", {})[NODE_LABEL] = node
    # kopf's finalizer rides on the label's patch. The handler that needs it (the archives'
    # deletion) matches only labelled checkpoints, so kopf does not add it in a patch and a watch
    # round-trip of its own before the first handler runs. Restores need none.
    finalizers = list(body["metadata"].get("finalizers") or [])
    if plural == CHECKPOINTS and CONTROLLER_FINALIZER not in finalizers:
        patch.metadata["finalizers"] = [*finalizers, CONTROLLER_FINALIZER]


def _needs_scheduling(plural: str, patch: kopf.Patch, body: kopf.Body) -> bool:
    """False for an object scheduled before; one left Scheduled without its label gets it now."""
    status = ObjectStatus.of(body)
    if not status.phase:
        return True
    if status.phase == Phase.SCHEDULED and NODE_LABEL not in (body["metadata"].get("labels") or {}):
        log.info(
            "%s %s/%s is Scheduled without its node label: labelling it",
            plural,
            body["metadata"]["namespace"],
            body["metadata"]["name"],
        )
        _label(plural, patch, body, status.node_name or str(body["spec"].get("nodeName") or ""))
    return False


def label_to_restore(body: Mapping[str, Any]) -> str | None:
    """The node label to put back on an object the controller scheduled; None while it is right. Pure.

    The controller's word is status.nodeName, which tenants cannot write; the label is what the
    agents' watches select on, and whoever may edit the object may change it. Finished objects too:
    an agent's sweep finds its work folders' objects by the label.
    """
    node = ObjectStatus.of(body).node_name
    labels = (body.get("metadata") or {}).get("labels") or {}
    return None if not node or labels.get(NODE_LABEL) == node else node


def _relabelled(body: kopf.Body, **_: Any) -> bool:
    return label_to_restore(body) is not None


# How often the controller looks for objects whose node's agent went away before picking them up.
PICKUP_LOOK_SECONDS = 5.0
# How often the nodes and storages that metrics may name are read again, to drop the series of the gone.
METRIC_LABELS_SECONDS = 60.0
# Handlers that hold kopf's finalizer match only objects with the node label: see _scheduled.
LABELLED = {NODE_LABEL: kopf.PRESENT}


def recorded_keys(prefix: str, ccp: ContainerCheckpoint) -> tuple[set[str], set[str]]:
    """What deleting a checkpoint removes from the bucket: (objects, keys of open uploads). Pure.

    Only what it wrote: the archives its status records, the manifest it wrote when it succeeded,
    CRIU's logs it kept when it failed with `keep`. The folder is the checkpoint's own
    (`<export.key or name>-<uid first 8>`, layout.archive_dir), and still no whole folder is listed
    and deleted: never an object at a key it did not write.
    """
    directory = layout.archive_dir(prefix, ccp)
    archived = [a for a in ccp.status.archives if a.key]
    objects = {a.key for a in archived if a.key}
    if ccp.status.phase == Phase.SUCCEEDED or ccp.status.manifest_sha256:  # the agent wrote it for signing
        objects.add(f"{directory}/{layout.MANIFEST}")
    archived_names = {a.container for a in archived}
    if ccp.status.phase == Phase.FAILED and ccp.spec.keep:
        objects |= {layout.log_key(directory, c) for c in set(ccp.spec.containers) - archived_names}
    # The agent uploads to these keys; those of containers `all` or `latest` chose its sweep aborts.
    named = archived_names | set(ccp.spec.containers) | set(ccp.spec.pod_ref.containers if ccp.spec.pod_ref else ())
    uploads = objects | {
        layout.archive_key(directory, c, ccp.spec.compress, encrypted) for c in named for encrypted in (False, True)
    }
    return objects, uploads


def _signing_requested(body: kopf.Body, **_: Any) -> bool:
    return signing.signing_requested(CheckpointStatus.of(body))


def _finished_or_deleted(body: kopf.Body, type: str | None, **_: Any) -> bool:
    return type == "DELETED" or ObjectStatus.of(body).phase in FINISHED


def _plural(body: kopf.Body) -> str:
    return {"ContainerCheckpoint": CHECKPOINTS, "ContainerMigration": MIGRATIONS}.get(str(body["kind"]), RESTORES)


def _owned_by_migration(body: kopf.Body, **_: Any) -> bool:
    return owner_of(body) is not None


def _migration_open(body: kopf.Body, type: str | None, **_: Any) -> bool:
    return type == "DELETED" or (body.get("status") or {}).get("phase") not in FINISHED


def _register_expiry(
    registry: kopf.OperatorRegistry, settings: Settings, kube: Kube, in_flight: metrics.InFlight
) -> None:
    """TTLs: one clock deletes finished objects once their expiration has passed (expiry.py)."""

    def announce(obj: Expiring, message: str) -> None:
        post_event(
            obj.kind, Metadata(name=obj.name, namespace=obj.namespace, uid=obj.uid), "Normal", "Expired", message
        )

    clock = ExpiryClock(kube, settings.default_ttl, announce)
    stop = threading.Event()

    # On the watch event itself: no handler state and no write but a missing expiration.
    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, when=_finished_or_deleted, registry=registry)
    @kopf.on.event(GROUP, VERSION, RESTORES, when=_finished_or_deleted, registry=registry)
    @kopf.on.event(GROUP, VERSION, MIGRATIONS, when=_finished_or_deleted, registry=registry)
    def expire_finished(body: kopf.Body, type: str | None, **_: Any) -> None:
        if body["kind"] != "ContainerMigration":
            in_flight.seen(_plural(body), body, deleted=type == "DELETED")
        if type == "DELETED":
            clock.forget(str(body["metadata"]["uid"]))
        else:
            clock.observe(_plural(body), dict(body))

    @kopf.on.startup(registry=registry)
    def start_expiry_clock(**_: Any) -> None:
        threading.Thread(target=clock.run, args=(stop,), name="expiry", daemon=True).start()

    @kopf.on.cleanup(registry=registry)
    def stop_expiry_clock(**_: Any) -> None:
        stop.set()
        clock.wake()


def _register_metrics(settings: Settings, kube: Kube) -> metrics.InFlight:
    """What only the leading controller knows: objects in flight, live agents (docs/metrics.md).

    Objects in flight are counted by the handlers that see them anyway (scheduling, and the expiry's
    look at finished and deleted ones): a handler on every watch event of its own would cost the
    controller more than all of its metrics together.
    """
    in_flight = metrics.InFlight()
    if not metrics.enabled():
        return in_flight

    def agents() -> tuple[list[str], set[str]]:
        ages = kube.lease_ages(settings.namespace)
        nodes = kube.node_names()
        return nodes, {n for n in nodes if scheduling.lease_alive(ages.get(scheduling.lease_name(n)))}

    def existing() -> metrics.Existing:
        # A node is one with an agent Lease, whatever a tenant wrote in spec.nodeName.
        prefix = scheduling.lease_name("")
        leases = kube.lease_ages(settings.namespace)
        nodes = frozenset(n.removeprefix(prefix) for n in leases if n.startswith(prefix))
        namespaces = kube.namespace_names()
        return metrics.Existing(
            nodes,
            frozenset(s.metadata.name for s in kube.storages()),
            None if namespaces is None else frozenset(namespaces),
        )

    metrics.bound(existing)
    metrics.register(in_flight)
    metrics.register(metrics.AgentsUp(agents))
    return in_flight


def _every(registry: kopf.OperatorRegistry, name: str, seconds: float, action: Callable[[], None]) -> None:
    """Run `action` every `seconds` in a thread of its own, from the operator's start to its cleanup."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            try:
                action()
            except Exception:  # the next round tries again; the thread must not die of one
                log.exception("%s failed; trying again in %.0fs", name, seconds)

    def start(**_: Any) -> None:
        threading.Thread(target=loop, name=name, daemon=True).start()

    def end(**_: Any) -> None:
        stop.set()

    kopf.on.startup(registry=registry, id=f"start {name}")(start)
    kopf.on.cleanup(registry=registry, id=f"stop {name}")(end)


def _register_pickup_deadline(
    registry: kopf.OperatorRegistry,
    settings: Settings,
    kube: Kube,
    leases: scheduling.AgentLeases,
    in_flight: metrics.InFlight,
) -> None:
    """An object still Scheduled while its node's agent is silent would otherwise wait forever.

    One loop for all objects, and it reads only those of nodes whose agent Lease has lapsed. A kopf
    timer per Scheduled object would hold a task for each of the thousand checkpoints schedules
    create ahead of their time, and cost the controller tens of MiB.
    """
    timeout = settings.agent_pickup_timeout_seconds

    def fail_overdue(node: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        for plural in (CHECKPOINTS, RESTORES):
            for body in kube.list_all(plural, f"{NODE_LABEL}={node}"):
                if not scheduling.pickup_overdue(body, now, timeout):
                    continue
                meta = body["metadata"]
                message = f"the agent on node {node!r} stopped renewing its Lease before it picked this object up"
                try:
                    StatusWriter(kube, plural, body).phase(
                        Phase.FAILED, Reason.AGENT_UNAVAILABLE, message, scheduled=False
                    )
                except Conflict as e:  # the agent moved it on after all: its word stands
                    log.info("not failing %s/%s: %s", meta["namespace"], meta["name"], e)
                    continue
                kind = "ContainerCheckpoint" if plural == CHECKPOINTS else "ContainerRestore"
                post_event(kind, Metadata.model_validate(meta), "Warning", Reason.AGENT_UNAVAILABLE, message)

    def look() -> None:
        for node in sorted(in_flight.nodes()):
            try:
                if not leases.alive(node):
                    fail_overdue(node)
            except Exception as e:  # ApiException or the connection itself: the next look tries again
                log.warning("could not look for objects the agent on %s never picked up: %s", node, e)

    _every(registry, "pickup-deadline", PICKUP_LOOK_SECONDS, look)


class _Labelling:
    """The Scheduled status writes whose node label is still to come, in the handler's own patch, by uid."""

    LIMIT = 10_000

    def __init__(self) -> None:
        self._versions: dict[str, str] = {}
        self._lock = threading.Lock()

    def expect(self, body: kopf.Body, resource_version: str) -> None:
        with self._lock:
            self._versions[str(body["metadata"]["uid"])] = resource_version
            if len(self._versions) > self.LIMIT:  # one whose status event never came (a watch restarted)
                self._versions.pop(next(iter(self._versions)))

    def coming(self, body: kopf.Body) -> bool:
        """True for the status event of the controller's own Scheduled write: its label follows."""
        meta = body["metadata"]
        with self._lock:
            expected = self._versions.pop(str(meta["uid"]), None)
        return expected is not None and expected == meta.get("resourceVersion")


def _register_node_labels(registry: kopf.OperatorRegistry, kube: Kube) -> _Labelling:
    """An object's node label, once scheduled, stays the node the controller chose (docs/security.md).

    Only on the watch events whose label differs from status.nodeName: no handler state, no timer, and
    no write for any other event.
    """
    labelling = _Labelling()

    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, when=_relabelled, registry=registry)
    @kopf.on.event(GROUP, VERSION, RESTORES, when=_relabelled, registry=registry)
    def restore_node_label(body: kopf.Body, type: str | None, **_: Any) -> None:
        node = label_to_restore(body)
        meta = body["metadata"]
        if (
            type == "DELETED"
            or node is None
            or (NODE_LABEL not in (meta.get("labels") or {}) and labelling.coming(body))
        ):
            return
        was = (meta.get("labels") or {}).get(NODE_LABEL)
        labels = {NODE_LABEL: node}
        if not kube.label(_plural(body), meta["namespace"], meta["name"], str(meta["resourceVersion"]), labels):
            return  # gone or changed since this event: the event of that change is judged in turn
        message = (
            f"its label {NODE_LABEL} was changed to {was or '(none)'}; put back to {node}, the node it was "
            "scheduled on: only the controller moves an object between nodes"
        )
        log.warning("%s %s/%s: %s", body["kind"], meta["namespace"], meta["name"], message)
        post_event(body["kind"], Metadata.model_validate(meta), "Warning", Reason.NODE_LABEL_RESTORED, message)

    return labelling


def agent_may_be_at_work(status: CheckpointStatus) -> bool:
    """Whether the node's agent may still be at work on a checkpoint that is being deleted. Pure.

    Scheduled: the agent has not begun (its first write moves it on), and never will: kopf runs no
    handler of the agent's for an object that is being deleted when it first sees it. Should it be
    taking it up right now, its first write finds the object deleting or gone, before podman.
    Handed over for signing: it waits for the controller only.
    """
    phase = status.phase
    if not phase or phase == Phase.SCHEDULED or Phase(phase).finished:
        return False
    return not signing.signing_requested(status)


class _ArchiveDeletion:
    """A deleted checkpoint's archives leave the bucket with it, once its agent is done with them."""

    def __init__(self, kube: Kube, stores: Stores, leases: scheduling.AgentLeases) -> None:
        self.kube = kube
        self.stores = stores
        self.leases = leases

    def delete(self, body: kopf.Body) -> int | None:
        """Deletes what the checkpoint stored (recorded_keys); returns how many objects, None for no deletion.

        Raises kopf.TemporaryError while its agent may still be at work, or while the bucket does not answer.
        """
        ccp = ContainerCheckpoint.model_validate(dict(body))
        if agent_may_be_at_work(ccp.status) and self.leases.alive(ccp.node_name):
            # The agent sees the deletion in the answer to its next status write, gives the container
            # back and ends the object; podman may still be running. Only then is the bucket cleaned.
            raise kopf.TemporaryError(
                f"waiting for the agent on {ccp.node_name} to stop this {ccp.status.phase} checkpoint", delay=2
            )
        if ccp.status.storage_ref is None or not ccp.spec.export:
            return None
        storage = self.kube.storage(ccp.status.storage_ref.name)
        if storage is None:
            log.warning(
                "storage %s is gone; archives of %s/%s stay where they are",
                ccp.status.storage_ref.name,
                ccp.metadata.namespace,
                ccp.metadata.name,
            )
            return None
        if storage.spec.deletion_policy == "Retain":
            return None
        objects, uploads = recorded_keys(storage.spec.prefix, ccp)
        try:
            store = self.stores.of(storage)
            # Nothing of it stored: an upload a killed agent left open is all there can be. Every
            # upload at these keys is aborted, whoever opened it: they are this checkpoint's own,
            # for its folder holds its uid (layout.archive_dir), and its agent is done with them.
            for key in sorted(uploads - objects):
                store.abort_uploads(key)
            for key in sorted(uploads):
                store.delete_parts(key)  # a streamed archive's parts (layout.part_key) a killed agent left
            if not objects:
                return None
            return store.delete_keys(objects)
        except StorageError as e:
            raise kopf.TemporaryError(f"the archives could not be deleted yet: {e}", delay=10) from None


class _StorageStatus:
    """Each CheckpointStorage's status, as its bucket answers."""

    def __init__(self, kube: Kube, stores: Stores) -> None:
        self.kube = kube
        self.stores = stores

    def revalidate(self, storage: CheckpointStorage, others: list[CheckpointStorage] | None = None) -> bool:
        """Ask the bucket now and write what it says; returns whether it is Available. `others`: every
        storage, whose prefixes this one's may not nest with (read now when not given)."""
        status = validation.validate(self.stores, storage, self.kube.storages() if others is None else others)
        available = status.phase == Reason.AVAILABLE
        if status.phase != storage.status.phase:
            log.info("CheckpointStorage %s is %s: %s", storage.metadata.name, status.phase, status.message)
            type_: EventType = "Normal" if available else "Warning"
            post_event("CheckpointStorage", storage.metadata, type_, str(status.phase), str(status.message))
        try:
            # Not patient: the caller may be a handler scheduling an object, and the timer tries again.
            StatusWriter(self.kube, STORAGES, storage.model_dump(by_alias=True)).write(status, patient=False)
        except Conflict:  # deleted meanwhile
            return False
        metrics.storage_available(storage.metadata.name, available)
        return available

    def with_fresh_storage(self, schedule: Callable[[], T]) -> T:
        """`schedule()`, asked once more when it failed on a storage whose status may be stale: the
        timer's last look may predate the end of an outage by up to an interval."""
        try:
            return schedule()
        except Failure as e:
            if e.reason != Reason.STORAGE_UNAVAILABLE:
                raise
            every = self.kube.storages()
            if not any([self.revalidate(s, every) for s in every if not s.available]):
                raise
        return schedule()


def register(registry: kopf.OperatorRegistry, settings: Settings, kube: Kube) -> None:
    scheduling.allowed_host_ports(settings.publish_host_ports)  # a mistyped setting stops the start here
    in_flight = _register_metrics(settings, kube)
    _register_expiry(registry, settings, kube, in_flight)
    leases = scheduling.AgentLeases(kube, settings.namespace)
    unlimited = RateLimiter(0)
    stores = Stores(kube, Transfer(settings.part_size, settings.upload_concurrency, unlimited, unlimited))
    storages = _StorageStatus(kube, stores)
    signer = Signer(kube, settings, stores)
    archives = _ArchiveDeletion(kube, stores, leases)

    labelling = _register_node_labels(registry, kube)

    @kopf.on.resume(GROUP, VERSION, CHECKPOINTS, registry=registry)
    @kopf.on.create(GROUP, VERSION, CHECKPOINTS, registry=registry)
    def schedule_checkpoint(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        in_flight.seen(CHECKPOINTS, body, deleted=False)
        if not _needs_scheduling(CHECKPOINTS, patch, body):
            return
        ccp = ContainerCheckpoint.model_validate(dict(body))
        try:
            node, storage = storages.with_fresh_storage(
                lambda: scheduling.schedule_checkpoint(kube, leases, ccp, settings.admins)
            )
        except Failure as e:
            _fail(kube, CHECKPOINTS, body, e)
            return
        fields = CheckpointStatus(node_name=node)
        if storage:
            fields = fields.model_copy(update={"storage_ref": NameRef(name=storage)})
        labelling.expect(body, _scheduled(kube, CHECKPOINTS, patch, body, node, fields))
        metrics.has_agent(node)

    @kopf.on.resume(GROUP, VERSION, RESTORES, registry=registry)
    @kopf.on.create(GROUP, VERSION, RESTORES, registry=registry)
    def schedule_restore(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        in_flight.seen(RESTORES, body, deleted=False)
        if not _needs_scheduling(RESTORES, patch, body):
            return
        crst = ContainerRestore.model_validate(dict(body))
        try:
            scheduling.require_publish_permitted(crst, settings)
            scheduling.require_node_with_agent(kube, leases, crst.spec.node_name)
            archive = storages.with_fresh_storage(
                lambda: scheduling.resolve_restore_archive(kube, crst, settings.admins)
            )
        except Failure as e:
            _fail(kube, RESTORES, body, e)
            return
        fields = RestoreStatus(node_name=crst.spec.node_name, archive=archive)
        labelling.expect(body, _scheduled(kube, RESTORES, patch, body, crst.spec.node_name, fields))
        metrics.has_agent(crst.spec.node_name)

    _register_pickup_deadline(registry, settings, kube, leases, in_flight)
    if metrics.enabled():
        _every(registry, "metric-labels", METRIC_LABELS_SECONDS, metrics.refresh)

    @kopf.on.startup(registry=registry)
    def load_signing_key(**_: Any) -> None:
        # Before any watch starts: every checkpoint handed over for signing finds the key.
        signer.load_key()

    # On the watch event itself, in the first listing after a (re)start too: no handler state, no
    # extra write. The signer's retry loop tries again while the bucket does not answer.
    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, labels=LABELLED, when=_signing_requested, registry=registry)
    def sign_manifest(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type != "DELETED":
            signer.handed_over(body)

    _every(registry, "sign-again", Signer.RETRY_SECONDS, signer.sign_again)

    @kopf.on.delete(GROUP, VERSION, CHECKPOINTS, labels=LABELLED, registry=registry)
    def delete_archives(body: kopf.Body, **_: Any) -> None:
        deleted = archives.delete(body)
        if deleted is not None:
            message = f"deleted {deleted} objects from the bucket"
            post_event(body["kind"], Metadata.model_validate(body["metadata"]), "Normal", "ArchivesDeleted", message)

    @kopf.timer(GROUP, VERSION, STORAGES, interval=settings.storage_validation_seconds, registry=registry)
    def validate_storage(body: kopf.Body, **_: Any) -> None:
        storages.revalidate(CheckpointStorage.model_validate(dict(body)))

    @kopf.on.event(GROUP, VERSION, STORAGES, registry=registry)
    async def forget_storage(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type == "DELETED":
            metrics.storage_gone(str(body["metadata"]["name"]))

    _register_migrations(registry, kube, leases)
    schedules.register(registry, settings, kube)


def _register_migrations(registry: kopf.OperatorRegistry, kube: Kube, leases: scheduling.AgentLeases) -> None:
    """ContainerMigrations, driven by the watch events of themselves and of the objects they own: no
    timer, no polling (services/migration.py decides each step)."""
    migrations = Migrations(kube, leases)

    @kopf.on.event(GROUP, VERSION, MIGRATIONS, when=_migration_open, registry=registry)
    def migration_changed(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type == "DELETED":
            migrations.forget(str(body["metadata"]["uid"]))
        else:
            migrations.advance(body)

    # Their deletion too: a child deleted under a migration ends it.
    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, when=_owned_by_migration, registry=registry)
    @kopf.on.event(GROUP, VERSION, RESTORES, when=_owned_by_migration, registry=registry)
    def migration_child_changed(body: kopf.Body, **_: Any) -> None:
        migrations.child_changed(body)
