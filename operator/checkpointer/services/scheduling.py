"""The controller's checks before an object is handed to a node's agent."""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from typing import Any

from checkpointer.adapters.kube import CHECKPOINTS, Kube
from checkpointer.conditions import parse_time
from checkpointer.errors import Failure
from checkpointer.layout import compression_of, resolve_archive_key
from checkpointer.models import (
    CheckpointStorage,
    ContainerCheckpoint,
    ContainerRestore,
    NameRef,
    ObjectStatus,
    ResolvedArchive,
)
from checkpointer.reasons import ConditionType, Phase, Reason
from checkpointer.services.capabilities import (
    NodeFacts,
    live_export_refusal,
    missing_for_checkpoint,
    missing_for_pod_checkpoint,
)
from checkpointer.services.pods import pod_node
from checkpointer.settings import Settings


def lease_name(node: str) -> str:
    return f"checkpointer-agent-{node}"


def lease_alive(age_and_duration: tuple[float, int] | None) -> bool:
    if age_and_duration is None:
        return False
    age, duration = age_and_duration
    return age <= duration


class AgentLeases:
    """The agents' Leases as last read, so that scheduling an object seldom needs a read of its own.

    A Lease read as alive stays alive until its duration has run out from its renewal time: a
    fresh read could only show a later renewal. Only a Lease that may have expired is read again.
    """

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace
        self._expiry: dict[str, float] = {}  # node -> monotonic time its Lease runs out

    def alive(self, node: str) -> bool:
        if time.monotonic() < self._expiry.get(node, 0.0):
            return True
        lease = self.kube.lease_age(self.namespace, lease_name(node))
        if lease is None or not lease_alive(lease):
            self._expiry.pop(node, None)
            return False
        age, duration = lease
        self._expiry[node] = time.monotonic() + duration - age
        return True


def pickup_overdue(body: Mapping[str, Any], now: datetime.datetime, timeout_seconds: float) -> bool:
    """Still Scheduled, and handed to its node's agent more than `timeout_seconds` ago. Pure."""
    status = ObjectStatus.of(body)
    if status.phase != Phase.SCHEDULED:
        return False
    scheduled = status.condition(ConditionType.SCHEDULED)
    since = parse_time(scheduled.last_transition_time if scheduled else None)
    since = since or parse_time(body["metadata"].get("creationTimestamp"))
    return since is not None and (now - since).total_seconds() > timeout_seconds


def require_node_with_agent(kube: Kube, leases: AgentLeases, node: str) -> None:
    # A live Lease is renewed by the agent running on that node; only without one does the node
    # need a lookup of its own, to tell a missing node from a missing agent.
    if leases.alive(node):
        return
    if not kube.node_exists(node):
        raise Failure(Reason.NODE_NOT_FOUND, f"node {node!r} does not exist")
    raise Failure(
        Reason.AGENT_UNAVAILABLE,
        f"no live checkpointer agent on node {node!r} (Lease {leases.namespace}/"
        f"{lease_name(node)} missing or expired); is the agent DaemonSet running there?",
    )


def require_criu_features(kube: Kube, leases: AgentLeases, ccp: ContainerCheckpoint, node: str) -> None:
    """Refuse a checkpoint the node's CRIU cannot take, as its agent recorded on its Lease."""
    spec = ccp.spec
    if not (spec.tcp_established or spec.pre_checkpoint or spec.with_previous):
        return
    # Read afresh: a restarted agent may have recorded other facts since the Lease was last read.
    facts = NodeFacts.from_annotations(kube.lease_annotations(leases.namespace, lease_name(node)))
    why = missing_for_checkpoint(spec, node, facts)
    if why is not None:
        raise Failure(Reason.CRIU_FEATURE_MISSING, why)


def require_safe_live_export(
    kube: Kube, leases: AgentLeases, ccp: ContainerCheckpoint, admins: frozenset[str], node: str
) -> None:
    """Refuse a live export the node's podman cannot make without following the container's symlinks."""
    spec = ccp.spec
    admin = ccp.metadata.namespace in admins
    if live_export_refusal(spec, node, "", admin=admin) is None:
        return  # not a live export, or an admin's: no need to read the Lease
    facts = NodeFacts.from_annotations(kube.lease_annotations(leases.namespace, lease_name(node)))
    if facts is None or not facts.podman:
        return  # not recorded (yet): the agent asks its own podman before calling it
    why = live_export_refusal(spec, node, facts.podman, admin=admin)
    if why is not None:
        raise Failure(Reason.LIVE_EXPORT_NOT_PERMITTED, why)


def require_pod_runtime(kube: Kube, leases: AgentLeases, node: str) -> None:
    """Refuse a Pod's checkpoint on a node whose container runtime cannot checkpoint, as its agent
    recorded on its Lease; a node that recorded nothing (yet) is not refused: its agent's call says why."""
    facts = NodeFacts.from_annotations(kube.lease_annotations(leases.namespace, lease_name(node)))
    why = missing_for_pod_checkpoint(facts, node)
    if why is not None:
        raise Failure(Reason.RUNTIME_CANNOT_CHECKPOINT, why)


def storage_permits(storage: CheckpointStorage, namespace: str) -> bool:
    """Whether objects of `namespace` may use the storage: listed in allowedNamespaces, or no list. Pure."""
    allowed = storage.spec.allowed_namespaces
    return allowed is None or namespace in allowed


def choose_storage(ref: NameRef | None, storages: list[CheckpointStorage], *, namespace: str) -> CheckpointStorage:
    """The named storage, else the single one marked default, when `namespace` may use it. Pure, for unit tests."""
    if ref is not None:
        found = [s for s in storages if s.metadata.name == ref.name]
        if not found:
            raise Failure(Reason.STORAGE_NOT_FOUND, f"CheckpointStorage {ref.name!r} does not exist")
        storage = found[0]
    else:
        # One being deleted is on its way out: it no longer counts as the default.
        defaults = [s for s in storages if s.spec.default and not s.metadata.deletion_timestamp]
        if len(defaults) != 1:
            what = "none is" if not defaults else f"{len(defaults)} are"
            raise Failure(
                Reason.STORAGE_NOT_FOUND,
                f"no storage named and {what} marked default; set export.storageRef.name or mark "
                "exactly one CheckpointStorage with default: true",
            )
        storage = defaults[0]
    if not storage_permits(storage, namespace):
        raise Failure(
            Reason.STORAGE_NOT_PERMITTED,
            f"CheckpointStorage {storage.metadata.name!r} does not list namespace {namespace} in its "
            "allowedNamespaces; name another storage or ask its administrator to add the namespace",
        )
    if not storage.available:
        message = storage.status.message or "not validated yet"
        raise Failure(
            Reason.STORAGE_UNAVAILABLE,
            f"CheckpointStorage {storage.metadata.name!r} is not Available: {message}",
        )
    return storage


def schedule_checkpoint(
    kube: Kube, leases: AgentLeases, ccp: ContainerCheckpoint, admins: frozenset[str]
) -> tuple[str, str | None]:
    """Check what needs the cluster; return the node whose agent checkpoints and the storage name the
    agent should use (None: no export). A Pod's checkpoint goes to the Pod's node."""
    spec = ccp.spec
    if spec.pod_ref is not None:
        namespace = ccp.metadata.namespace
        node = pod_node(spec, namespace, kube.pod(namespace, spec.pod_ref.name))
        require_node_with_agent(kube, leases, node)
        require_pod_runtime(kube, leases, node)
    else:
        node = spec.node_name or ""
        require_node_with_agent(kube, leases, node)
        require_criu_features(kube, leases, ccp, node)
        require_safe_live_export(kube, leases, ccp, admins, node)
        require_previous(kube, ccp)
    if spec.export is None:
        return node, None
    storage = choose_storage(spec.export.storage_ref, kube.storages(), namespace=ccp.metadata.namespace)
    return node, storage.metadata.name


def require_previous(kube: Kube, ccp: ContainerCheckpoint) -> None:
    """withPrevious builds on a checkpoint that succeeded: one of the checkpoint's own namespace, so that
    the name never reaches another namespace's objects."""
    ref = ccp.spec.previous_checkpoint_ref
    if not ccp.spec.with_previous or ref is None:
        return
    previous = kube.get(CHECKPOINTS, ccp.metadata.namespace, ref.name)
    if previous is None or ObjectStatus.of(previous).phase != Phase.SUCCEEDED:
        raise Failure(
            Reason.PREVIOUS_CHECKPOINT_NOT_READY,
            f"previousCheckpointRef {ref.name!r} does not exist or has not succeeded",
        )


# The phases of a checkpoint that may still succeed.
RUNNING = (None, "", Phase.PENDING, Phase.SCHEDULED, Phase.CHECKPOINTING, Phase.UPLOADING)


def resolve_restore_archive(kube: Kube, crst: ContainerRestore, admins: frozenset[str]) -> ResolvedArchive:
    source = crst.spec.source
    namespace = crst.metadata.namespace
    if source.archive is not None:
        storage = choose_storage(source.archive.storage_ref, kube.storages(), namespace=namespace)
        key = resolve_archive_key(storage.spec.prefix, namespace, source.archive, admins)
        return ResolvedArchive(
            storage_ref=NameRef(name=storage.metadata.name),
            key=key,
            sha256=source.archive.sha256,
            compression=compression_of(key),
        )
    assert source.checkpoint_ref is not None  # the CRD admits exactly one source
    ref = source.checkpoint_ref
    obj = kube.get(CHECKPOINTS, namespace, ref.name)
    if obj is None:
        raise Failure(Reason.CHECKPOINT_NOT_FOUND, f"ContainerCheckpoint {ref.name!r} does not exist")
    ccp = ContainerCheckpoint.model_validate(obj)
    if ccp.status.phase in RUNNING and ccp.spec.export is not None:
        # Accepted while the checkpoint runs: the node's agent follows it, reading its parts as they
        # land when it streams them, and restores nothing unless it succeeds (services/pipeline.py).
        # Its folder is in this namespace, as any checkpointRef's.
        ref_storage = ccp.status.storage_ref or ccp.spec.export.storage_ref
        storage = choose_storage(ref_storage, kube.storages(), namespace=namespace)
        return ResolvedArchive(storage_ref=NameRef(name=storage.metadata.name))
    if ccp.status.phase != Phase.SUCCEEDED:
        raise Failure(
            Reason.CHECKPOINT_NOT_READY,
            f"ContainerCheckpoint {ref.name!r} is {ccp.status.phase or 'Pending'}, not Succeeded",
        )
    exported = [a for a in ccp.status.archives if a.key]
    if not exported or ccp.status.storage_ref is None:
        raise Failure(
            Reason.CHECKPOINT_NOT_EXPORTED,
            f"ContainerCheckpoint {ref.name!r} was not exported to storage; only exported "
            "checkpoints can be restored by a ContainerRestore",
        )
    if ref.container:
        exported = [a for a in exported if ref.container in (a.container, a.container_id)]
        if not exported:
            raise Failure(
                Reason.CHECKPOINT_NOT_FOUND,
                f"ContainerCheckpoint {ref.name!r} has no archive of container {ref.container!r}",
            )
    elif len(exported) > 1:
        raise Failure(
            Reason.CONTAINER_AMBIGUOUS,
            f"ContainerCheckpoint {ref.name!r} holds {len(exported)} containers; set source.checkpointRef.container",
        )
    archive = exported[0]
    choose_storage(ccp.status.storage_ref, kube.storages(), namespace=namespace)
    assert archive.key is not None
    return ResolvedArchive(
        storage_ref=ccp.status.storage_ref,
        key=archive.key,
        sha256=archive.sha256,
        compression=archive.compression,
    )


PortRange = tuple[int, int]
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")


def port_range(text: str) -> PortRange | None:
    """`a` or `a-b`, within 1 to 65535 and in order; None when it is not that. Pure."""
    match = _PORTS.fullmatch(text.strip())
    if match is None:
        return None
    first = int(match[1])
    last = int(match[2] or first)
    return (first, last) if 1 <= first <= last <= 65535 else None


def allowed_host_ports(setting: str) -> list[PortRange]:
    """CHECKPOINTER_PUBLISH_HOST_PORTS: comma-separated ports and ranges; empty: none. Pure.

    Raises ValueError on anything else, so that a controller with a mistyped setting does not start.
    """
    ranges = []
    for part in setting.split(","):
        if not part.strip():
            continue
        found = port_range(part)
        if found is None:
            raise ValueError(f"CHECKPOINTER_PUBLISH_HOST_PORTS: {part.strip()!r} is not a port or a range a-b of ports")
        ranges.append(found)
    return ranges


def published_host_ports(entry: str) -> PortRange | None:
    """The host ports of one `publish` entry in podman's syntax, `[[ip:][hostPort]:]containerPort[/protocol]`;
    None when it names none, so that podman would choose one. Pure.

    Raises ValueError for an entry that is not in that syntax: what is not understood is not passed on.
    """
    body = entry.split("/", 1)[0]
    head, sep, container = body.rpartition(":")
    if port_range(container) is None:
        raise ValueError(f"{container!r} is not a container port")
    if not sep:
        return None
    if head.startswith("["):  # an IPv6 address: [addr]:hostPort
        _, closed, rest = head.partition("]")
        if not closed or not rest.startswith(":"):
            raise ValueError(f"{head!r} is not [address]:hostPort")
        host = rest[1:]
    else:
        _, colon, host = head.rpartition(":")
        if not colon:
            host = head
    if host == "":
        return None
    found = port_range(host)
    if found is None:
        raise ValueError(f"{host!r} is not a host port")
    return found


def describe_ports(ranges: list[PortRange]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "none"


def publish_not_permitted(publish: list[str], allowed: list[PortRange]) -> list[str]:
    """Each entry of a restore's `publish` that asks for a host port outside `allowed`, with why. Pure.

    An entry without a host port is refused too: podman would then take any free port of the node,
    which no administrator's range bounds.
    """
    refused = []
    for entry in publish:
        try:
            ports = published_host_ports(entry)
        except ValueError as e:
            refused.append(f"{entry!r} ({e})")
            continue
        if ports is None:
            refused.append(f"{entry!r} (no host port: podman would choose any port of the node)")
        elif not any(first <= ports[0] and ports[1] <= last for first, last in allowed):
            shown = str(ports[0]) if ports[0] == ports[1] else f"{ports[0]}-{ports[1]}"
            refused.append(f"{entry!r} (host port {shown})")
    return refused


def require_publish_permitted(crst: ContainerRestore, settings: Settings) -> None:
    """Outside an admin namespace a restore publishes only host ports the administrator allows."""
    namespace = crst.metadata.namespace
    if not crst.spec.publish or namespace in settings.admins:
        return
    allowed = allowed_host_ports(settings.publish_host_ports)
    refused = publish_not_permitted(crst.spec.publish, allowed)
    if refused:
        raise Failure(
            Reason.PUBLISH_NOT_PERMITTED,
            f"outside an admin namespace, publish may bind only the host ports the administrator allows "
            f"({describe_ports(allowed)}; chart value tenancy.publishHostPorts), each entry naming its host "
            f"port; not permitted: {'; '.join(refused)}; nothing was restored",
        )
