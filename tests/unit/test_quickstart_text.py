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


def test_the_by_hand_script_holds_the_migration_in_a_closed_heredoc() -> None:
    names = quickstart.Names("web", "web-to-b")
    script = quickstart.by_hand_script(Path("/var/tmp/ck"), names)
    lines = script.splitlines()
    assert lines[0] == "export KUBECONFIG=/var/tmp/ck/kubeconfig PATH=/var/tmp/ck/bin:$PATH"
    bodies = script.split("<<'EOF'\n")[1:]
    assert len(bodies) == 1
    [migration] = [yaml.safe_load(body.split("\nEOF\n")[0]) for body in bodies]
    assert migration["kind"] == "ContainerMigration" and migration["metadata"]["name"] == "web-to-b"
    assert migration["spec"] == {
        "source": {"nodeName": quickstart.SOURCE, "container": "web"},
        "targetNodeName": quickstart.TARGET,
    }
    assert "kubectl wait cmig/web-to-b" in script and "{.status.downtimeSeconds}" in script
    assert "--label checkpointer.dev/namespace=default --name web" in script
    assert "kubectl delete cmig web-to-b" in quickstart.by_hand(Path("/var/tmp/ck"), names)
