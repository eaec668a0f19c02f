"""An agent whose runtime returns at once: for measuring the control plane, not podman.

It reports one running container named `workload` and "checkpoints" it without doing anything.
The control-plane benchmark says so in its output.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from checkpointer.__main__ import main
from checkpointer.adapters.podman import Container, Footprint, Labelled
from checkpointer.models import CheckpointSpec, Compression, RestoreSpec
from checkpointer.settings import Settings

# Of the namespace the control-plane benchmark checkpoints from (bench/controlplane.py NAMESPACE).
WORKLOAD = Container(id="0" * 64, name="workload", state="running", labels=(("checkpointer.dev/namespace", "bench"),))


class InstantRuntime:
    def containers(self) -> list[Container]:
        return [WORKLOAD]

    def latest(self) -> Container | None:
        return WORKLOAD

    def inspect(self, name: str) -> Container | None:
        return WORKLOAD if name in (WORKLOAD.name, WORKLOAD.id) else None

    def image_exists(self, image: str) -> bool:
        return True

    def versions(self) -> dict[str, str]:
        return {"podman": "instant (benchmark runtime)"}

    def compresses(self, compression: Compression) -> bool:
        return True  # it exports nothing

    def checkpoint(self, spec: CheckpointSpec, container: str, export: Any, fifo_dir: Path) -> dict[str, Any]:
        if export is not None:
            chunks: Iterable[bytes] = [b""]
            export(chunks)
        return {}

    def restore(self, spec: RestoreSpec, archive: Path, previous: Path | None) -> dict[str, Any]:
        return {}

    def restore_in_place(self, name: str) -> None:
        return None

    def remove_local_checkpoint(self, container: Container) -> None:
        return None

    def read_file(self, path: str) -> bytes | None:
        return None

    def footprint(self, name: str) -> Footprint:
        return Footprint(memory=0, rootfs_diff=0)

    def pod(self, name: str) -> Labelled | None:
        return None

    def volume(self, name: str) -> Labelled | None:
        return None

    def network(self, name: str) -> Labelled | None:
        return None

    def remove(self, container: Container) -> None:
        return None


def instant(settings: Settings) -> InstantRuntime:
    return InstantRuntime()


if __name__ == "__main__":
    sys.exit(main(["agent"], make_runtime=instant))
