"""The control plane: N ContainerCheckpoints across many simulated nodes.

The agents here run an instant runtime (bench/instant_agent.py): it checkpoints nothing and returns
at once, so the figures are the controller's and the agents' own latency, not podman's.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes

from bench.stats import cpu_seconds, memory_kib, percentile
from localenv.env import LocalEnv
from localenv.procs import wait_until

GROUP, VERSION = "checkpointer.dev", "v1alpha1"
NAMESPACE = "bench"


def start_agents(env: LocalEnv, nodes: int) -> list[int]:
    env.apply(*[{"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"sim-{i:02d}"}} for i in range(nodes)])
    pids = []
    for i in range(nodes):
        name = f"sim-{i:02d}"
        proc_env = env.operator_env(
            {
                "CHECKPOINTER_NODE_NAME": name,
                "CHECKPOINTER_SPOOL_DIR": str(env.workdir / "sim-spool" / name),
            }
        )
        proc = env.supervisor.start(f"agent-{name}", [sys.executable, "-m", "bench.instant_agent"], env=proc_env)
        pids.append(proc.popen.pid)

    def all_leases() -> bool:
        return len(env.kubectl("get", "lease", "-n", "checkpointer-system", "-o", "name").stdout.split()) >= nodes

    wait_until(f"{nodes} agent Leases", all_leases, timeout=600, interval=2)
    return pids


WRITE_VERBS = ("POST", "PATCH", "PUT", "DELETE", "APPLY")
_REQUESTS = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$", re.M)


def api_writes(env: LocalEnv) -> Counter[str]:
    """Write requests the API server has served so far, by resource (from its own metrics)."""
    text = env.kubectl("get", "--raw", "/metrics").stdout
    writes: Counter[str] = Counter()
    for m in _REQUESTS.finditer(text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if labels.get("verb") in WRITE_VERBS:
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            writes[f"{labels['verb']} {resource}"] += int(float(m["value"]))
    return writes


def run(env: LocalEnv, count: int, nodes: int, agent_pids: list[int], creators: int) -> dict[str, Any]:
    """Create `count` objects from `creators` client threads at once, as fast as the API server takes them.

    One creator is `kubectl apply` of a folder of manifests, which creates them one after another.
    """
    api = kubernetes.config.new_client_from_config(config_file=str(env.kubeconfig))  # type: ignore[no-untyped-call]
    custom = kubernetes.client.CustomObjectsApi(api)
    batch = uuid.uuid4().hex[:6]
    created: dict[str, float] = {}
    scheduled: dict[str, float] = {}
    picked: dict[str, float] = {}
    done = threading.Event()

    def watch() -> None:
        # A watch may end early (server timeouts, a reconnect); resume from the last version seen.
        version = ""
        deadline = time.monotonic() + 900
        while len(picked) < count and time.monotonic() < deadline:
            w = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
            try:
                for event in w.stream(  # type: ignore[no-untyped-call]
                    custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    NAMESPACE,
                    "containercheckpoints",
                    label_selector=f"bench-batch={batch}",
                    resource_version=version,
                    timeout_seconds=60,
                ):
                    now = time.time()
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    name = obj["metadata"]["name"]
                    status = obj.get("status") or {}
                    if status.get("phase") and name not in scheduled:
                        scheduled[name] = now
                    if status.get("startTime") and name not in picked:
                        # The agent's own clock at pickup (microseconds): a watcher's view comes later
                        # by however long the API server takes to send it the event under load.
                        picked[name] = datetime.datetime.fromisoformat(status["startTime"]).timestamp()
                    if len(picked) >= count:
                        w.stop()  # type: ignore[no-untyped-call]
            except kubernetes.client.ApiException as e:
                if e.status != 410:
                    raise
                version = ""  # too old: start from the current state
        done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(1)  # the watch is open before the first create

    def create(i: int) -> None:
        name = f"cp-{batch}-{i:04d}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ContainerCheckpoint",
            "metadata": {"name": name, "labels": {"bench-batch": batch}},
            "spec": {"nodeName": f"sim-{i % nodes:02d}", "containers": ["workload"]},
        }
        created[name] = time.time()
        custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "containercheckpoints", body)

    processes = {p.name: p.popen.pid for p in env.supervisor.processes if p.alive()}
    groups = {
        "controller": [processes["controller"]],
        "agents": [pid for name, pid in processes.items() if name.startswith("agent-")],
        "kube-apiserver": [processes["kube-apiserver"]],
        "etcd": [processes["etcd"]],
        "benchmark client (creates and watches)": [os.getpid()],
    }
    cpu_before = {g: sum(cpu_seconds(pid) for pid in pids) for g, pids in groups.items()}
    writes_before = api_writes(env)
    start = time.monotonic()
    with ThreadPoolExecutor(creators) as pool:
        list(pool.map(create, range(count)))
    create_seconds = time.monotonic() - start
    done.wait(900)
    to_scheduled = [scheduled[n] - created[n] for n in created if n in scheduled]
    to_pickup = [picked[n] - created[n] for n in created if n in picked]
    wall = time.monotonic() - start
    cpu = {g: round(sum(cpu_seconds(pid) for pid in pids) - cpu_before[g], 1) for g, pids in groups.items()}
    writes = api_writes(env) - writes_before
    controller = processes["controller"]
    alive = [pid for pid in agent_pids if Path(f"/proc/{pid}/status").read_text().find("VmRSS") >= 0]
    agent_rss = [memory_kib(pid, "VmRSS") / 1024 for pid in alive]
    # The next batch starts on a quiet cluster: this one's deletions (finalizers) are done first.
    # kubectl's own wait asks for each object in turn, under its client-side rate limit: minutes.
    selector = f"bench-batch={batch}"
    env.control_plane.kubectl("delete", "ccp", "-n", NAMESPACE, "-l", selector, "--wait=false", timeout=600)

    def deleted() -> bool:
        listed: dict[str, Any] = custom.list_namespaced_custom_object(  # type: ignore[assignment]
            GROUP, VERSION, NAMESPACE, "containercheckpoints", label_selector=selector, limit=1
        )
        return not listed["items"]

    wait_until(f"batch {batch} deleted", deleted, timeout=600, interval=1)
    return {
        "objects": count,
        "creators": creators,
        "nodes": nodes,
        "runtime": "instant (no podman: the agents' runtime returns at once)",
        "createSeconds": create_seconds,
        "createdPerSecond": count / create_seconds,
        "scheduled": len(to_scheduled),
        "pickedUp": len(to_pickup),
        "toScheduledP50": percentile(to_scheduled, 50),
        "toScheduledP99": percentile(to_scheduled, 99),
        "toPickupP50": percentile(to_pickup, 50),
        "toPickupP99": percentile(to_pickup, 99),
        "controllerRssMiB": memory_kib(controller, "VmRSS") / 1024,
        "controllerPeakRssMiB": memory_kib(controller, "VmHWM") / 1024,
        "agentRssMiBMax": max(agent_rss),
        "agentRssMiBMedian": sorted(agent_rss)[len(agent_rss) // 2],
        "agentsAlive": len(alive),
        "wallSeconds": wall,
        "cpuSeconds": cpu,
        # Every write costs the API server and etcd; per object, so that runs of any N compare.
        "apiWritesPerObject": round(sum(writes.values()) / count, 2),
        "apiWritesPerObjectByRequest": {k: round(v / count, 2) for k, v in writes.most_common()},
    }
