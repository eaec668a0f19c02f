"""The node agent: one per node, watching only the objects labelled for its node.

`register` lists its kopf handlers, which hand each object to the checkpoint or restore service.
Handlers re-read the object before acting, so a stale event never starts a second checkpoint. The
agent keeps its node's Lease (`lease`), so the controller can tell a live agent from a missing one,
and sweeps its spool and the bucket (`sweeper`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor
from typing import Any

import kopf

from checkpointer import GROUP, NODE_LABEL, VERSION, metrics
from checkpointer.adapters.kube import CHECKPOINTS, RESTORES
from checkpointer.agent.lease import NodeLease
from checkpointer.agent.sweeper import Sweeper
from checkpointer.archive.spool import spool_usage
from checkpointer.memory import InFlight, Memory
from checkpointer.models import ObjectStatus, node_of
from checkpointer.reasons import FINISHED, Phase
from checkpointer.services import checkpoint, restore
from checkpointer.services.node import Node
from checkpointer.services.schedule_rules import start_delay

log = logging.getLogger(__name__)


def elsewhere(body: Mapping[str, Any], node: str) -> str | None:
    """Why the agent of `node` must not act on this object; None when it may. Pure.

    Both its spec.nodeName (immutable, checked by the controller when it scheduled the object; for a
    Pod's checkpoint without one, the Pod's node the controller recorded in status) and its node
    label (which this agent's watch selects on, and which anyone who may edit the object can change)
    must name the node: a tenant who relabels their object must not move it to another node.
    """
    meta = body.get("metadata") or {}
    scheduled = node_of(body)
    label = (meta.get("labels") or {}).get(NODE_LABEL)
    if scheduled != node:
        field = "spec.nodeName" if (body.get("spec") or {}).get("nodeName") else "node (its Pod's, in status.nodeName)"
        return f"its {field} is {scheduled!r}, not this node {node!r} (its label {NODE_LABEL} is {label!r})"
    if label != node:
        return f"its label {NODE_LABEL} is {label!r} now, not this node {node!r}"
    return None


def _current(
    agent: Node, memory: Memory, plural: str, body: kopf.Body, retry: int, waited: bool = False
) -> dict[str, Any] | None:
    """The object as the API server has it now; None once it is gone or not ours to act on (yet)."""
    node = agent.settings.node_name
    if _declined(body, node, memory):
        return None
    if retry == 0 and not waited and ObjectStatus.of(body).phase == Phase.SCHEDULED:
        # The first sight of a scheduled object: nothing of this agent has acted on it yet, so the
        # event's body cannot be behind this agent's own writes. Saves a read on every pickup. After a
        # wait it may be: relabelled meanwhile, or deleted and made anew under the same name.
        return dict(body)
    fresh = agent.kube.get(plural, body["metadata"]["namespace"], body["metadata"]["name"])
    if fresh is None or fresh["metadata"]["uid"] != body["metadata"]["uid"] or _declined(fresh, node, memory):
        return None
    if ObjectStatus.of(fresh).phase in (None, Phase.PENDING):
        # The controller writes the label and the status in two patches; wait for the status.
        raise kopf.TemporaryError("waiting for the controller to schedule this object", delay=1)
    return fresh


def _declined(body: Mapping[str, Any], node: str, memory: Memory) -> bool:
    why = elsewhere(body, node)
    if why is not None:
        meta = body["metadata"]
        log.warning("not acting on %s %s/%s: %s", body.get("kind"), meta["namespace"], meta["name"], why)
        memory.decline(str(meta["uid"]))
    return why is not None


@contextlib.contextmanager
def _handling(in_flight: InFlight, body: kopf.Body) -> Iterator[None]:
    """A handler's run on the object, in flight (memory.py) until it ends other than by a retry."""
    uid = str(body["metadata"]["uid"])
    if not in_flight.begin(uid):
        raise kopf.TemporaryError("a handler of this agent is running on this object already", delay=5)
    try:
        yield
    except kopf.PermanentError:
        in_flight.end(uid)
        raise
    except BaseException:
        in_flight.paused(uid)  # kopf tries again (every other error is a temporary one to it)
        raise
    in_flight.end(uid)


def _settled(body: kopf.Body, type: str | None, **_: Any) -> bool:
    deleted = type == "DELETED" or bool(body["metadata"].get("deletionTimestamp"))
    return ObjectStatus.of(body).phase in FINISHED or deleted


def _where(body: kopf.Body) -> tuple[str, str]:
    return str(body["metadata"]["namespace"]), str(body["metadata"]["name"])


def register(registry: kopf.OperatorRegistry, agent: Node, executor: Executor, memory: Memory) -> None:
    """`executor` runs the blocking work of handlers that first wait on the event loop: kopf's own.
    `memory` is kopf's memory of this agent's handlers (memory.py): what they work on stays in it."""
    node = agent.settings.node_name
    settings = agent.settings
    metrics.register(metrics.Spool(node, lambda: spool_usage(settings.spool_dir, settings.spool_max_bytes)))

    # The agent's series name its own node and the storages it moved bytes to or from, while they exist.
    def existing() -> metrics.Existing:
        return metrics.Existing(frozenset({node}), frozenset(s.metadata.name for s in agent.kube.storages()))

    metrics.bound(existing)
    mine = {NODE_LABEL: node}
    in_flight = memory.in_flight

    @kopf.on.resume(GROUP, VERSION, CHECKPOINTS, labels=mine, registry=registry)
    @kopf.on.create(GROUP, VERSION, CHECKPOINTS, labels=mine, registry=registry)
    async def take_checkpoint(body: kopf.Body, retry: int, **_: Any) -> None:
        if _declined(body, node, memory):
            return
        with _handling(in_flight, body):
            # A schedule's checkpoint is created ahead of its time: it starts at the scheduled second.
            # The wait is on the event loop, not in a handler thread; the object is read again after it.
            delay = start_delay(body["metadata"].get("annotations") or {}, datetime.datetime.now(datetime.UTC))
            if delay > 0:
                log.info("checkpoint %s/%s starts in %.1fs, at its scheduled time", *_where(body), delay)
                await asyncio.sleep(delay)

            def take() -> None:
                fresh = _current(agent, memory, CHECKPOINTS, body, retry, waited=delay > 0)
                if fresh is not None:
                    checkpoint.run(agent, fresh)

            await asyncio.get_running_loop().run_in_executor(executor, take)

    # optional: no finalizer of the agent's own. The controller's finalizer keeps a deleted object
    # until it is terminal, so this runs for one whose checkpoint was waiting for a retry: kopf
    # drops a pending retry of the handler above once the object is being deleted.
    @kopf.on.delete(GROUP, VERSION, CHECKPOINTS, labels=mine, optional=True, registry=registry)
    def cancel_checkpoint(body: kopf.Body, **_: Any) -> None:
        if _declined(body, node, memory):
            return
        with _handling(in_flight, body):
            fresh = agent.kube.get(CHECKPOINTS, body["metadata"]["namespace"], body["metadata"]["name"])
            if (
                fresh is not None
                and fresh["metadata"]["uid"] == body["metadata"]["uid"]
                and not _declined(fresh, node, memory)
            ):
                checkpoint.run(agent, fresh)  # it sees the deletion and gives the containers back

    # After the hand-over for signing, podman's local checkpoints and the spool wait for the
    # controller's word (checkpoint.settle): one stat of the work folder per event of a finished or
    # deleting object, the first listing after a restart included; the sweep settles what this missed.
    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, labels=mine, when=_settled, registry=registry)
    def settle_checkpoint(body: kopf.Body, type: str | None, **_: Any) -> None:
        # DELETED too: an object whose finalizer a tenant removed goes at once, with no deletion
        # first, and the last state it carries says whether its archives were ever signed.
        if elsewhere(body, node) is None:
            checkpoint.settle(agent, dict(body), gone=type == "DELETED")

    @kopf.on.resume(GROUP, VERSION, RESTORES, labels=mine, registry=registry)
    @kopf.on.create(GROUP, VERSION, RESTORES, labels=mine, registry=registry)
    def restore_archive(body: kopf.Body, retry: int, **_: Any) -> None:
        if _declined(body, node, memory):
            return
        with _handling(in_flight, body):
            fresh = _current(agent, memory, RESTORES, body, retry)
            if fresh is not None:
                restore.run(agent, fresh)

    # An object leaves this agent's watch when it is deleted or labelled for another node (the watch
    # then sends it as DELETED). One its handlers declined (relabelled away while it waited) is
    # forgotten then, so that once the controller labels it back for this node, kopf takes it up anew.
    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, labels=mine, registry=registry)
    @kopf.on.event(GROUP, VERSION, RESTORES, labels=mine, registry=registry)
    def left_the_node(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type == "DELETED":
            memory.left(str(body["metadata"]["uid"]))

    lease = NodeLease(agent)
    sweeper = Sweeper(agent, lease, working=in_flight.running)

    @kopf.on.startup(registry=registry)
    def start_heartbeat(**_: Any) -> None:
        lease.start()
        sweeper.start()

    @kopf.on.cleanup(registry=registry)
    def stop_heartbeat(**_: Any) -> None:
        lease.stop()
        sweeper.stop()
