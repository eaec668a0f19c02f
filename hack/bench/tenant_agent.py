"""The instant agent (bench/instant_agent.py) with one more workload per tenant namespace.

A checkpoint may take only its own namespace's containers (docs/security.md): the schedule benchmark
spreads its schedules over several namespaces, so every simulated node runs a `workload-<namespace>`
labelled with each of them (BENCH_TENANTS, comma-separated), beside the control plane's `workload`.
"""

from __future__ import annotations

import os
import sys

from bench.instant_agent import WORKLOAD, InstantRuntime
from checkpointer.__main__ import main
from checkpointer.adapters.podman import Container
from checkpointer.services.node import NAMESPACE_LABEL
from checkpointer.settings import Settings


class TenantRuntime(InstantRuntime):
    def __init__(self, tenants: list[str]) -> None:
        self.workloads = [WORKLOAD] + [
            Container(id=f"{i + 1:064x}", name=f"workload-{ns}", state="running", labels=((NAMESPACE_LABEL, ns),))
            for i, ns in enumerate(tenants)
        ]

    def containers(self) -> list[Container]:
        return list(self.workloads)

    def inspect(self, name: str) -> Container | None:
        return next((c for c in self.workloads if name in (c.name, c.id)), None)


def tenant_runtime(settings: Settings) -> TenantRuntime:
    return TenantRuntime([ns for ns in os.environ.get("BENCH_TENANTS", "").split(",") if ns])


if __name__ == "__main__":
    sys.exit(main(["agent"], make_runtime=tenant_runtime))
