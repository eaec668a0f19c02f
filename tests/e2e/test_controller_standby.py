"""A second controller stands by, takes over when the leader is killed, and nothing is scheduled twice."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest

from helpers import counter, create, get, until
from invariants import check_invariants
from localenv.controlplane import ControlPlane
from localenv.env import LocalEnv
from localenv.procs import require

pytestmark = pytest.mark.e2e

LEADER, STANDBY = "controller", "controller-2"
# The Lease lasts 10 s after the killed leader's last renewal, which came at most 2 s before the kill.
TAKEOVER_LIMIT_SECONDS = 15.0


def log_of(env: LocalEnv, name: str, since: int = 0) -> str:
    """A process's log from byte `since` on: a name started again appends to the same file."""
    path = env.supervisor.log_dir / f"{name}.log"
    return path.read_bytes()[since:].decode(errors="replace") if path.exists() else ""


def log_size(env: LocalEnv, name: str) -> int:
    path = env.supervisor.log_dir / f"{name}.log"
    return path.stat().st_size if path.exists() else 0


def created(env: LocalEnv, kind: str, prefix: str, spec: dict[str, Any]) -> tuple[str, str]:
    """A new object of `kind`, as phase() and wait_phase() name it: (its short kind, its name)."""
    return ("ccp" if kind == "ContainerCheckpoint" else "crst"), create(env, kind, spec, prefix=prefix)


def phase(env: LocalEnv, kind: str, name: str) -> str:
    return str(((get(env, kind, name) or {}).get("status") or {}).get("phase") or "")


def scheduled_events(env: LocalEnv, kind: str, name: str) -> int:
    uid = (env.read(kind, name) or {})["metadata"]["uid"]
    selector = f"involvedObject.name={name},reason=Scheduled"
    return sum(1 for e in env.list_objects("events", "default", selector) if e["involvedObject"].get("uid") == uid)


def healthz(env: LocalEnv, name: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{env.health_ports[name]}/healthz", timeout=10) as reply:
        return int(reply.status)


def alive(env: LocalEnv, name: str) -> bool:
    return any(p.name == name and p.alive() for p in env.supervisor.processes)


def back_to_one_controller(env: LocalEnv) -> None:
    """The other tests expect one controller named as the environment names it, and leading."""
    if not alive(env, LEADER):
        env.stop_controller(LEADER)  # forgets the killed process
        env.start_controller()
    # SIGTERM: the standby-turned-leader gives the Lease up and the restarted controller takes it at once.
    env.stop_controller(STANDBY)
    until(f"{LEADER} leads again", lambda: env.controller_leader() == LEADER, last=env.logs, timeout=30)
    env.wait_storage_available()


def test_standby_takes_over_from_a_killed_leader_and_nothing_is_scheduled_twice(local_env: LocalEnv) -> None:
    env = local_env
    require(isinstance(env.control_plane, ControlPlane), "the controllers must be this environment's own processes")
    until(f"{LEADER} holds the controller Lease", lambda: env.controller_leader() == LEADER, last=env.logs, timeout=60)
    containers = {"node-a": [counter(env, "node-a") for _ in range(2)], "node-b": [counter(env, "node-b")]}
    objects: dict[str, list[tuple[str, str]]] = {"before": [], "around": [], "after": []}
    restored: list[tuple[str, str]] = []
    since = log_size(env, STANDBY)
    env.start_controller(name=STANDBY)
    try:
        # Standing by: alive for its liveness probe, scheduling nothing.
        until(
            "the second controller reports standing by",
            lambda: f"standing by: the controller Lease is held by {LEADER}" in log_of(env, STANDBY, since),
            last=env.logs,
            timeout=60,
        )
        assert healthz(env, STANDBY) == 200
        source = created(
            env,
            "ContainerCheckpoint",
            "ccp-before",
            {"nodeName": "node-a", "containers": [containers["node-a"][0]], "export": {}},
        )
        objects["before"].append(source)
        assert env.wait_phase(*source, ["Succeeded", "Failed"])["status"]["phase"] == "Succeeded"
        moved = f"{containers['node-a'][0]}-b1"
        restored.append(("node-b", moved))
        objects["before"].append(
            created(
                env,
                "ContainerRestore",
                "crst-before",
                {"nodeName": "node-b", "source": {"checkpointRef": {"name": source[1]}}, "name": moved},
            )
        )
        for obj in objects["before"]:
            until(f"{obj} scheduled", lambda obj=obj: phase(env, *obj) != "", last=env.logs, timeout=60)
        assert healthz(env, STANDBY) == 200
        standby_log = log_of(env, STANDBY, since)
        assert "leading" not in standby_log and "Handler" not in standby_log, standby_log

        # Objects the leader may or may not have scheduled when it dies, and objects made while nobody leads.
        moved = f"{containers['node-a'][0]}-a1"
        restored.append(("node-a", moved))
        objects["around"] = [
            created(
                env,
                "ContainerCheckpoint",
                "ccp-around",
                {"nodeName": "node-b", "containers": [containers["node-b"][0]]},
            ),
            created(
                env,
                "ContainerRestore",
                "crst-around",
                {"nodeName": "node-a", "source": {"checkpointRef": {"name": source[1]}}, "name": moved},
            ),
        ]
        env.stop_controller(LEADER, kill=True)
        killed = time.monotonic()
        moved = f"{containers['node-a'][0]}-b2"
        restored.append(("node-b", moved))
        objects["after"] = [
            created(
                env,
                "ContainerCheckpoint",
                "ccp-after",
                {"nodeName": "node-a", "containers": [containers["node-a"][1]], "leaveRunning": True},
            ),
            created(
                env,
                "ContainerRestore",
                "crst-after",
                {"nodeName": "node-b", "source": {"checkpointRef": {"name": source[1]}}, "name": moved},
            ),
        ]
        assert all(phase(env, *obj) == "" for obj in objects["after"]), "scheduled while nobody leads"

        until(
            f"{STANDBY} takes the controller Lease over",
            lambda: env.controller_leader() == STANDBY,
            last=env.logs,
            timeout=TAKEOVER_LIMIT_SECONDS + 10,
        )
        takeover = time.monotonic() - killed
        until(
            "the new leader schedules",
            lambda: all(phase(env, *o) != "" for o in objects["after"]),
            last=env.logs,
            timeout=60,
        )
        scheduling = time.monotonic() - killed
        print(f"takeover after SIGKILL: Lease {takeover:.1f}s, objects scheduled {scheduling:.1f}s")
        assert takeover <= TAKEOVER_LIMIT_SECONDS, f"the standby took {takeover:.1f}s over"
        assert "leading" in log_of(env, STANDBY, since)

        for group, listed in objects.items():
            for obj in listed:
                status = env.wait_phase(*obj, ["Succeeded", "Failed"])["status"]
                assert status["phase"] == "Succeeded", (group, obj, status)
        for group, listed in objects.items():
            for obj in listed:
                events = scheduled_events(env, *obj)
                if group == "around":
                    # A leader killed between its status patch and its Event's post leaves no Event;
                    # its successor sees the object Scheduled and leaves it alone.
                    assert events <= 1, (group, obj, events)
                else:
                    assert events == 1, (group, obj, events)
        check_invariants(env)
    finally:
        back_to_one_controller(env)
        for node, names in containers.items():
            env.nodes[node].podman("rm", "-f", *names, check=False)
        for node, name in restored:
            env.nodes[node].podman("rm", "-f", name, check=False)
    assert healthz(env, LEADER) == 200


def test_graceful_stop_hands_the_lease_over_at_once(local_env: LocalEnv) -> None:
    env = local_env
    require(isinstance(env.control_plane, ControlPlane), "the controllers must be this environment's own processes")
    until(f"{LEADER} holds the controller Lease", lambda: env.controller_leader() == LEADER, last=env.logs, timeout=60)
    since = {name: log_size(env, name) for name in (LEADER, STANDBY)}
    env.start_controller(name=STANDBY)
    try:
        until(
            "the second controller reports standing by",
            lambda: f"standing by: the controller Lease is held by {LEADER}" in log_of(env, STANDBY, since[STANDBY]),
            last=env.logs,
            timeout=60,
        )
        stopped = time.monotonic()
        env.stop_controller(LEADER)
        until(f"{STANDBY} leads", lambda: env.controller_leader() == STANDBY, last=env.logs, timeout=10)
        handover = time.monotonic() - stopped
        print(f"handover after SIGTERM: {handover:.1f}s")
        # Well within the Lease's 10 s: the leader gave it up instead of letting it expire.
        assert handover < 6, handover
        assert "gave the controller Lease up" in log_of(env, LEADER, since[LEADER])
        check_invariants(env)
    finally:
        back_to_one_controller(env)
