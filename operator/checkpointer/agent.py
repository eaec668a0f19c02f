"""The node agent: one per node, watching only the objects labelled for its node.

It renews a Lease so the controller can tell a live agent from a missing one, and hands each
object to the checkpoint or restore service. Handlers re-read the object before acting, so a
stale event never starts a second checkpoint.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Executor
from typing import Any

import kopf

from checkpointer import GROUP, NODE_LABEL, VERSION, metrics
from checkpointer.adapters.kube import CHECKPOINTS, RESTORES
from checkpointer.archive.spool import spool_usage
from checkpointer.reasons import Phase
from checkpointer.services import checkpoint, restore
from checkpointer.services.capabilities import NodeFacts
from checkpointer.services.node import Node
from checkpointer.services.schedules import start_delay
from checkpointer.services.scheduling import lease_name
from checkpointer.services.sweep import sweep

log = logging.getLogger(__name__)
# The agent's spool, as its last sweep found it, on its Lease (bytes).
SPOOL_USED = "checkpointer.dev/spool-used-bytes"
SPOOL_FREE = "checkpointer.dev/spool-free-bytes"
BUCKET_SWEEP_ROUNDS = 10


class _Bounded(OrderedDict[Any, Any]):
    """A dict that forgets its oldest entries beyond `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


# kopf's state for the agent's handlers lives in the agent's memory, not in annotations on the
# object: those would cost one or two more writes to the API server for every object. A restarted
# agent (or one that forgot an old object) sees each object of its node as new and runs its handler
# once more; the handlers act only on Scheduled objects (see _current), so that repeats nothing.
LIMIT = 10_000


class RememberedDiffBase(kopf.DiffBaseStorage):
    """The last handled state of each object."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._essences = _Bounded(LIMIT)

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        essence: kopf.BodyEssence | None = self._essences.get(body.metadata.uid)
        return essence

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._essences[body.metadata.uid] = essence


class RememberedProgress(kopf.AnnotationsProgressStorage):
    """Handler retries and delays; only the wake-up after a delay still writes (kopf's touch)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._records = _Bounded(LIMIT)

    def fetch(self, *, key: str, body: kopf.Body) -> kopf.ProgressRecord | None:
        record: kopf.ProgressRecord | None = self._records.get((body.metadata.uid, key))
        return record

    def store(self, *, key: str, record: kopf.ProgressRecord, body: kopf.Body, patch: kopf.Patch) -> None:
        self._records[body.metadata.uid, key] = record

    def purge(self, *, key: str, body: kopf.Body, patch: kopf.Patch) -> None:
        self._records.pop((body.metadata.uid, key), None)


def _current(agent: Node, plural: str, body: kopf.Body, retry: int) -> dict[str, Any] | None:
    """The object as the API server has it now; None once it is gone or not ours to act on yet."""
    if retry == 0 and (body.get("status") or {}).get("phase") == Phase.SCHEDULED:
        # The first sight of a scheduled object: nothing of this agent has acted on it yet, so the
        # event's body cannot be behind this agent's own writes. Saves a read on every pickup.
        return dict(body)
    fresh = agent.kube.get(plural, body["metadata"]["namespace"], body["metadata"]["name"])
    if fresh is None:
        return None
    phase = (fresh.get("status") or {}).get("phase")
    if phase in (None, Phase.PENDING):
        # The controller writes the label and the status in two patches; wait for the status.
        raise kopf.TemporaryError("waiting for the controller to schedule this object", delay=1)
    return fresh


def _settled(body: kopf.Body, **_: Any) -> bool:
    phase = (body.get("status") or {}).get("phase")
    return phase in (Phase.SUCCEEDED, Phase.FAILED) or bool(body["metadata"].get("deletionTimestamp"))


def _where(body: kopf.Body) -> tuple[str, str]:
    return str(body["metadata"]["namespace"]), str(body["metadata"]["name"])


def register(registry: kopf.OperatorRegistry, agent: Node, executor: Executor) -> None:
    """`executor` runs the blocking work of handlers that first wait on the event loop: kopf's own."""
    node = agent.settings.node_name
    settings = agent.settings
    metrics.register(metrics.Spool(node, lambda: spool_usage(settings.spool_dir, settings.spool_max_bytes)))
    mine = {NODE_LABEL: node}

    @kopf.on.resume(GROUP, VERSION, CHECKPOINTS, labels=mine, registry=registry)
    @kopf.on.create(GROUP, VERSION, CHECKPOINTS, labels=mine, registry=registry)
    async def take_checkpoint(body: kopf.Body, retry: int, **_: Any) -> None:
        # A schedule's checkpoint is created ahead of its time: it starts at the scheduled second. The
        # wait is on the event loop, not in a handler thread; a stale body is fine after it, because the
        # first status write carries its resourceVersion and stops at any change meanwhile.
        delay = start_delay(body["metadata"].get("annotations") or {}, datetime.datetime.now(datetime.UTC))
        if delay > 0:
            log.info("checkpoint %s/%s starts in %.1fs, at its scheduled time", *_where(body), delay)
            await asyncio.sleep(delay)

        def take() -> None:
            fresh = _current(agent, CHECKPOINTS, body, retry)
            if fresh is not None:
                checkpoint.run(agent, fresh)

        # In a copy of this handler's context, as kopf runs sync handlers: kopf.event needs it.
        await asyncio.get_running_loop().run_in_executor(executor, contextvars.copy_context().run, take)

    # optional: no finalizer of the agent's own. The controller's finalizer keeps a deleted object
    # until it is terminal, so this runs for one whose checkpoint was waiting for a retry: kopf
    # drops a pending retry of the handler above once the object is being deleted.
    @kopf.on.delete(GROUP, VERSION, CHECKPOINTS, labels=mine, optional=True, registry=registry)
    def cancel_checkpoint(body: kopf.Body, **_: Any) -> None:
        fresh = agent.kube.get(CHECKPOINTS, body["metadata"]["namespace"], body["metadata"]["name"])
        if fresh is not None:
            checkpoint.run(agent, fresh)  # it sees the deletion and gives the containers back

    # After the hand-over for signing, podman's local checkpoints and the spool wait for the
    # controller's word (checkpoint.settle): one stat of the work folder per event of a finished or
    # deleting object, the first listing after a restart included; the sweep settles what this missed.
    @kopf.on.event(GROUP, VERSION, CHECKPOINTS, labels=mine, when=_settled, registry=registry)
    def settle_checkpoint(body: kopf.Body, type: str | None, **_: Any) -> None:
        if type != "DELETED":
            checkpoint.settle(agent, dict(body))

    @kopf.on.resume(GROUP, VERSION, RESTORES, labels=mine, registry=registry)
    @kopf.on.create(GROUP, VERSION, RESTORES, labels=mine, registry=registry)
    def restore_archive(body: kopf.Body, retry: int, **_: Any) -> None:
        fresh = _current(agent, RESTORES, body, retry)
        if fresh is not None:
            restore.run(agent, fresh)

    stop = threading.Event()
    facts: list[NodeFacts] = []  # the node's, once asked
    recorded = threading.Event()  # they are on the Lease

    def renew() -> None:
        # Written once, not on every beat: a renewal then stays one small patch.
        annotations = facts[0].annotations() if facts and not recorded.is_set() else None
        created = agent.kube.renew_lease(
            agent.settings.namespace, lease_name(node), node, agent.settings.lease_duration_seconds, annotations
        )
        if annotations is not None:
            recorded.set()
        elif created:
            recorded.clear()  # a Lease made anew has lost them: the next beat writes them again

    def record_facts() -> None:
        started = time.monotonic()
        try:
            facts.append(agent.facts())
            renew()
        except Exception as e:  # the controller then refuses nothing up front; the agent's own checks still run
            log.warning("could not record the node's versions and CRIU features on Lease %s: %s", lease_name(node), e)
            return
        log.info(
            "recorded on Lease %s in %.2fs: %s; CRIU features missing: %s",
            lease_name(node),
            time.monotonic() - started,
            facts[0].describe(),
            ", ".join(sorted(facts[0].missing)) or "none",
        )

    def heartbeat() -> None:
        while not stop.wait(agent.settings.lease_renew_seconds):
            try:
                renew()
            except Exception as e:  # the next beat tries again; the controller sees the Lease age
                log.warning("could not renew Lease %s: %s", lease_name(node), e)

    def sweeper() -> None:
        rounds = 0
        while True:
            try:
                # The bucket's open uploads are listed at start and every BUCKET_SWEEP_ROUNDS rounds:
                # a listing per storage and node is dearer than a look at the node's own spool.
                sweep(agent, bucket=rounds % BUCKET_SWEEP_ROUNDS == 0)
            except Exception as e:  # the next round tries again
                log.warning("could not sweep the spool: %s", e)
            try:
                report_spool_usage()
            except Exception as e:
                log.warning("could not record the spool's usage on Lease %s: %s", lease_name(node), e)
            rounds += 1
            if stop.wait(agent.settings.sweep_seconds):
                return

    def report_spool_usage() -> None:
        usage = spool_usage(agent.settings.spool_dir, agent.settings.spool_max_bytes)
        annotations = {SPOOL_USED: str(usage.used_bytes), SPOOL_FREE: str(usage.free_bytes)}
        agent.kube.renew_lease(
            agent.settings.namespace, lease_name(node), node, agent.settings.lease_duration_seconds, annotations
        )

    @kopf.on.startup(registry=registry)
    def start_heartbeat(**_: Any) -> None:
        renew()  # before any handler runs, so the controller sees a live agent at once
        # The node's versions go into every manifest, and with CRIU's feature checks onto the Lease for
        # the controller; asking now keeps podman off the first checkpoint and the start fast.
        threading.Thread(target=record_facts, name="versions", daemon=True).start()
        threading.Thread(target=heartbeat, name="lease", daemon=True).start()
        threading.Thread(target=sweeper, name="sweep", daemon=True).start()

    @kopf.on.cleanup(registry=registry)
    def stop_heartbeat(**_: Any) -> None:
        stop.set()
