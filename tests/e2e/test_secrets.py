"""Credentials stay secret: a full checkpoint and restore at debug level, and no log line holds a key.

docs/security.md: credentials never leave their Secret, not even in debug logs.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest

from helpers import apply, unique
from localenv.env import NAMESPACE, SECRET, LocalEnv
from localenv.images import COUNTER, read_count

SIGNING_SECRET = "checkpointer-signing-key"


@pytest.fixture
def verbose(local_env: LocalEnv) -> Iterator[LocalEnv]:
    """The controller and both agents started again with --verbose (DEBUG), as `verbose: true` in the chart."""
    env = local_env
    env.stop_controller()
    env.start_controller(args=["--verbose"])
    for node in env.nodes:
        env.stop_agent(node)
        env.start_agent(node, args=["--verbose"])
    try:
        yield env
    finally:
        env.stop_controller()
        env.start_controller()
        for node in env.nodes:
            env.stop_agent(node)
            env.start_agent(node)


def secret_values(env: LocalEnv, name: str) -> list[str]:
    out = env.kubectl("get", "secret", "-n", NAMESPACE, name, "-o", "json")
    data = json.loads(out.stdout)["data"]
    values = [base64.b64decode(v).decode(errors="replace") for v in data.values()]
    # Each value as a whole and each of its lines: a PEM key logged line by line is found too.
    lines = [line for v in values for line in v.splitlines() if len(line) >= 16 and "-----" not in line]
    return [v for v in values if v.strip()] + lines + list(data.values())


def test_debug_logs_of_a_checkpoint_and_restore_hold_no_secret(verbose: LocalEnv) -> None:
    env = verbose
    container = unique("counter")
    env.nodes["node-a"].podman(
        "run", "-d", "--name", container, "--label", "checkpointer.dev/namespace=default", COUNTER
    )
    time.sleep(1)
    read_count(env.nodes["node-a"], container)
    ccp = unique("ccp")
    apply(env, "ContainerCheckpoint", ccp, {"nodeName": "node-a", "containers": [container], "export": {}})
    status = env.wait_phase("ccp", ccp, ["Succeeded", "Failed"])["status"]
    assert status["phase"] == "Succeeded", status
    env.nodes["node-a"].podman("rm", "-f", container)
    crst = unique("crst")
    apply(env, "ContainerRestore", crst, {"nodeName": "node-b", "source": {"checkpointRef": {"name": ccp}}})
    restored = env.wait_phase("crst", crst, ["Succeeded", "Failed"])["status"]
    assert restored["phase"] == "Succeeded", restored
    env.nodes["node-b"].podman("rm", "-f", container)

    secrets = secret_values(env, SECRET) + secret_values(env, SIGNING_SECRET)
    assert env.s3.access_key in secrets and env.s3.secret_key in secrets
    logs = {
        path.name: path.read_text(errors="replace")
        for path in env.supervisor.log_dir.glob("*.log")
        if path.name == "controller.log" or path.name.startswith("agent-")
    }
    assert set(logs) >= {"controller.log", "agent-node-a.log", "agent-node-b.log"}
    assert all(" DEBUG " in text for text in logs.values()), "the processes logged at debug level"
    leaked = [(name, s[:6] + "...") for name, text in logs.items() for s in secrets if s in text]
    assert not leaked, f"secrets in the logs: {leaked}"
