"""Schedules at scale: N CheckpointSchedules firing every minute across many simulated nodes.

Every schedule fires `* * * * *` with an instant agent behind it (bench/instant_agent.py), so the
figures are the controller's: when each checkpoint is created relative to its scheduled time (a
watch on ContainerCheckpoints records when each one's first event arrives; creationTimestamp has
only whole seconds; the controller creates them ahead of time, so these are negative when on
time), how late its node's agent starts it (the agent's status.startTime, in microseconds), the
controller's memory, and how many objects retention leaves.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import kubernetes

from bench.controlplane import api_writes
from bench.fleet import METRICS_OFF, Fleet, node_names
from bench.stats import conditions, cpu_seconds, memory_kib, percentile, reset_peak
from checkpointer.services.schedule_rules import CREATE_AHEAD_SECONDS
from localenv.env import LocalEnv

GROUP, VERSION = "checkpointer.dev", "v1alpha1"
SCHEDULE_LABEL = f"{GROUP}/schedule"
SCHEDULED_TIME = f"{GROUP}/scheduled-time"
# The first counted run is the first minute whose checkpoints the controller creates (CREATE_AHEAD_SECONDS
# before it) at least this long after the last schedule was created: a run it could not yet know of is not late.
LEAD_SECONDS = 5.0


def namespaces(count: int) -> list[str]:
    return [f"bench-sched-{i}" for i in range(count)]


def _time(text: str | None) -> float | None:
    return datetime.datetime.fromisoformat(text).timestamp() if text else None


@dataclass
class Seen:
    """One ContainerCheckpoint a schedule made, as the benchmark's watch saw it."""

    scheduled: float | None = None  # the run it stands for (its annotation)
    first_event: float = 0.0  # when its first event reached the watch (this host's clock)
    created: float | None = None  # metadata.creationTimestamp (whole seconds)
    picked: float | None = None  # the agent's status.startTime
    phase: str | None = None


@dataclass
class Watch:
    """Every ContainerCheckpoint with a schedule label, in all namespaces, from before the first run."""

    custom: Any
    seen: dict[str, Seen] = field(default_factory=dict)
    stopping: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        version = ""
        while not self.stopping.is_set():
            w = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in w.stream(  # type: ignore[no-untyped-call]
                    self.custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    "containercheckpoints",
                    label_selector=SCHEDULE_LABEL,
                    resource_version=version,
                    timeout_seconds=30,
                ):
                    self.record(event, time.time())
                    version = event["object"]["metadata"]["resourceVersion"]
                    if self.stopping.is_set():
                        w.stop()  # type: ignore[no-untyped-call]
            except kubernetes.client.ApiException as e:
                if e.status != 410:
                    self.errors.append(str(e)[:300])
                    time.sleep(1)
                version = ""  # too old: start from the current state (objects seen keep their first time)
            except Exception as e:  # a dropped connection: resume
                self.errors.append(repr(e)[:300])
                time.sleep(0.2)

    def record(self, event: dict[str, Any], now: float) -> None:
        obj = event["object"]
        meta = obj["metadata"]
        key = f"{meta['namespace']}/{meta['name']}"
        seen = self.seen.get(key)
        if seen is None:
            seen = self.seen[key] = Seen(first_event=now)
            seen.scheduled = _time((meta.get("annotations") or {}).get(SCHEDULED_TIME))
            seen.created = _time(meta.get("creationTimestamp"))
        status = obj.get("status") or {}
        if seen.picked is None and status.get("startTime"):
            seen.picked = _time(status["startTime"])
        seen.phase = status.get("phase") or seen.phase


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
    }


def run(
    env: LocalEnv,
    count: int,
    nodes: int,
    namespace_count: int,
    runs: int,
    keep_last: int = 2,
    creators: int = 8,
    metrics: str = METRICS_OFF,
    warm_up: int = 1,
) -> dict[str, Any]:
    """Create `count` schedules, then measure `runs` minutes of them firing, after `warm_up` minutes
    reported but not counted (the first run after a burst of new schedules meets their first status
    writes, and processes that run their code for the first time). Starts the controller and the
    agents (Fleet) and stops them at the end."""
    tenants = namespaces(namespace_count)
    env.apply(*[{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}} for ns in tenants])
    fleet = Fleet(env, nodes, tenants=tenants)
    fleet.start(metrics)
    api = fleet.api()
    custom = kubernetes.client.CustomObjectsApi(api)
    watch = Watch(custom)
    watcher = threading.Thread(target=watch.run, name="watch", daemon=True)
    watcher.start()
    controller = fleet.controller_pid()
    time.sleep(2)  # the controller has settled and the watch is open before the first schedule
    reset_peak(controller)
    rss_samples: list[tuple[float, float]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            try:
                rss_samples.append((time.time(), memory_kib(controller, "VmRSS") / 1024))
            except (OSError, KeyError):
                return

    threading.Thread(target=sample, name="rss", daemon=True).start()
    batch = uuid.uuid4().hex[:6]
    node = node_names(nodes)

    def create(i: int) -> None:
        ns = tenants[i % len(tenants)]
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CheckpointSchedule",
            "metadata": {"name": f"s-{batch}-{i:04d}", "namespace": ns, "labels": {"bench-batch": batch}},
            "spec": {
                "schedule": "* * * * *",
                "template": {"nodeName": node[i % nodes], "containers": [f"workload-{ns}"]},
                "retention": {"keepLast": keep_last},
            },
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, "checkpointschedules", body)

    started = time.time()
    with ThreadPoolExecutor(creators) as pool:
        list(pool.map(create, range(count)))
    created = time.time()
    first = math.ceil((created + LEAD_SECONDS + CREATE_AHEAD_SECONDS) / 60) * 60
    every_run = [float(first + 60 * k) for k in range(warm_up + runs)]
    boundaries = every_run[warm_up:]
    print(
        f"schedules: {count} created in {created - started:.1f}s; {warm_up} warm-up run(s), then counting the runs at "
        + ", ".join(datetime.datetime.fromtimestamp(b, datetime.UTC).strftime("%H:%M:%S") for b in boundaries),
        flush=True,
    )
    # From the creations of the first counted run on.
    time.sleep(max(0.0, boundaries[0] - CREATE_AHEAD_SECONDS - time.time() - 1))
    cpu_before = cpu_seconds(controller)
    writes_before = api_writes(env)
    window_start = time.time()

    def picked(boundary: float) -> int:
        return sum(1 for s in list(watch.seen.values()) if s.scheduled == boundary and s.picked is not None)

    # Each run is given until the next one begins; the last one up to 50 s to be picked up in full.
    last = boundaries[-1]
    # The host's load and CPU wait over the counted runs: other tenants of its cores show there.
    with conditions() as host:
        while time.time() < last + 50 and not (time.time() > last + 2 and picked(last) >= count):
            time.sleep(0.5)
    window = time.time() - window_start
    cpu = cpu_seconds(controller) - cpu_before
    writes = api_writes(env) - writes_before
    # Retention runs after a checkpoint finishes: give it a moment before counting what is left.
    time.sleep(10)
    sampling.set()
    rss_after = memory_kib(controller, "VmRSS") / 1024
    peak = memory_kib(controller, "VmHWM") / 1024
    left: dict[str, Any] = custom.list_cluster_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, "containercheckpoints", label_selector=SCHEDULE_LABEL
    )
    per_schedule = Counter(item["metadata"]["labels"][SCHEDULE_LABEL] for item in left["items"])
    phases = Counter((item.get("status") or {}).get("phase", "") for item in left["items"])
    schedules: dict[str, Any] = custom.list_cluster_custom_object(  # type: ignore[assignment]
        GROUP, VERSION, "checkpointschedules", label_selector=f"bench-batch={batch}"
    )
    last_iso = datetime.datetime.fromtimestamp(last, datetime.UTC)
    recorded_last = sum(
        1
        for s in schedules["items"]
        if (t := (s.get("status") or {}).get("lastScheduleTime"))
        and abs(datetime.datetime.fromisoformat(t).timestamp() - last_iso.timestamp()) < 1
    )
    watch.stopping.set()

    per_run = []
    all_created: list[float] = []
    all_picked: list[float] = []
    all_stamp: list[float] = []
    for boundary in every_run:
        counted = boundary in boundaries
        mine = [s for s in list(watch.seen.values()) if s.scheduled is not None and abs(s.scheduled - boundary) < 0.5]
        to_created = [s.first_event - boundary for s in mine]
        to_picked = [s.picked - boundary for s in mine if s.picked is not None]
        stamped = [s.created - boundary for s in mine if s.created is not None]
        if counted:
            all_created += to_created
            all_picked += to_picked
            all_stamp += stamped
        per_run.append(
            {
                "scheduledTime": datetime.datetime.fromtimestamp(boundary, datetime.UTC).isoformat(),
                "warmUp": not counted,
                "created": len(mine),
                "pickedUp": len(to_picked),
                "toCreated": _stats(to_created),
                "toPickup": _stats(to_picked),
                "toCreationTimestamp": _stats(stamped),
                # When the first and the last of the run's checkpoints appeared.
                "createdSpreadSeconds": (max(to_created) - min(to_created)) if to_created else None,
            }
        )
    fleet.stop()
    # Checkpoints the counted window holds that stand for no minute of it: a run made twice or off time.
    times = [s.scheduled for s in watch.seen.values() if s.scheduled is not None]
    outside = [t for t in times if boundaries[0] <= t <= last and all(abs(t - b) >= 0.5 for b in boundaries)]
    return {
        "schedules": count,
        "nodes": nodes,
        "namespaces": namespace_count,
        "runs": runs,
        "warmUpRuns": warm_up,
        "keepLast": keep_last,
        "metrics": metrics,
        "createSchedulesSeconds": created - started,
        "expectedPerRun": count,
        "perRun": per_run,
        "toCreated": _stats(all_created),
        "toPickup": _stats(all_picked),
        "toCreationTimestamp": _stats(all_stamp),
        "createdAll": len(all_created),
        "pickedUpAll": len(all_picked),
        "missed": runs * count - len(all_created),
        "offSchedule": len(outside),
        "controllerRssMiBAfter": rss_after,
        "controllerPeakRssMiB": peak,
        "controllerPeakRssMiBSampled": max((r for _, r in rss_samples), default=float("nan")),
        "controllerCpuSecondsPerRun": cpu / max(runs, 1),
        "windowSeconds": window,
        "host": host,
        "apiWritesPerCheckpoint": round(sum(writes.values()) / max(len(all_created), 1), 2),
        "apiWritesByRequest": dict(writes.most_common(12)),
        "objectsAtEnd": sum(per_schedule.values()),
        "objectsPerScheduleMax": max(per_schedule.values(), default=0),
        "phasesAtEnd": dict(phases),
        "schedulesWithLastRunRecorded": recorded_last,
        "watchErrors": watch.errors[:5],
    }
