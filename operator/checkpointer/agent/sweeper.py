"""The agent's sweep, every `sweep_seconds` on a thread of its own: the spool, podman's kept
checkpoints and, every BUCKET_SWEEP_ROUNDS rounds, the bucket's open uploads (services/sweep.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from checkpointer import metrics
from checkpointer.agent.lease import NodeLease
from checkpointer.services.node import Node
from checkpointer.services.sweep import sweep

log = logging.getLogger(__name__)
# A listing of open uploads per storage and node is dearer than a look at the node's own spool.
BUCKET_SWEEP_ROUNDS = 10


class Sweeper:
    def __init__(self, agent: Node, lease: NodeLease, working: Callable[[str], bool]) -> None:
        """`working(uid)`: a handler of this agent is at work on that object; its folder is left alone."""
        self.agent = agent
        self.lease = lease
        self.working = working
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="sweep", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        rounds = 0
        while True:
            try:
                sweep(self.agent, bucket=rounds % BUCKET_SWEEP_ROUNDS == 0, working=self.working)
            except Exception as e:  # the next round tries again
                log.warning("could not sweep the spool: %s", e)
            try:
                self.lease.record_spool_usage()
            except Exception as e:
                log.warning("could not record the spool's usage on Lease %s: %s", self.lease.name, e)
            metrics.refresh()
            rounds += 1
            if self._stop.wait(self.agent.settings.sweep_seconds):
                return
