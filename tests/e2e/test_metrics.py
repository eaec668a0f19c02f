"""Metrics scraped by a real Prometheus: exact counts after a known sequence, and the chart's alerts load.

Debian's prometheus and promtool (hack/install.sh); the local environment's controller and agents
(docs/metrics.md). No mocks: the counts come from the processes through Prometheus' HTTP API.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import create, reason_of, unique
from invariants import check_invariants
from localenv import chart
from localenv.env import NAMESPACE, LocalEnv
from localenv.images import COUNTER, owned_by, read_count
from localenv.procs import require, run, wait_until
from localenv.prometheus import Prometheus
from tenants import TEAM_A, Tenants

pytestmark = pytest.mark.e2e

RULES_VALUES = {"metrics": {"prometheusRule": {"enabled": True}}}


def rules_file(directory: Path) -> Path:
    """The chart's PrometheusRule, rendered, as a Prometheus rule file (its spec.groups)."""
    rules = [o for o in chart.render(NAMESPACE, RULES_VALUES) if o["kind"] == "PrometheusRule"]
    assert len(rules) == 1, "metrics.prometheusRule.enabled renders one PrometheusRule"
    path = directory / "checkpointer-rules.yml"
    path.write_text(yaml.safe_dump({"groups": rules[0]["spec"]["groups"]}))
    return path


@pytest.fixture
def prometheus(local_env: LocalEnv, tmp_path: Path) -> Iterator[tuple[Prometheus, Path]]:
    require(run(["sh", "-c", "command -v prometheus promtool"], check=False).returncode == 0, "prometheus missing")
    rules = rules_file(tmp_path)
    server = Prometheus.start(local_env, [rules])
    try:
        yield server, rules
    finally:
        server.stop()


def test_prometheus_counts_a_known_sequence_exactly(local_env: LocalEnv, prometheus: tuple[Prometheus, Path]) -> None:
    server, rules = prometheus
    env = local_env
    # The chart's alerts are valid rules, and this Prometheus loaded every one of them.
    checked = run(["promtool", "check", "rules", str(rules)], check=False)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    loaded = {r["name"] for g in server.api("rules")["groups"] for r in g["rules"]}
    assert loaded == {
        "CheckpointerCheckpointsFailing",
        "CheckpointerRestoresFailing",
        "CheckpointerStorageUnavailable",
        "CheckpointerSpoolNearlyFull",
        "CheckpointerAgentDown",
    }

    namespace = unique("metrics")
    env.kubectl("create", "namespace", namespace)
    # node-b's podman runs as the CLI, which reports CRIU's statistics of an export; node-a restores.
    node = env.nodes["node-b"]
    containers = [unique("counter") for _ in range(2)]
    for container in containers:
        node.podman("run", "-d", *owned_by(namespace), "--name", container, COUNTER)
    time.sleep(1)
    read_count(node, containers[0])
    export = {"nodeName": "node-b", "export": {}, "compress": "none"}
    names = [create(env, "ContainerCheckpoint", {**export, "containers": [c]}, namespace) for c in containers]
    missing = create(env, "ContainerCheckpoint", {**export, "containers": [unique("absent")]}, namespace)
    finished = {n: env.wait_phase("ccp", n, ["Succeeded", "Failed"], namespace=namespace) for n in [*names, missing]}
    assert [finished[n]["status"]["phase"] for n in names] == ["Succeeded", "Succeeded"], finished
    assert finished[missing]["status"]["phase"] == "Failed"
    for container in containers:
        node.podman("rm", "-f", container)
    restore = create(
        env, "ContainerRestore", {"nodeName": "node-a", "source": {"checkpointRef": {"name": names[0]}}}, namespace
    )
    restored = env.wait_phase("crst", restore, ["Succeeded", "Failed"], namespace=namespace)
    assert restored["status"]["phase"] == "Succeeded", restored["status"]
    env.nodes["node-a"].podman("rm", "-f", containers[0])

    where = f'namespace="{namespace}"'
    by = ("result", "reason")
    expected_checkpoints = {("Succeeded", "Succeeded"): 2.0, ("Failed", "ContainerNotFound"): 1.0}

    def scraped() -> bool:
        checkpoints = server.values(f"sum by (result, reason) (checkpointer_checkpoints_total{{{where}}})", by)
        restores = server.values(f"sum by (result, reason) (checkpointer_restores_total{{{where}}})", by)
        return checkpoints == expected_checkpoints and restores == {("Succeeded", "Succeeded"): 1.0}

    wait_until("Prometheus scraped the sequence's counts", scraped, timeout=15, interval=0.5)
    # Exact, and counted once in the whole system: the sum over every process (controller, agents).
    assert server.values(f"sum(checkpointer_checkpoints_total{{{where}}})", ()) == {(): 3.0}
    assert server.values(f"count(checkpointer_checkpoints_total{{{where}}} > 0)", ()) == {(): 2.0}

    def one(promql: str) -> float:
        values = server.values(promql, ())
        assert set(values) == {()}, (promql, values)
        return values[()]

    # Histograms agree with the counters: a duration per final phase, a size per archive stored.
    assert one(f"sum(checkpointer_checkpoint_duration_seconds_count{{{where}}})") == 3.0
    assert one(f"sum(checkpointer_restore_duration_seconds_count{{{where}}})") == 1.0
    assert one(f"sum(checkpointer_archive_size_bytes_count{{{where}}})") == 2.0
    sizes = sum(a["size"] for n in names for a in finished[n]["status"]["archives"])
    assert one(f"sum(checkpointer_archive_size_bytes_sum{{{where}}})") == float(sizes)
    assert one('sum(checkpointer_checkpoint_frozen_seconds_count{node="node-b"})') >= 2.0
    # What went into the bucket and came out of it, at least this sequence's bytes.
    assert one('sum(checkpointer_uploaded_bytes_total{node="node-b",storage="local"})') >= sizes
    assert one('sum(checkpointer_downloaded_bytes_total{node="node-a",storage="local"})') > 0
    # The controller's view: storage, agents, nothing left in flight; each agent's spool.
    assert server.values("checkpointer_storage_available", ("storage",))[("local",)] == 1.0
    agents = server.values("checkpointer_agent_up", ("node",))
    assert agents[("node-a",)] == agents[("node-b",)] == 1.0, agents
    assert {("node-a",), ("node-b",)} <= set(server.values("checkpointer_spool_free_bytes > 0", ("node",)))
    in_flight = server.values("checkpointer_objects_in_flight", ("kind", "node"))
    assert ("checkpoint", "node-b") in in_flight and ("restore", "node-a") in in_flight, in_flight
    # No label holds an object's name.
    series = server.api("series", **{"match[]": '{__name__=~"checkpointer_.*"}'})
    every_value = {v for s in series for v in s.values()}
    assert not every_value & {*names, missing, restore, *containers}
    check_invariants(env)


def every_series(env: LocalEnv) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    """Each process' series as it serves them now: (name, labels, value) by process."""
    found = {}
    for process, port in sorted(env.metrics_ports.items()):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        found[process] = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]
    return found


def test_made_up_node_names_add_no_series(local_env: LocalEnv, tenants: Tenants) -> None:
    """A tenant's spec.nodeName reaches the metrics only as a node with an agent: made-up ones are
    counted under node="" (docs/metrics.md), and their series never appear, neither now nor after."""
    env = local_env
    made_up = [unique("made-up-node") for _ in range(5)]
    names = [tenants.create("ContainerCheckpoint", TEAM_A, {"containers": ["web"]}, node=n) for n in made_up]
    for name in names:
        failed = tenants.finished("ContainerCheckpoint", TEAM_A, name)
        assert failed["status"]["phase"] == "Failed", failed["status"]
        assert reason_of(failed) == "NodeNotFound", failed["status"]

    def counted_under_no_node() -> float:
        return sum(
            value
            for series in every_series(env).values()
            for name, labels, value in series
            if name == "checkpointer_checkpoints_total"
            and labels == {"namespace": TEAM_A, "node": "", "result": "Failed", "reason": "NodeNotFound"}
        )

    assert counted_under_no_node() >= len(made_up)

    def named() -> set[str]:
        return {v for series in every_series(env).values() for _, labels, _ in series for v in labels.values()}

    assert not named() & set(made_up)
    for name in names:
        tenants.delete("ContainerCheckpoint", name)
    assert not named() & set(made_up)
    # The nodes with an agent keep their own series.
    assert {"node-a", "node-b"} <= named()
    check_invariants(env)
