"""`kubectl checkpointer` end to end: the installed executable against the local environment.

One flow, so that the environment's objects are made once: a --dry-run whose YAML kubectl applies,
checkpoint, restore and migrate with --wait (once through kubectl itself, as `kubectl checkpointer`),
a --wait that ends Failed, and the archives and inspect commands reading the bucket.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from helpers import get, remove, state, workload
from localenv.env import LocalEnv
from localenv.procs import BIN, require

PLUGIN = Path(sys.executable).parent / "kubectl-checkpointer"


def plugin_env(env: LocalEnv) -> dict[str, str]:
    """What a user's shell has: KUBECONFIG, and kubectl and the plugin on PATH (kubectl passes nothing)."""
    path = f"{PLUGIN.parent}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "KUBECONFIG": str(env.kubeconfig), "PATH": path, "COLUMNS": "200"}


def plugin(env: LocalEnv, *args: str, via_kubectl: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "kubectl"), "checkpointer", *args] if via_kubectl else [str(PLUGIN), *args]
    return subprocess.run(argv, env=plugin_env(env), capture_output=True, text=True, timeout=120, check=False)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_plugin_checkpoint_restore_migrate_archives_inspect(local_env: LocalEnv) -> None:
    require(PLUGIN.exists(), f"{PLUGIN} is not installed: pip install the package")
    container = workload(local_env, "node-a", mib=8)

    # --dry-run prints YAML and creates nothing; kubectl applying it creates the same object.
    printed = ok(plugin(local_env, "checkpoint", "node-a/" + container, "--export", "--leave-running", "--dry-run"))
    (planned,) = list(yaml.safe_load_all(printed))
    name = planned["metadata"]["name"]
    assert name.startswith(f"{container}-"), name
    assert get(local_env, "ccp", name) is None, "--dry-run created the object"
    local_env.kubectl("create", "-f", "-", input=printed)
    made = get(local_env, "ccp", name)
    assert made is not None and {k: made["spec"].get(k) for k in planned["spec"]} == planned["spec"], made
    watched = plugin(local_env, "watch", f"ccp/{name}")
    assert watched.returncode == 0 and "Succeeded" in watched.stdout, watched

    # checkpoint --wait -o json, through kubectl: the object it created, at its end.
    result = ok(
        plugin(
            local_env,
            "checkpoint",
            f"node-a/{container}",
            "--export",
            "--compress",
            "none",
            "--wait",
            "-o",
            "json",
            via_kubectl=True,
        )
    )
    checkpointed = json.loads(result)
    assert checkpointed["kind"] == "ContainerCheckpoint" and checkpointed["status"]["phase"] == "Succeeded"
    assert checkpointed["spec"]["compress"] == "none"
    archive = checkpointed["status"]["archives"][0]
    assert archive["size"] > 8 * 1024 * 1024, archive
    assert state(local_env, "node-a", container) == "exited", "without --leave-running the container stops"

    # restore --wait of the checkpoint by name, on the other node.
    restored = yaml.safe_load(
        ok(plugin(local_env, "restore", checkpointed["metadata"]["name"], "--node", "node-b", "--wait", "-o", "yaml"))
    )
    assert restored["kind"] == "ContainerRestore" and restored["status"]["phase"] == "Succeeded", restored
    assert state(local_env, "node-b", container) == "running"

    # migrate back: one ContainerMigration, followed to its end by default.
    remove(local_env, "node-a", container)
    moved = plugin(local_env, "migrate", f"node-b/{container}", "--to", "node-a")
    ok(moved)
    ended = re.findall(r"^(Container\w+) \S+: Succeeded", moved.stdout, re.MULTILINE)
    assert ended == ["ContainerMigration"], moved.stdout
    assert re.search(r"^  downtime \d+\.\d\ds: stopped on node-b", moved.stdout, re.MULTILINE), moved.stdout
    assert state(local_env, "node-a", container) == "running"
    assert state(local_env, "node-b", container) == "exited"

    # A --wait that ends Failed: exit 1 with the reason and the message.
    failed = plugin(local_env, "checkpoint", "node-a/no-such-container", "--wait")
    assert failed.returncode == 1, failed
    assert "Failed (ContainerNotFound)" in failed.stderr and "no-such-container" in failed.stderr, failed.stderr

    # archives: every checkpoint's archive from its manifest, newest first, sizes for people.
    listed = ok(plugin(local_env, "archives"))
    rows = [line.split() for line in listed.splitlines()[1:]]
    mine = [r for r in rows if r[2] == container]
    assert [r[1] for r in mine[:3]][1:] == [checkpointed["metadata"]["name"], name], listed
    assert all(r[0] == "default" and r[5] in ("KiB", "MiB") for r in mine), listed
    assert mine[1][3:6] == ["node-a", f"{archive['size'] / 2**20:.1f}", "MiB"], listed
    manifests = json.loads(ok(plugin(local_env, "archives", "local", "-o", "json")))
    assert {checkpointed["metadata"]["name"], name} <= {m["name"] for m in _as_list(manifests)}

    # inspect: the manifest of one archive, readable, with its signature checked.
    shown = ok(plugin(local_env, "inspect", mine[1][-1]))
    assert checkpointed["metadata"]["uid"] in shown and archive["sha256"] in shown, shown
    assert "valid, Ed25519 key" in shown and "compress=none" in shown, shown
    assert "podman" in shown, shown
    by_name = ok(plugin(local_env, "inspect", f"local:{checkpointed['metadata']['name']}"))
    assert archive["sha256"] in by_name, by_name

    for node in ("node-a", "node-b"):
        remove(local_env, node, container)


def _as_list(doc: Any) -> list[dict[str, Any]]:
    return list(doc["items"]) if doc.get("kind") == "List" else [doc]
