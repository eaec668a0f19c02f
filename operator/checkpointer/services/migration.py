"""ContainerMigration: one container moved to another node as a ContainerCheckpoint with export and
then a ContainerRestore on the target, both owned by the migration.

The controller drives it from watch events alone, the migration's and those of the objects it owns
(controller/__init__.py): every event reads where the children are and `step` decides, purely, what
the migration says and what it creates next. What a child refuses (a container of another namespace,
a storage the namespace may not use, a node without an agent) is the child's own rule: the migration
judges nothing a ContainerCheckpoint or ContainerRestore would not, and takes their reasons for its own.

A failure after the source container stopped ends with the container running again: a checkpoint
that fails after CRIU stopped it is restored in place by the source's agent (docs/failure-semantics.md);
a restore on the target that fails for good is followed by a restore back on the source node from
the same checkpoint.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client import ApiException

from checkpointer import GROUP, VERSION
from checkpointer.adapters.kube import CHECKPOINTS, MIGRATIONS, RESTORES, Kube, NodeState
from checkpointer.conditions import now, parse_time
from checkpointer.errors import Failure
from checkpointer.models import (
    CheckpointStatus,
    ContainerMigration,
    MigrationStatus,
    NameRef,
    ObjectStatus,
    Progress,
    RestoreStatus,
)
from checkpointer.reasons import FINISHED, Phase, Reason
from checkpointer.services.scheduling import AgentLeases, require_node_with_agent
from checkpointer.status import Conflict, EventType, StatusWriter, post_event

log = logging.getLogger(__name__)

KIND = "ContainerMigration"
# The restore back on the source node is named after the migration with this suffix.
FALLBACK_SUFFIX = "-back"
_NAME_MAX = 253
# Seconds between tries of a step the API server did not answer: about two minutes in all, as long as
# a status write waits for it (status.WRITE_PATIENCE_SECONDS).
RETRY_DELAYS = (1, 2, 5, 10, 20, 30, 50)


# --- pure decisions -----------------------------------------------------------------------------------


def restore_may_start(checkpoint_phase: str | None) -> bool:
    """Whether the migration creates its restore on the target now. Pure.

    As soon as the checkpoint exists and has not failed: the restore follows it, reading the archive's
    parts while the source's agent still writes them (docs/architecture.md, a restore behind its
    checkpoint), and nothing runs on the target before the checkpoint Succeeded and the whole archive
    is verified. A checkpoint a migration owns streams its parts for that.
    """
    return checkpoint_phase != Phase.FAILED


def falls_back(restore_reason: str) -> bool:
    """Whether a restore on the target that failed with this reason is followed by one on the source. Pure.

    Every failure but RestoreInterrupted ends before podman has made a container on the target (or
    with what it made removed): the container runs nowhere, and the archive restores it on the source.
    That holds for RestoreUndone too: the target's agent restarted while podman restored, found
    nothing of the restore running and removed what podman had made. RestoreInterrupted is the agent
    that could not tell (no record of what podman was asked): a second copy on the source could run
    beside one on the target, so the migration fails and says where to look.
    """
    return restore_reason != Reason.RESTORE_INTERRUPTED


def target_refusal(migration: ContainerMigration) -> Failure | None:
    """A given target that is the source node: the container would go nowhere. Pure."""
    spec = migration.spec
    if spec.target_node_name and spec.target_node_name == spec.source.node_name:
        return Failure(
            Reason.TARGET_IS_SOURCE,
            f"targetNodeName {spec.target_node_name!r} is the source node: a migration moves the container to "
            "another node; name another node, or leave targetNodeName out for the controller to choose one",
        )
    return None


def choose_target(source: str, nodes: list[NodeState], alive: Callable[[str], bool]) -> str | None:
    """The node a migration without targetNodeName goes to: Ready, not cordoned, not the source, with a
    live agent; the first by name of those, so that the same cluster gives the same answer. Pure but
    for `alive` (the agent Leases). None when there is none."""
    candidates = sorted(n.name for n in nodes if n.ready and not n.unschedulable and n.name != source)
    return next((n for n in candidates if alive(n)), None)


def no_target_message(source: str, nodes: list[NodeState]) -> str:
    others = [n for n in nodes if n.name != source]
    cordoned = sorted(n.name for n in others if n.unschedulable)
    not_ready = sorted(n.name for n in others if not n.ready)
    detail = []
    if cordoned:
        detail.append(f"cordoned: {', '.join(cordoned)}")
    if not_ready:
        detail.append(f"not Ready: {', '.join(not_ready)}")
    rest = f" ({'; '.join(detail)}; the others have no live agent)" if detail else " with a live agent"
    return (
        f"no node to move the container to: no Ready node other than {source}, not cordoned, with a live "
        f"checkpointer agent{rest if others else ''}; the container was not touched. Uncordon a node or set "
        "targetNodeName"
    )


def owner_reference(migration: Mapping[str, Any]) -> dict[str, Any]:
    meta = migration["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owner_of(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the ContainerMigration that controls the object; None for one no migration made. Pure."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("controller") and str(ref.get("apiVersion", "")).startswith(GROUP):
            return str(ref.get("name")), str(ref.get("uid"))
    return None


def owned_by(body: Mapping[str, Any] | None, migration_uid: str) -> bool:
    return body is not None and (owner_of(body) or ("", ""))[1] == migration_uid


def fallback_name(name: str) -> str:
    head = name[: _NAME_MAX - len(FALLBACK_SUFFIX)].rstrip("-.")
    return f"{head}{FALLBACK_SUFFIX}"


def checkpoint_body(migration: Mapping[str, Any]) -> dict[str, Any]:
    """The ContainerCheckpoint of a migration: its source container, exported, with its flags. Pure."""
    m = ContainerMigration.model_validate(migration)
    spec = m.spec
    export: dict[str, Any] = {"storageRef": {"name": spec.storage_ref.name}} if spec.storage_ref else {}
    body: dict[str, Any] = {"nodeName": spec.source.node_name, "containers": [spec.source.container]}
    body["export"] = export
    body["compress"] = str(spec.compress)
    if spec.tcp_established:
        body["tcpEstablished"] = True
    return _child("ContainerCheckpoint", m.metadata.name, migration, body)


def restore_body(migration: Mapping[str, Any], node: str, *, back: bool = False) -> dict[str, Any]:
    """The ContainerRestore of a migration's checkpoint on `node`; `back`: the one on the source node,
    under the container's own name (its stopped self, left by the checkpoint, is what it replaces). Pure."""
    m = ContainerMigration.model_validate(migration)
    spec = m.spec
    body: dict[str, Any] = {"nodeName": node, "source": {"checkpointRef": {"name": m.metadata.name}}}
    if spec.name and not back:
        body["name"] = spec.name
    if spec.tcp_established:
        body["tcpEstablished"] = True
    name = fallback_name(m.metadata.name) if back else m.metadata.name
    return _child("ContainerRestore", name, migration, body)


def _child(kind: str, name: str, migration: Mapping[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": migration["metadata"]["namespace"],
            "ownerReferences": [owner_reference(migration)],
        },
        "spec": spec,
    }


def _refusal(error: ApiException) -> str:
    """The API server's own sentence for a refused request (a CEL rule's message, a quota), else its status."""
    try:
        message = json.loads(error.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or f"{error.status} {error.reason}")


def _phase(body: Mapping[str, Any] | None) -> str:
    return str(ObjectStatus.of(body or {}).phase or "")


def _ready(body: Mapping[str, Any] | None) -> tuple[str, str]:
    found = ObjectStatus.of(body or {}).condition("Ready")
    return (found.reason, found.message) if found else ("", "")


def _reason(text: str, default: Reason) -> Reason:
    return Reason(text) if text in Reason.__members__.values() else default


def _progress(body: Mapping[str, Any] | None) -> Progress | None:
    progress = ObjectStatus.of(body or {}).progress
    return progress if progress is not None and (progress.bytes_done or progress.bytes_total) else None


def downtime(frozen: str | None, running: str | None) -> float | None:
    """Seconds from the container stopping on the source to running on the target. Pure."""
    start, end = parse_time(frozen), parse_time(running)
    if start is None or end is None:
        return None
    return round(max(0.0, (end - start).total_seconds()), 3)


@dataclass(frozen=True)
class Children:
    """The objects a migration made, as they are now; None for one not made, or gone."""

    checkpoint: Mapping[str, Any] | None = None
    restore: Mapping[str, Any] | None = None
    fallback: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Step:
    """What the migration says now, and what the controller creates for it next ("restore", "fallback")."""

    phase: Phase
    reason: Reason
    message: str
    create: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


def step(m: ContainerMigration, children: Children) -> Step | None:
    """Where a migration whose checkpoint was made stands, from its children. Pure.

    None for a finished migration: its word is final.
    """
    status = m.status
    if status.phase in FINISHED:
        return None
    source = status.source_node_name or m.spec.source.node_name
    target = status.target_node_name or m.spec.target_node_name or ""
    container = m.spec.source.container
    checkpoint = children.checkpoint
    name = status.checkpoint_ref.name if status.checkpoint_ref else m.metadata.name
    if checkpoint is None:
        return Step(
            Phase.FAILED,
            Reason.CANCELLED,
            f"its ContainerCheckpoint {name} was deleted; the agent on {source} gives the container back "
            "(restored in place) when it had stopped it",
        )
    ck_phase = _phase(checkpoint)
    fields: dict[str, Any] = {}
    if frozen := CheckpointStatus.of(checkpoint).frozen_time:
        fields["frozen_time"] = frozen
    if ck_phase == Phase.FAILED:
        reason, message = _ready(checkpoint)
        return Step(
            Phase.FAILED,
            _reason(reason, Reason.CHECKPOINT_FAILED),
            f"the checkpoint {name} of {container} on {source} failed ({reason}): {message}; nothing was "
            f"restored on {target}",
            fields=fields,
        )
    restore = children.restore
    if restore is None and status.restore_ref is not None:
        return Step(
            Phase.FAILED,
            Reason.CANCELLED,
            f"its ContainerRestore {status.restore_ref.name} was deleted before it ended; the archive stays "
            f"in the bucket: restore checkpoint {name} with a ContainerRestore",
            fields=fields,
        )
    create = "restore" if restore is None and restore_may_start(ck_phase) else ""
    # Until the checkpoint Succeeded, it says where the move is, whether or not a restore follows it.
    if ck_phase != Phase.SUCCEEDED and (restore is None or _phase(restore) not in FINISHED):
        if ck_phase in ("", Phase.PENDING, Phase.SCHEDULED):
            return Step(
                Phase.PENDING,
                Reason.SCHEDULED,
                f"checkpoint {name} waits for the agent on {source}",
                create,
                fields,
            )
        progress = _progress(checkpoint)
        if progress:
            fields["progress"] = progress
        if ck_phase == Phase.CHECKPOINTING:
            return Step(
                Phase.CHECKPOINTING, Reason.CHECKPOINTING, f"checkpointing {container} on {source}", create, fields
            )
        return Step(
            Phase.TRANSFERRING,
            Reason.TRANSFERRING,
            f"uploading the archive of {container} from {source}",
            create,
            fields,
        )
    if restore is None:
        return Step(
            Phase.TRANSFERRING,
            Reason.TRANSFERRING,
            f"checkpoint {name} is {ck_phase}; restoring {container} on {target}",
            create="restore",
            fields=fields,
        )
    return _restoring(m, children, restore, fields, source, target)


def _restoring(
    m: ContainerMigration,
    children: Children,
    restore: Mapping[str, Any],
    fields: dict[str, Any],
    source: str,
    target: str,
) -> Step:
    container = m.spec.source.container
    restore_name = str(restore["metadata"]["name"])
    phase = _phase(restore)
    if phase == Phase.SUCCEEDED:
        restored = RestoreStatus.of(restore)
        running = restored.running_time or restored.completion_time or now(precise=True)
        fields["running_time"] = running
        took = downtime(fields.get("frozen_time"), running)
        if took is not None:
            fields["downtime_seconds"] = took
        shown = f"; down {took:.2f}s" if took is not None else ""
        return Step(
            Phase.SUCCEEDED, Reason.SUCCEEDED, f"moved {container} from {source} to {target}{shown}", fields=fields
        )
    if phase != Phase.FAILED:
        progress = _progress(restore)
        if progress:
            fields["progress"] = progress
        if phase == Phase.RESTORING:
            return Step(Phase.RESTORING, Reason.RESTORING, f"podman restores {container} on {target}", fields=fields)
        return Step(
            Phase.TRANSFERRING,
            Reason.TRANSFERRING,
            f"the agent on {target} fetches the archive of {container} ({restore_name})",
            fields=fields,
        )
    reason, message = _ready(restore)
    failed = f"the restore {restore_name} on {target} failed ({reason}): {message}"
    if not falls_back(reason):
        return Step(
            Phase.FAILED,
            _reason(reason, Reason.RESTORE_FAILED),
            f"{failed}; podman may have restored {container} on {target} before the agent restarted: check "
            f"the node. The archive stays in the bucket (checkpoint {m.metadata.name})",
            fields=fields,
        )
    fallback = children.fallback
    made = m.status.fallback_restore_ref is not None
    back_phase = _phase(fallback)
    back_reason, back_message = _ready(fallback)
    if fallback is None and made:
        back_phase, back_reason, back_message = Phase.FAILED, "Cancelled", "it was deleted"
    if back_phase == Phase.SUCCEEDED:
        return Step(
            Phase.FAILED,
            Reason.RESTORED_ON_SOURCE,
            f"{failed}; {container} was restored on {source} from the same archive and runs there",
            fields=fields,
        )
    if back_phase == Phase.FAILED:
        return Step(
            Phase.FAILED,
            Reason.RETURN_FAILED,
            f"{failed}; the restore back on {source} failed too ({back_reason}): {back_message}. The archive "
            f"stays in the bucket: a ContainerRestore of checkpoint {m.metadata.name} restores it",
            fields=fields,
        )
    # Not made yet (made now), or on its way.
    instead = f"{failed}; restoring {container} on {source} instead"
    return Step(Phase.RESTORING, Reason.RESTORING, instead, "fallback" if fallback is None else "", fields)


def changed(status: MigrationStatus, found: Step) -> dict[str, Any]:
    """The status fields `found` changes, by field name, "phase" included when the phase, its reason
    or its message moves. Pure."""
    ready = status.condition("Ready")
    delta = {k: v for k, v in found.fields.items() if getattr(status, k) != v}
    if (status.phase, ready and ready.reason, ready and ready.message) != (
        str(found.phase),
        str(found.reason),
        found.message,
    ):
        delta["phase"] = str(found.phase)
    return delta


# --- acting on them ------------------------------------------------------------------------------------


class Migrations:
    """Advances migrations on the watch events of themselves and of what they own; one at a time each."""

    def __init__(self, kube: Kube, leases: AgentLeases) -> None:
        self.kube = kube
        self.leases = leases
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(uid, threading.Lock())

    def forget(self, uid: str) -> None:
        with self._guard:
            self._locks.pop(uid, None)

    def child_changed(self, body: Mapping[str, Any]) -> None:
        """A checkpoint or restore a migration owns changed (or is gone): its migration takes a step."""
        owner = owner_of(body)
        if owner is None:
            return
        name, uid = owner
        migration = self.kube.get(MIGRATIONS, str(body["metadata"]["namespace"]), name)
        if migration is None or migration["metadata"].get("uid") != uid:
            return  # gone: the garbage collector takes what it owned
        self.advance(migration)

    def advance(self, body: Mapping[str, Any]) -> None:
        """One step of the migration, from its state read now; asked again while the API server does
        not answer, for a watch event is not delivered twice (and the restore's last is the last)."""
        meta = body["metadata"]
        if meta.get("deletionTimestamp"):
            return
        with self._lock(str(meta["uid"])):
            for delay in (*RETRY_DELAYS, None):
                try:
                    fresh = self.kube.get(MIGRATIONS, meta["namespace"], meta["name"])
                    if fresh is None or fresh["metadata"].get("uid") != meta["uid"]:
                        return
                    self._advance(fresh)
                    return
                except Conflict as e:  # moved on meanwhile: the event of that change takes the next step
                    log.info("migration %s/%s: %s", meta["namespace"], meta["name"], e)
                    return
                except Exception as e:  # ApiException, or the connection itself
                    if delay is None:
                        raise
                    log.warning("migration %s/%s: trying again in %ss: %s", meta["namespace"], meta["name"], delay, e)
                    time.sleep(delay)

    def _advance(self, body: dict[str, Any]) -> None:
        m = ContainerMigration.model_validate(body)
        if m.status.phase in FINISHED:
            return
        if not m.status.phase:
            self._start(body, m)
            return
        children = self._children(m)
        found = step(m, children)
        if found is None:
            return
        if found.create:
            self._create_restore(body, m, found)
            return
        self._write(body, found)

    def _children(self, m: ContainerMigration) -> Children:
        namespace, uid = m.metadata.namespace, m.metadata.uid

        def own(plural: str, ref: Any) -> Mapping[str, Any] | None:
            found = self.kube.get(plural, namespace, ref.name) if ref is not None else None
            return found if owned_by(found, uid) else None

        status = m.status
        return Children(
            own(CHECKPOINTS, status.checkpoint_ref),
            own(RESTORES, status.restore_ref),
            own(RESTORES, status.fallback_restore_ref),
        )

    def _start(self, body: dict[str, Any], m: ContainerMigration) -> None:
        """Choose the target and create the checkpoint: the container stops only once a target is known."""
        status = StatusWriter(self.kube, MIGRATIONS, body)
        source = m.spec.source.node_name
        chosen = False
        try:
            refusal = target_refusal(m)
            if refusal is not None:
                raise refusal
            target = m.spec.target_node_name
            if target:
                require_node_with_agent(self.kube, self.leases, target)
            else:
                nodes = self.kube.node_states()
                target = choose_target(source, nodes, self.leases.alive)
                if target is None:
                    raise Failure(Reason.NO_TARGET_NODE, no_target_message(source, nodes))
                chosen = True
            made = self._create(body, checkpoint_body(body))
        except Failure as e:
            status.phase(Phase.FAILED, e.reason, e.message)
            self._event(m, e.reason, e.message, "Warning")
            return
        checkpoint = str(made["metadata"]["name"])
        message = f"checkpoint {checkpoint} of {m.spec.source.container} on {source} created; target {target}"
        status.phase(
            Phase.PENDING,
            Reason.SCHEDULED,
            message,
            patch=MigrationStatus(
                checkpoint_ref=NameRef(name=checkpoint),
                source_node_name=source,
                target_node_name=target,
                start_time=now(precise=True),
            ),
        )
        if chosen:
            self._event(m, Reason.TARGET_CHOSEN, f"chose node {target}: Ready, not cordoned, with a live agent")

    def _create_restore(self, body: dict[str, Any], m: ContainerMigration, found: Step) -> None:
        status = StatusWriter(self.kube, MIGRATIONS, body)
        back = found.create == "fallback"
        node = (m.status.source_node_name or m.spec.source.node_name) if back else (m.status.target_node_name or "")
        try:
            made = self._create(body, restore_body(body, node, back=back))
        except Failure as e:
            status.phase(Phase.FAILED, e.reason, e.message, patch=MigrationStatus(**found.fields))
            self._event(m, e.reason, e.message, "Warning")
            return
        ref = NameRef(name=str(made["metadata"]["name"]))
        made_ref = {"fallback_restore_ref" if back else "restore_ref": ref}
        status.phase(found.phase, found.reason, found.message, patch=MigrationStatus(**found.fields, **made_ref))
        if back:
            self._event(m, found.reason, found.message, "Warning")

    def _create(self, migration: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
        """Create a child; one of that name made before (by this migration, before a restart) is taken as it is."""
        plural = CHECKPOINTS if child["kind"] == "ContainerCheckpoint" else RESTORES
        namespace, name = child["metadata"]["namespace"], child["metadata"]["name"]
        try:
            made = self.kube.create(plural, namespace, child)
        except ApiException as e:
            # Refused by admission, a quota or RBAC: the migration cannot make it, whatever happens next.
            if e.status is not None and 400 <= e.status < 500 and e.status != 429:
                reason = Reason.CHECKPOINT_FAILED if plural == CHECKPOINTS else Reason.RESTORE_FAILED
                raise Failure(reason, f"the API server refused the {child['kind']} {name}: {_refusal(e)}") from None
            raise
        if made is not None:
            return made
        existing = self.kube.get(plural, namespace, name)
        if existing is None or not owned_by(existing, str(migration["metadata"]["uid"])):
            raise Failure(
                Reason.NAME_TAKEN,
                f"a {child['kind']} named {name} exists in namespace {namespace} and is not this migration's; "
                "delete it or give the migration another name; the container was not touched",
            )
        return existing

    def _write(self, body: dict[str, Any], found: Step) -> None:
        status = StatusWriter(self.kube, MIGRATIONS, body)
        delta = changed(MigrationStatus.of(body), found)
        if not delta:
            return
        if "phase" in delta:
            status.phase(found.phase, found.reason, found.message, patch=MigrationStatus(**found.fields))
            if found.phase == Phase.FAILED:
                m = ContainerMigration.model_validate(body)
                self._event(m, found.reason, found.message, "Warning")
        else:
            status.write(MigrationStatus(**delta), patient=False)

    def _event(self, m: ContainerMigration, reason: Reason, message: str, type_: EventType = "Normal") -> None:
        post_event(KIND, m.metadata, type_, str(reason), message)
