from pathlib import Path

import pytest

from checkpointer import flags
from checkpointer.adapters.podman import runtime
from checkpointer.models import CheckpointSpec, Compression, RestoreSpec
from checkpointer.settings import Settings


def test_every_checkpoint_flag_maps_to_podman() -> None:
    spec = CheckpointSpec.model_validate(
        {
            "nodeName": "n",
            "containers": ["c"],
            "leaveRunning": True,
            "tcpEstablished": True,
            "keep": True,
            "withPrevious": True,
            "previousCheckpointRef": {"name": "p"},
            "export": {},
            "compress": "gzip",
            "ignoreRootfs": True,
            "ignoreVolumes": True,
        }
    )
    argv = flags.checkpoint_argv(spec, "c", Path("/spool/c.fifo"), Compression.GZIP)
    assert argv[:3] == ["container", "checkpoint", "--print-stats"]
    for flag in (
        "--leave-running",
        "--tcp-established",
        "--keep",
        "--with-previous",
        "--ignore-rootfs",
        "--ignore-volumes",
        "--export=/spool/c.fifo",
        "--compress=gzip",
    ):
        assert flag in argv
    assert "--pre-checkpoint" not in argv
    assert argv[-1] == "c"
    query = flags.checkpoint_query(spec, export=True)
    assert query == {
        "leaveRunning": "true",
        "tcpEstablished": "true",
        "keep": "true",
        "withPrevious": "true",
        "ignoreRootFS": "true",
        "ignoreVolumes": "true",
        "printStats": "true",
        "export": "true",
    }


def test_checkpoint_without_export_keeps_it_on_the_node() -> None:
    spec = CheckpointSpec.model_validate({"nodeName": "n", "latest": True, "preCheckpoint": True})
    argv = flags.checkpoint_argv(spec, "abc", None)
    assert "--pre-checkpoint" in argv
    assert not any(a.startswith("--export") or a.startswith("--compress") for a in argv)
    assert "export" not in flags.checkpoint_query(spec, export=False)


def test_every_restore_flag_maps_to_podman() -> None:
    spec = RestoreSpec.model_validate(
        {
            "nodeName": "n",
            "source": {"archive": {"key": "k.tar.zst"}},
            "name": "new",
            "tcpClose": True,
            "ignoreRootfs": True,
            "ignoreVolumes": True,
            "ignoreStaticIP": True,
            "ignoreStaticMAC": True,
            "keep": True,
            "fileLocks": True,
            "pod": "p",
            "publish": ["8080:80", "127.0.0.1:53:53/udp"],
        }
    )
    argv = flags.restore_argv(spec, Path("/spool/a.tar.zst"), Path("/spool/prev.tar"))
    for flag in (
        "--import=/spool/a.tar.zst",
        "--import-previous=/spool/prev.tar",
        "--name=new",
        "--tcp-close",
        "--ignore-rootfs",
        "--ignore-volumes",
        "--ignore-static-ip",
        "--ignore-static-mac",
        "--keep",
        "--file-locks",
        "--pod=p",
        "--publish=8080:80",
        "--publish=127.0.0.1:53:53/udp",
    ):
        assert flag in argv
    assert "--tcp-established" not in argv
    query = flags.restore_query(spec)
    assert query["import"] == "true"
    assert query["name"] == "new"
    assert query["publishPorts"] == "8080:80 127.0.0.1:53:53/udp"
    assert query["ignoreStaticIP"] == "true"


@pytest.mark.parametrize(
    ("mode", "level", "compression", "by_podman"),
    [
        ("cli", 3, Compression.ZSTD, True),
        ("cli", 3, Compression.GZIP, True),
        ("cli", 9, Compression.ZSTD, False),  # podman knows only its default level
        ("cli", 9, Compression.GZIP, True),
        ("api", 3, Compression.ZSTD, False),  # the REST API exports plain tar
        ("api", 3, Compression.GZIP, False),
        ("api", 3, Compression.NONE, True),
    ],
)
def test_podman_compresses_what_it_can_and_the_agent_the_rest(
    mode: str, level: int, compression: Compression, by_podman: bool
) -> None:
    settings = Settings(podman_mode=mode, zstd_level=level)  # type: ignore[arg-type]
    assert runtime(settings).compresses(compression) is by_podman
