"""The node's Lease: the agent's liveness, its node's versions and CRIU features, its spool's usage.

The controller reads all three from the Lease: an expired Lease is a missing agent, the versions and
features let it refuse up front what the node cannot do, and the spool's usage goes into metrics.
"""

from __future__ import annotations

import logging
import threading
import time

from checkpointer.archive.spool import spool_usage
from checkpointer.services.capabilities import NodeFacts
from checkpointer.services.node import Node
from checkpointer.services.scheduling import lease_name

log = logging.getLogger(__name__)
# The agent's spool, as its last sweep found it, on its Lease (bytes).
SPOOL_USED = "checkpointer.dev/spool-used-bytes"
SPOOL_FREE = "checkpointer.dev/spool-free-bytes"


class NodeLease:
    """Renews the node's Lease every `lease_renew_seconds` on a thread of its own, until stopped."""

    def __init__(self, agent: Node) -> None:
        self.agent = agent
        self.name = lease_name(agent.settings.node_name)
        self._stop = threading.Event()
        self._facts: NodeFacts | None = None  # the node's, once asked
        self._recorded = threading.Event()  # they are on the Lease

    def start(self) -> None:
        self.renew()  # before any handler runs, so the controller sees a live agent at once
        # The node's versions go into every manifest, and with CRIU's feature checks onto the Lease for
        # the controller; asking now keeps podman off the first checkpoint and the start fast.
        threading.Thread(target=self._record_facts, name="versions", daemon=True).start()
        threading.Thread(target=self._beat, name="lease", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def renew(self, annotations: dict[str, str] | None = None) -> None:
        # The facts are written once, not on every beat: a renewal then stays one small patch.
        facts = self._facts.annotations() if self._facts is not None and not self._recorded.is_set() else None
        settings = self.agent.settings
        created = self.agent.kube.renew_lease(
            settings.namespace,
            self.name,
            settings.node_name,
            settings.lease_duration_seconds,
            {**(facts or {}), **(annotations or {})} or None,
        )
        if facts is not None:
            self._recorded.set()
        elif created:
            self._recorded.clear()  # a Lease made anew has lost them: the next beat writes them again

    def record_spool_usage(self) -> None:
        usage = spool_usage(self.agent.settings.spool_dir, self.agent.settings.spool_max_bytes)
        self.renew({SPOOL_USED: str(usage.used_bytes), SPOOL_FREE: str(usage.free_bytes)})

    def _record_facts(self) -> None:
        started = time.monotonic()
        try:
            self._facts = self.agent.facts()
            self.renew()
        except Exception as e:  # the controller then refuses nothing up front; the agent's own checks still run
            log.warning("could not record the node's versions and CRIU features on Lease %s: %s", self.name, e)
            return
        log.info(
            "recorded on Lease %s in %.2fs: %s; CRIU features missing: %s",
            self.name,
            time.monotonic() - started,
            self._facts.describe(),
            ", ".join(sorted(self._facts.missing)) or "none",
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.agent.settings.lease_renew_seconds):
            try:
                self.renew()
            except Exception as e:  # the next beat tries again; the controller sees the Lease age
                log.warning("could not renew Lease %s: %s", self.name, e)
