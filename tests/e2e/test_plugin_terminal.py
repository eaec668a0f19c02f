"""`kubectl checkpointer watch` in a real terminal: tmux runs it during a 1 GiB checkpoint, and the
pane, captured again and again, shows the bar advance and end on Succeeded."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time

from test_plugin import PLUGIN, ok, plugin, plugin_env

from helpers import remove, unique, workload
from localenv.env import LocalEnv
from localenv.procs import require

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
# What the bar shows of the bytes: `312.4 MiB` or `312.4 MiB of 1.0 GiB`.
DONE = re.compile(r"(\d+(?:\.\d)?) (B|KiB|MiB|GiB)(?: of | {2})")


def bytes_shown(pane: str) -> int | None:
    found = DONE.search(pane)
    return None if found is None else int(float(found.group(1)) * UNITS[found.group(2)])


def test_watch_shows_a_1gib_checkpoint_advance_to_succeeded(local_env: LocalEnv) -> None:
    tmux = shutil.which("tmux")
    require(tmux is not None, "tmux is not installed: run hack/install.sh")
    assert tmux is not None
    container = workload(local_env, "node-a", mib=1024)
    name = unique("big")
    # Uncompressed: the bytes the bar counts are the memory's, and the checkpoint lasts long enough.
    ok(plugin(local_env, "checkpoint", f"node-a/{container}", "--export", "--compress", "none", "--name", name))

    socket = unique("plugin")  # a tmux server of this test's own
    environment = plugin_env(local_env)
    command = f"{shlex.quote(str(PLUGIN))} watch ccp/{name}; echo EXIT=$?; sleep 60"
    tmux_argv = [tmux, "-L", socket]
    subprocess.run(
        [*tmux_argv, "new-session", "-d", "-x", "150", "-y", "12", "-s", "watch", command],
        env={k: v for k, v in environment.items() if k != "TMUX"},
        check=True,
    )
    panes: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            pane = subprocess.run(
                [*tmux_argv, "capture-pane", "-p", "-t", "watch"], capture_output=True, text=True, check=True
            ).stdout
            panes.append(pane)
            if "EXIT=" in pane:
                break
            time.sleep(0.25)
    finally:
        subprocess.run([*tmux_argv, "kill-server"], check=False)
        remove(local_env, "node-a", container)

    last = panes[-1]
    assert "EXIT=0" in last, last
    assert re.search(rf"ContainerCheckpoint {name}: Succeeded", last), last
    shown = [b for b in map(bytes_shown, panes[:-1]) if b]
    distinct = sorted(set(shown))
    assert len(distinct) >= 3 and shown == sorted(shown), f"the bar did not advance: {shown}"
    assert distinct[-1] >= 512 * 2**20, f"the bar stopped at {distinct[-1]} bytes"
    assert "█" in "".join(panes) or "━" in "".join(panes), "no bar was drawn"
