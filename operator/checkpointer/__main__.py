"""`checkpointer controller` and `checkpointer agent`: the two processes of the operator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import kopf

from checkpointer import GROUP, NODE_LABEL, kopf_finalizer, kopf_prefix, logs, metrics
from checkpointer.adapters.kube import CHECKPOINTS, RESTORES, Kube, load_config
from checkpointer.memory import Memory
from checkpointer.settings import Settings
from checkpointer.status import register_events

if TYPE_CHECKING:
    from checkpointer.adapters.podman import Runtime
    from checkpointer.controller.leadership import Leadership

# Sync handlers run in kopf's thread pool of this size: objects handled at once by one process.
HANDLER_THREADS = 20
CHATTY_LIBRARIES = ("boto3", "botocore", "s3transfer", "urllib3", "kubernetes")
# kopf's waits between the attempts of a failing API request, its watches' included, before it gives up.
# kopf's own (1, 1, 2, 3, 5, 8, 13, 21) leave a process blind for up to 13 s more after an API server
# that was away 20 s answers again: its watches see no object meanwhile. The same patience (54 s) with
# no wait over 2 s.
API_RETRY_BACKOFFS = (1.0, 1.0) + (2.0,) * 26


def _kopf_settings(role: str, node: str | None, memory: Memory) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Controller and agent each keep their own handler progress, so neither mistakes the other's, and
    # both in their memory, out of the tenants' reach (memory.py). The spec is immutable and no handler
    # reacts to updates: tracking labels and annotations would only make the controller's own node
    # label look like an update.
    ignored = ["metadata.labels", "metadata.annotations"]
    settings.persistence.progress_storage = memory.progress_storage(prefix=kopf_prefix(role))
    settings.persistence.diffbase_storage = memory.diffbase_storage(ignored_fields=ignored)
    settings.persistence.finalizer = kopf_finalizer(role)
    # kopf's own "Handler succeeded" Events would double the API writes per object; ours are explicit.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = HANDLER_THREADS
    settings.networking.error_backoffs = API_RETRY_BACKOFFS
    if node is not None:
        # Server-side filtering: an agent is sent only the objects scheduled onto its own node.
        for plural in (CHECKPOINTS, RESTORES):
            settings.watching.label_selectors[GROUP, plural] = f"{NODE_LABEL}={node}"
    return settings


def main(argv: list[str] | None = None, make_runtime: Callable[[Settings], Runtime] | None = None) -> int:
    """Run a role; `make_runtime` replaces the podman runtime (the control-plane benchmark's instant agents)."""
    parser = argparse.ArgumentParser(prog="checkpointer", description=__doc__)
    parser.add_argument("role", choices=["controller", "agent"])
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument(
        "--log-format", choices=["text", "json"], help="text, or one JSON object per line (CHECKPOINTER_LOG_FORMAT)"
    )
    args = parser.parse_args(argv)
    settings = Settings()
    logs.configure(args.log_format or settings.log_format, args.verbose)
    # Never below INFO, even with --verbose: at DEBUG these libraries log whole requests and answers,
    # which carry the S3 access key ID (in every signed request) and Secrets read from the API server.
    for library in CHATTY_LIBRARIES:
        logging.getLogger(library).setLevel(logging.INFO)
    load_config()
    # Before a standby replica waits for the Lease: Prometheus sees every replica up.
    metrics.serve(settings.metrics_port, settings.metrics_host)
    # The handlers' threads, and a few more for the Lease heartbeat and progress from upload threads.
    kube = Kube(connections=HANDLER_THREADS + 4)
    registry = kopf.OperatorRegistry()
    # An own registry has none of kopf's default login handlers: authenticate as the kubernetes client does.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    # First of the startup handlers: every other one, and every thread they start, may post Events.
    register_events(registry, kube, settings.namespace)
    leadership: Leadership | None = None
    if args.role == "agent" and not settings.node_name:
        parser.error("the agent needs CHECKPOINTER_NODE_NAME (the downward API's spec.nodeName)")
    node = settings.node_name if args.role == "agent" else None
    memory = Memory()
    operator_settings = _kopf_settings(args.role, node, memory)
    if node is None:
        from checkpointer import controller
        from checkpointer.controller.leadership import Leadership, stand_by

        # Replicas stand by until the Lease is theirs: only one may schedule, and kopf runs standalone.
        leadership = Leadership.for_settings(kube, settings)
        if not stand_by(leadership, settings.health_port, settings.health_host):
            return 0
        controller.register(registry, settings, kube)
    else:
        from checkpointer import agent
        from checkpointer.adapters.cri import CriRuntime
        from checkpointer.adapters.podman import runtime
        from checkpointer.services.node import Node

        settings.spool_dir.mkdir(parents=True, exist_ok=True)
        runtime_of_node = (make_runtime or runtime)(settings)
        path = settings.cri_socket
        node_agent = Node(settings, kube, runtime_of_node, cri=CriRuntime(path) if path else None)
        agent.register(registry, node_agent, operator_settings.execution.executor, memory)
    liveness = f"http://{settings.health_host}:{settings.health_port}/healthz" if settings.health_port else None
    try:
        asyncio.run(
            kopf.operator(
                registry=registry,
                settings=operator_settings,
                standalone=True,
                clusterwide=True,
                liveness_endpoint=liveness,
            )
        )
    finally:
        if leadership is not None:
            # Sync handlers cancelled by kopf's shutdown may still run in their threads: the Lease is
            # given up only once none can write any more.
            operator_settings.execution.executor.shutdown(wait=True)
            leadership.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
