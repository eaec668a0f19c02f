"""What serving metrics costs: the same figures with CHECKPOINTER_METRICS_PORT=0 and with metrics on.

Two figures, each in interleaved rounds (every round measures both settings, in an order that
alternates), so that drift over the invocation lands on both:

- control plane: p99 from creation to pickup of N ContainerCheckpoints (bench/controlplane.py)
  across simulated nodes, the controller and every agent started afresh with the setting;
- data path: c, a 1 GiB zstd checkpoint into S3 over loopback (bench/datapath.py), the controller
  and the source node's agent started afresh with the setting.

With metrics on, a scraper reads every process's /metrics at Prometheus' usual interval, so the
cost of answering scrapes is in the figure too.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import controlplane, datapath
from bench.fleet import METRICS_OFF, METRICS_ON, Fleet, Scrapes, every, scrape
from bench.stats import conditions, median, spread, wait_quiet
from localenv.env import LocalEnv

SETTINGS = (METRICS_OFF, METRICS_ON)


def _order(round_: int) -> tuple[str, ...]:
    return SETTINGS if round_ % 2 == 0 else SETTINGS[::-1]


@contextlib.contextmanager
def scraping(ports: dict[str, int], seconds: float) -> Iterator[Scrapes]:
    """Scrape every `seconds` in a thread while the block runs (nothing without ports)."""
    scrapes = Scrapes()
    stop = threading.Event()
    thread = threading.Thread(target=every, args=(seconds, lambda: scrape(ports, scrapes), stop.is_set), daemon=True)
    if ports and seconds > 0:
        thread.start()
    try:
        yield scrapes
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(30)


def _ratio(on: list[float], off: list[float]) -> dict[str, Any]:
    per_round = [a / b for a, b in zip(on, off, strict=False) if b]
    off_m, on_m = median(off), median(on)
    return {
        "off": off_m,
        "on": on_m,
        "on_over_off": on_m / off_m if off_m else None,
        "spread": {"off": spread(off), "on": spread(on), "on_over_off": spread(per_round)},
    }


def control_plane(
    env: LocalEnv,
    rounds: int,
    objects: int,
    nodes: int,
    creators: int,
    scrape_seconds: float,
    quiet_below: float,
    warm_objects: int = 100,
) -> dict[str, Any]:
    """p99 to pickup of `objects` ContainerCheckpoints, metrics off against on, in `rounds` rounds."""
    env.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": controlplane.NAMESPACE}})
    fleet = Fleet(env, nodes)
    batches: dict[str, list[dict[str, Any]]] = {s: [] for s in SETTINGS}
    for r in range(rounds):
        for setting in _order(r):
            fleet.start(setting)
            try:
                # A fresh process's first objects pay for its imports and connections: not counted.
                controlplane.run(env, warm_objects, nodes, fleet.agent_pids(), creators)
                quiet = wait_quiet(quiet_below) if quiet_below > 0 else {}
                with scraping(fleet.metrics_ports or {}, scrape_seconds) as scrapes, conditions() as host:
                    batch = controlplane.run(env, objects, nodes, fleet.agent_pids(), creators)
                batch |= {"round": r, "metrics": setting, "host": host | quiet, "scrapes": scrapes.__dict__}
                batches[setting].append(batch)
                print(
                    f"metrics {setting}, round {r}: p99 to pickup {batch['toPickupP99']:.3f}s, "
                    f"controller RSS {batch['controllerRssMiB']:.0f} MiB, scrapes {scrapes.__dict__}",
                    flush=True,
                )
            finally:
                fleet.stop()
    p99 = {s: [b["toPickupP99"] for b in batches[s]] for s in SETTINGS}
    p50 = {s: [b["toPickupP50"] for b in batches[s]] for s in SETTINGS}
    rss = {s: [b["controllerPeakRssMiB"] for b in batches[s]] for s in SETTINGS}
    # CPU is steadier than a p99 on a busy host: what each setting cost the controller and agents.
    cpu = {g: {s: [b["cpuSeconds"][g] for b in batches[s]] for s in SETTINGS} for g in ("controller", "agents")}
    return {
        "objects": objects,
        "nodes": nodes,
        "creators": creators,
        "rounds": rounds,
        "toPickupP99": _ratio(p99[METRICS_ON], p99[METRICS_OFF]),
        "toPickupP50": _ratio(p50[METRICS_ON], p50[METRICS_OFF]),
        "controllerPeakRssMiB": _ratio(rss[METRICS_ON], rss[METRICS_OFF]),
        "controllerCpuSeconds": _ratio(cpu["controller"][METRICS_ON], cpu["controller"][METRICS_OFF]),
        "agentsCpuSeconds": _ratio(cpu["agents"][METRICS_ON], cpu["agents"][METRICS_OFF]),
        "batches": batches,
    }


@dataclass(frozen=True)
class MetricsStack(datapath.Stack):
    """This tree's controller and agent with metrics off (port 0) or on (a port of each one's own)."""

    env: LocalEnv | None = field(default=None, compare=False, hash=False)
    ports: list[int] = field(default_factory=list, compare=False, hash=False)

    def settings(self) -> dict[str, str]:
        if self.name == METRICS_OFF:
            return {"CHECKPOINTER_METRICS_PORT": "0"}
        assert self.env is not None
        port = self.env._new_port()
        self.ports.append(port)
        return {"CHECKPOINTER_METRICS_PORT": str(port)}

    def scraped(self) -> dict[str, int]:
        # DataPath.use starts the controller first, then the agent.
        return dict(zip(("controller", "agent"), self.ports[-2:], strict=False)) if self.name == METRICS_ON else {}


def data_path(
    workdir: Path,
    out: Path,
    rounds: int,
    warmup: int,
    size_mib: int,
    settle: str,
    quiet_below: float,
    scrape_seconds: float,
) -> dict[str, Any]:
    """c at `size_mib`, zstd, over loopback, metrics off against on, in `rounds` rounds after `warmup`."""
    agent_settings = {"CHECKPOINTER_PODMAN_MODE": "cli"}
    rows = {s: datapath.Row(size_mib, "zstd") for s in SETTINGS}
    scrapes = {s: Scrapes() for s in SETTINGS}
    with contextlib.ExitStack() as stack:
        stack.enter_context(datapath.reflink_filesystem(workdir / "s3", 8 + size_mib // 256))
        env = LocalEnv.up(workdir, ["node-a", "node-b"], agent_settings=agent_settings)
        try:
            stacks = {s: MetricsStack(s, env=env) for s in SETTINGS}
            bench = datapath.DataPath(
                env, rounds, warmup=warmup, settle=settle, quiet_below=quiet_below, agent_settings=agent_settings
            )
            for r in range(warmup + rounds):
                for setting in _order(r):
                    bench.use(stacks[setting])
                    counted = r >= warmup
                    row = rows[setting] if counted else datapath.Row(size_mib, "zstd")
                    with scraping(stacks[setting].scraped(), scrape_seconds) as got:
                        bench.checkpointer(row, warmup=not counted)
                    if counted:
                        total = scrapes[setting]
                        total.ok, total.failed = total.ok + got.ok, total.failed + got.failed
                        total.seconds, total.series = total.seconds + got.seconds, max(total.series, got.series)
                    print(f"metrics {setting}, round {r}: c {row.base_checkpointer_s[-1]:.2f}s", flush=True)
                bench.rounds += 1
        finally:
            shutil.copytree(env.supervisor.log_dir, out / "logs-metrics-datapath", dirs_exist_ok=True)
            env.down()
    c = {s: rows[s].base_checkpointer_s for s in SETTINGS}
    rss = {s: rows[s].base_agent_peak_rss_mib for s in SETTINGS}
    return {
        "sizeMiB": size_mib,
        "compression": "zstd",
        "link": datapath.LOOPBACK,
        "rounds": rounds,
        "warmup": warmup,
        "checkpointerSeconds": _ratio(c[METRICS_ON], c[METRICS_OFF]),
        "agentPeakRssMiB": _ratio(rss[METRICS_ON], rss[METRICS_OFF]),
        "scrapes": {s: scrapes[s].__dict__ for s in SETTINGS},
        "host": {s: rows[s].host_summary() for s in SETTINGS},
        "runs": {s: rows[s].base_checkpointer_s for s in SETTINGS},
    }
