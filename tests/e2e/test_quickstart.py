"""`./hack/quickstart` on the session's environment: the count goes on after the move, and so it does
with the commands the quickstart prints for people to run by hand."""

from __future__ import annotations

import re
import subprocess

import pytest

from helpers import unique
from localenv import quickstart
from localenv.controlplane import ControlPlane
from localenv.env import LocalEnv
from localenv.procs import BIN


@pytest.fixture
def env(local_env: LocalEnv) -> LocalEnv:
    if not isinstance(local_env.control_plane, ControlPlane):
        pytest.skip("the quickstart runs on the local environment, not on kind")
    return local_env


def names() -> quickstart.Names:
    return quickstart.Names(unique("counter"), unique("quickstart"))


def remove_counters(env: LocalEnv, container: str) -> None:
    for node in (quickstart.SOURCE, quickstart.TARGET):
        env.nodes[node].podman("rm", "-f", container, check=False)


def test_quickstart_moves_the_counter_and_tells_it_for_people(env: LocalEnv) -> None:
    story = names()
    said: list[str] = []
    try:
        migration = quickstart.migrate_counter(env, said.append, story)
    finally:
        remove_counters(env, story.container)
    out = "\n".join(said)

    assert migration.on_target > migration.last_on_source > 0
    assert migration.restore["nodeName"] == quickstart.TARGET
    assert migration.migration["phase"] == "Succeeded"
    assert f"{migration.last_on_source} on node-a before the move" in out
    assert f"{migration.on_target} on node-b after it" in out
    downtime = migration.migration["downtimeSeconds"]
    assert 0 < downtime < 30 and f"downtime {downtime:.2f}s: stopped on node-a at" in out, out
    assert f"{downtime:.2f}s without counting" in out
    assert "kind: ContainerMigration" in out
    archive = migration.checkpoint["archives"][0]
    assert f"{quickstart.mib(archive['size'])} (" in out and " MiB (" in out
    assert str(archive["size"]) not in out, "sizes are for people, not byte counts"
    assert f"podman run -d --label checkpointer.dev/namespace=default --name {story.container}" in out

    folder = archive["key"].rsplit("/", 1)[0]
    listing = quickstart.bucket_listing(env, folder)
    assert len(listing) == 2 and all(" MiB  " in line for line in listing), listing

    commands = quickstart.by_hand(env.workdir, story)
    assert "./hack/local-up --workdir" in commands
    assert f"export KUBECONFIG={env.workdir}/kubeconfig" in commands
    for step in (
        "kubectl apply -f -",
        f"kubectl wait cmig/{story.migration}",
        f"kubectl delete cmig {story.migration}",
    ):
        assert step in commands
    assert "kind: ContainerMigration" in commands


def test_the_commands_it_prints_move_the_counter_again(env: LocalEnv) -> None:
    """The by-hand commands, run as printed against an environment with the tools `local-up` writes."""
    story = names()
    quickstart.write_tools(env, BIN / "kubectl")
    script = quickstart.by_hand_script(env.workdir, story)
    try:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300, check=False
        )
    finally:
        remove_counters(env, story.container)
    assert done.returncode == 0, done.stdout + done.stderr
    # What the script prints as bare numbers: the count on node-a, its last output there, the count on node-b.
    counts = [int(line) for line in done.stdout.split("\n") if re.fullmatch(r"\d+", line)]
    assert len(counts) == 3, done.stdout
    on_source, last_on_source, on_target = counts
    assert on_target > last_on_source >= on_source > 0, counts
    assert re.search(r"^downtime \d+(\.\d+)?s$", done.stdout, re.MULTILINE), done.stdout
