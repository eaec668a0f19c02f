"""What `./hack/quickstart` prints for people: sizes in MiB, and commands that paste into a shell."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from localenv import quickstart


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (29948, "0.03 MiB"),
        (1234, "0.001 MiB"),
        (3 * 1024 * 1024 // 2, "1.5 MiB"),
        (96 * 1024 * 1024 + 5, "96.0 MiB"),
        (1024 * 1024 * 1024, "1024 MiB"),
    ],
)
def test_sizes_read_in_mib(size: int, shown: str) -> None:
    assert quickstart.mib(size) == shown


def test_the_by_hand_script_holds_both_objects_in_closed_heredocs() -> None:
    names = quickstart.Names("web", "web-before-drain", "web-on-b")
    script = quickstart.by_hand_script(Path("/var/tmp/ck"), names)
    lines = script.splitlines()
    assert lines[0] == "export KUBECONFIG=/var/tmp/ck/kubeconfig PATH=/var/tmp/ck/bin:$PATH"
    bodies = script.split("<<'EOF'\n")[1:]
    assert len(bodies) == 2
    objects = [yaml.safe_load(body.split("\nEOF\n")[0]) for body in bodies]
    checkpoint, restore = objects
    assert checkpoint["kind"] == "ContainerCheckpoint" and checkpoint["spec"]["containers"] == ["web"]
    assert checkpoint["spec"]["nodeName"] == quickstart.SOURCE
    assert restore["kind"] == "ContainerRestore" and restore["spec"]["nodeName"] == quickstart.TARGET
    assert restore["spec"]["source"] == {"checkpointRef": {"name": "web-before-drain"}}
    assert "--label checkpointer.dev/namespace=default --name web" in script
