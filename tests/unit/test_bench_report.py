"""The benchmark's own arithmetic: what the schedule watch records and how the new tables read."""

from __future__ import annotations

from typing import Any

from bench.__main__ import metrics_cost_markdown, schedules_markdown
from bench.metrics_cost import _order, _ratio
from bench.schedules import Watch
from bench.tenant_agent import TenantRuntime


def _event(name: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = {
        "name": name,
        "namespace": "bench-sched-0",
        "resourceVersion": "1",
        "creationTimestamp": "2026-12-05T12:40:01Z",
        "annotations": {"checkpointer.dev/scheduled-time": "2026-12-05T12:40:00.000000Z"},
    }
    return {"type": "MODIFIED" if status else "ADDED", "object": {"metadata": meta, "status": status or {}}}


def test_watch_keeps_the_first_event_and_the_agents_start_time() -> None:
    watch = Watch(custom=None)
    scheduled = 1796474400.0  # 2026-12-05T12:40:00Z
    watch.record(_event("s-1-1796474400"), scheduled + 0.3)
    watch.record(_event("s-1-1796474400", {"phase": "Checkpointing", "startTime": "2026-12-05T12:40:00.412345Z"}), 9e9)
    seen = watch.seen["bench-sched-0/s-1-1796474400"]
    assert seen.scheduled == scheduled
    assert seen.first_event == scheduled + 0.3  # a later event does not move the creation
    assert seen.created == scheduled + 1  # creationTimestamp: whole seconds only
    assert seen.picked is not None and abs(seen.picked - (scheduled + 0.412345)) < 1e-6
    assert seen.phase == "Checkpointing"


def test_rounds_alternate_and_ratios_are_per_round() -> None:
    assert [_order(r)[0] for r in range(4)] == ["off", "on", "off", "on"]
    r = _ratio(on=[1.05, 2.0, 0.9], off=[1.0, 1.0, 1.0])
    assert r["on_over_off"] == 1.05  # of the medians
    assert r["spread"]["on_over_off"]["min"] == 0.9 and r["spread"]["on_over_off"]["max"] == 2.0


def test_tables_have_a_row_per_run_and_per_figure() -> None:
    stats = {"p50": 0.2, "p99": 1.5, "max": 1.9}
    run = {"scheduledTime": "2026-12-05T12:40:00+00:00", "created": 1000, "toCreated": stats, "toPickup": stats}
    row = {
        "schedules": 1000,
        "nodes": 50,
        "namespaces": 4,
        "runs": 2,
        "expectedPerRun": 1000,
        "perRun": [run, run],
        "createdAll": 2000,
        "toCreated": stats,
        "toPickup": stats,
        "controllerPeakRssMiB": 180.0,
        "controllerRssMiBAfter": 170.0,
        "controllerCpuSecondsPerRun": 9.5,
        "apiWritesPerCheckpoint": 7.0,
        "objectsAtEnd": 2000,
        "keepLast": 2,
        "objectsPerScheduleMax": 2,
    }
    table = [line for line in schedules_markdown([row]) if line.startswith("| 1000 |")]
    assert len(table) == 4  # two runs, all of them, and the memory row
    assert "| 12:40:00 | 1000 / 1000 | 0.20 / 1.50 / 1.90 | - / - / - | 0.20 / 1.50 / 1.90 |" in table[0]
    cost = {"controlPlane": {"objects": 1000, "nodes": 50, "creators": 1, "rounds": 3}}
    cost["controlPlane"] |= {k: _ratio([1.0], [1.0]) for k in ("toPickupP99", "toPickupP50", "controllerPeakRssMiB")}
    assert sum("1.000 (1.000-1.000)" in line for line in metrics_cost_markdown(cost)) == 3


def test_each_tenant_has_its_own_workload() -> None:
    runtime = TenantRuntime(["team-a", "team-b"])
    found = runtime.inspect("workload-team-b")
    assert found is not None and found.label("checkpointer.dev/namespace") == "team-b"
    assert runtime.inspect("workload") is not None and runtime.inspect("workload-team-c") is None
