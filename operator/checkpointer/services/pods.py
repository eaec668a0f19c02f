"""A Pod's checkpoint (spec.podRef): the Pod's node, its containers and what the manifest records
of them, from the Pod as the API server has it. Pure.

The controller resolves the node once (`pod_node`) and records it in status.nodeName; the node's
agent reads the Pod again and takes each container's runtime id from its status (`pod_containers`):
a Pod made anew under the name since runs other containers, perhaps on another node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from checkpointer.errors import Failure
from checkpointer.models import CheckpointSpec
from checkpointer.reasons import Reason


@dataclass(frozen=True)
class PodContainer:
    """One container of the Pod, as its status says."""

    name: str
    # The runtime's id, without the `containerd://` scheme of containerStatuses[].containerID.
    id: str
    # The image as the Pod's spec names it, and the runtime's reference to it: the repository digest
    # (`<repository>@sha256:…`) when the image was pulled from a registry.
    image: str
    image_id: str


def _chosen(spec: CheckpointSpec, pod: Mapping[str, Any]) -> list[str]:
    """The names of the containers the checkpoint takes, in the Pod's order; refuses names it lacks."""
    assert spec.pod_ref is not None
    declared = [str(c.get("name")) for c in (pod.get("spec") or {}).get("containers") or []]
    asked = spec.pod_ref.containers
    if not asked:
        return declared
    missing = [c for c in asked if c not in declared]
    if missing:
        raise Failure(
            Reason.CONTAINER_NOT_IN_POD,
            f"Pod {spec.pod_ref.name!r} has no container {', '.join(repr(c) for c in missing)} (its containers: "
            f"{', '.join(declared) or 'none'}); nothing was checkpointed",
        )
    return [c for c in declared if c in asked]


def _running(pod: Mapping[str, Any], name: str) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase == "Running" and not (pod.get("metadata") or {}).get("deletionTimestamp")


def pod_node(spec: CheckpointSpec, namespace: str, pod: Mapping[str, Any] | None) -> str:
    """The node of the Pod a checkpoint names, for the controller to schedule it onto. Raises Failure
    when the Pod is missing, on another node than spec.nodeName, lacks a named container, or is not
    running."""
    ref = spec.pod_ref
    assert ref is not None
    if pod is None:
        raise Failure(
            Reason.POD_NOT_FOUND,
            f"Pod {ref.name!r} does not exist in namespace {namespace} (podRef names a Pod of the checkpoint's "
            "own namespace)",
        )
    node = str((pod.get("spec") or {}).get("nodeName") or "")
    if spec.node_name and node and spec.node_name != node:
        raise Failure(
            Reason.POD_ON_ANOTHER_NODE,
            f"Pod {ref.name!r} runs on node {node!r}, not on {spec.node_name!r} as spec.nodeName says; leave "
            "nodeName out to checkpoint it where it runs",
        )
    _chosen(spec, pod)
    if not node or not _running(pod, ref.name):
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        where = f"on node {node}" if node else "not scheduled onto a node yet"
        deleting = " and is being deleted" if (pod.get("metadata") or {}).get("deletionTimestamp") else ""
        raise Failure(
            Reason.POD_NOT_RUNNING,
            f"Pod {ref.name!r} is {phase}{deleting} ({where}); only a running Pod's containers can be checkpointed",
        )
    return node


def pod_containers(spec: CheckpointSpec, pod: Mapping[str, Any] | None, node: str) -> list[PodContainer]:
    """The containers the agent of `node` checkpoints, with their runtime ids; raises Failure when the
    Pod is gone, is no longer on this node, or a chosen container does not run."""
    ref = spec.pod_ref
    assert ref is not None
    if pod is None or str((pod.get("spec") or {}).get("nodeName") or "") != node:
        raise Failure(
            Reason.POD_NOT_FOUND,
            f"Pod {ref.name!r} is no longer on node {node}: it was deleted (or made anew elsewhere) after the "
            "checkpoint was scheduled; nothing was checkpointed",
        )
    names = _chosen(spec, pod)
    if not _running(pod, ref.name):
        phase = (pod.get("status") or {}).get("phase") or "Pending"
        raise Failure(Reason.POD_NOT_RUNNING, f"Pod {ref.name!r} is {phase}; nothing was checkpointed")
    statuses = {str(s.get("name")): s for s in (pod.get("status") or {}).get("containerStatuses") or []}
    images = {str(c.get("name")): str(c.get("image") or "") for c in (pod.get("spec") or {}).get("containers") or []}
    found = []
    stopped = []
    for name in names:
        status = statuses.get(name) or {}
        runtime_id = str(status.get("containerID") or "")
        if "running" not in (status.get("state") or {}) or "://" not in runtime_id:
            stopped.append(name)
            continue
        found.append(
            PodContainer(name, runtime_id.split("://", 1)[1], images.get(name, ""), str(status.get("imageID") or ""))
        )
    if stopped:
        raise Failure(
            Reason.CONTAINER_NOT_RUNNING,
            f"container {', '.join(stopped)} of Pod {ref.name!r} is not running; only running containers can be "
            "checkpointed, and nothing was",
        )
    return found


def pod_record(pod: Mapping[str, Any]) -> dict[str, Any]:
    """What the manifest keeps of the Pod for a restore: its name, uid, labels and whole spec."""
    meta = pod.get("metadata") or {}
    record: dict[str, Any] = {"name": meta.get("name"), "uid": meta.get("uid")}
    if meta.get("labels"):
        record["labels"] = dict(meta["labels"])
    record["spec"] = pod.get("spec") or {}
    return record
