"""The controller and the simulated nodes' instant agents, (re)started with given settings.

The schedule and metrics-cost benchmarks start them afresh for each configuration they compare: a
configuration (metrics on or off) is a process's environment, fixed at its start.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import kubernetes

from localenv.env import NAMESPACE, LocalEnv
from localenv.procs import Process, wait_until

# The processes of one configuration serve /metrics on ports of their own, or none at all.
METRICS_OFF = "off"
METRICS_ON = "on"


def node_names(nodes: int) -> list[str]:
    return [f"sim-{i:02d}" for i in range(nodes)]


@dataclass
class Fleet:
    """The controller and one instant agent per simulated node, started with the same metrics setting."""

    env: LocalEnv
    nodes: int
    metrics: str = METRICS_OFF
    # One tenant namespace per extra workload the agents report (bench/tenant_agent.py).
    tenants: Sequence[str] = ()
    # Port of each process that serves /metrics, by process name.
    metrics_ports: dict[str, int] | None = None

    def _metrics_setting(self, process: str) -> dict[str, str]:
        if self.metrics == METRICS_OFF:
            return {"CHECKPOINTER_METRICS_PORT": "0"}
        port = self.env._new_port()
        assert self.metrics_ports is not None
        self.metrics_ports[process] = port
        return {"CHECKPOINTER_METRICS_PORT": str(port)}

    def start(self, metrics: str) -> None:
        """Start the controller and every agent with `metrics`, and wait until each agent renewed its Lease."""
        self.metrics = metrics
        self.metrics_ports = {}
        started = datetime.datetime.now(datetime.UTC)
        self.env.apply(*[{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}} for n in node_names(self.nodes)])
        self.env.start_controller(self._metrics_setting("controller"))
        module = "bench.tenant_agent" if self.tenants else "bench.instant_agent"
        for name in node_names(self.nodes):
            proc_env = self.env.operator_env(
                {
                    "CHECKPOINTER_NODE_NAME": name,
                    "CHECKPOINTER_SPOOL_DIR": str(self.env.workdir / "sim-spool" / name),
                    "BENCH_TENANTS": ",".join(self.tenants),
                    **self._metrics_setting(f"agent-{name}"),
                }
            )
            self.env.supervisor.start(f"agent-{name}", [sys.executable, "-m", module], env=proc_env)
        coordination = kubernetes.client.CoordinationV1Api(self.api())

        def renewed() -> bool:
            fresh = set()
            for lease in coordination.list_namespaced_lease(NAMESPACE).items:
                renewed = lease.spec.renew_time if lease.spec else None
                if lease.metadata and renewed is not None and renewed >= started:
                    fresh.add(lease.metadata.name)
            return all(f"checkpointer-agent-{n}" in fresh for n in node_names(self.nodes))

        wait_until(f"{self.nodes} agents renewing their Leases", renewed, timeout=600, interval=2)
        wait_until("the controller leading", lambda: self.env.controller_leader() == "controller", timeout=120)

    def api(self) -> kubernetes.client.ApiClient:
        api: kubernetes.client.ApiClient = kubernetes.config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.env.kubeconfig)
        )
        return api

    def stop(self) -> None:
        """Stop the controller and every agent at once (SIGTERM to all, then wait), not one by one."""
        names = {"controller", *(f"agent-{n}" for n in node_names(self.nodes))}
        chosen = [p for p in self.env.supervisor.processes if p.name in names]
        for proc in chosen:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGTERM)
        for proc in chosen:
            try:
                proc.popen.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(10)
        self.env.supervisor.processes = [p for p in self.env.supervisor.processes if p.name not in names]
        self.env.health_ports.pop("controller", None)

    def processes(self) -> dict[str, Process]:
        return {p.name: p for p in self.env.supervisor.processes if p.alive()}

    def agent_pids(self) -> list[int]:
        return [p.popen.pid for name, p in self.processes().items() if name.startswith("agent-sim-")]

    def controller_pid(self) -> int:
        return self.processes()["controller"].popen.pid


@dataclass
class Scrapes:
    """What a Prometheus-like scraper got from the processes' /metrics: answers, failures, series."""

    ok: int = 0
    failed: int = 0
    series: int = 0  # checkpointer_* samples in the controller's last answer
    seconds: float = 0.0  # time spent scraping, all answers together


def scrape(ports: dict[str, int], into: Scrapes, timeout: float = 5) -> None:
    """GET /metrics from every process once, as Prometheus does at each scrape interval."""
    for name, port in ports.items():
        start = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as answer:
                text = answer.read().decode()
        except OSError:
            into.failed += 1
            continue
        finally:
            into.seconds += time.monotonic() - start
        into.ok += 1
        if name == "controller":
            into.series = sum(1 for line in text.splitlines() if line.startswith("checkpointer_"))


def every(seconds: float, action: Callable[[], None], stop: Callable[[], bool]) -> None:
    """Run `action` every `seconds` until `stop()`; for a thread."""
    while not stop():
        action()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stop():
            time.sleep(0.2)
