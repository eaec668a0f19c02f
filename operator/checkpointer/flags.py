"""Spec fields to podman's flags: the CLI's argv and the libpod REST API's query parameters.

`compress` is podman's own `--compress` where podman's compressor serves (the CLI), and otherwise
the agent's (see adapters/podman.py); either way the archive is one that `podman container restore
--import` detects by itself. An export always keeps podman's local checkpoint, whatever `keep`
says: it is the way back until the archive is in the bucket, and the agent removes it after.
"""

from __future__ import annotations

from pathlib import Path

from checkpointer.models import CheckpointSpec, Compression, RestoreSpec

_CHECKPOINT_FLAGS = {
    "leave_running": ("--leave-running", "leaveRunning"),
    "tcp_established": ("--tcp-established", "tcpEstablished"),
    "keep": ("--keep", "keep"),
    "pre_checkpoint": ("--pre-checkpoint", "preCheckpoint"),
    "with_previous": ("--with-previous", "withPrevious"),
    "ignore_rootfs": ("--ignore-rootfs", "ignoreRootFS"),
    "ignore_volumes": ("--ignore-volumes", "ignoreVolumes"),
}

_RESTORE_FLAGS = {
    "tcp_established": ("--tcp-established", "tcpEstablished"),
    "tcp_close": ("--tcp-close", "tcpClose"),
    "ignore_rootfs": ("--ignore-rootfs", "ignoreRootFS"),
    "ignore_volumes": ("--ignore-volumes", "ignoreVolumes"),
    "ignore_static_ip": ("--ignore-static-ip", "ignoreStaticIP"),
    "ignore_static_mac": ("--ignore-static-mac", "ignoreStaticMAC"),
    "keep": ("--keep", "keep"),
    "file_locks": ("--file-locks", "fileLocks"),
}


def checkpoint_argv(
    spec: CheckpointSpec, container: str, export_to: Path | None, compress: Compression = Compression.NONE
) -> list[str]:
    argv = ["container", "checkpoint", "--print-stats"]
    argv += [cli for field, (cli, _) in _CHECKPOINT_FLAGS.items() if getattr(spec, field)]
    if export_to is not None:
        argv += [f"--export={export_to}", f"--compress={compress}"]
        if not spec.keep:
            argv.append("--keep")
    return [*argv, container]


def checkpoint_query(spec: CheckpointSpec, export: bool) -> dict[str, str]:
    query = {api: "true" for field, (_, api) in _CHECKPOINT_FLAGS.items() if getattr(spec, field)}
    query["printStats"] = "true"
    if export:
        query["export"] = "true"
        query["keep"] = "true"
    return query


def restore_argv(spec: RestoreSpec, archive: Path, previous: Path | None) -> list[str]:
    argv = ["container", "restore", "--print-stats", f"--import={archive}"]
    if previous is not None:
        argv.append(f"--import-previous={previous}")
    argv += [cli for field, (cli, _) in _RESTORE_FLAGS.items() if getattr(spec, field)]
    if spec.name:
        argv.append(f"--name={spec.name}")
    if spec.pod:
        argv.append(f"--pod={spec.pod}")
    argv += [f"--publish={p}" for p in spec.publish]
    return argv


def restore_query(spec: RestoreSpec) -> dict[str, str]:
    query = {api: "true" for field, (_, api) in _RESTORE_FLAGS.items() if getattr(spec, field)}
    query.update({"import": "true", "printStats": "true"})
    if spec.name:
        query["name"] = spec.name
    if spec.pod:
        query["pod"] = spec.pod
    if spec.publish:
        query["publishPorts"] = " ".join(spec.publish)
    return query
