"""What the plugin asks for, as the ordinary objects it creates. Pure functions: no I/O.

Everything the plugin does can be done with YAML too (docs/kubectl-plugin.md): these functions build
that YAML's objects from the command line's words.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from checkpointer import GROUP, VERSION
from checkpointer.models import CheckpointStatus, Compression

API_VERSION = f"{GROUP}/{VERSION}"
CHECKPOINT = "ContainerCheckpoint"
RESTORE = "ContainerRestore"
MIGRATION = "ContainerMigration"
# The words `watch` accepts for each kind, as kubectl does: short name, singular, plural, Kind.
KINDS = {
    CHECKPOINT: ("ccp", "containercheckpoint", "containercheckpoints"),
    RESTORE: ("crst", "containerrestore", "containerrestores"),
    MIGRATION: ("cmig", "containermigration", "containermigrations"),
}
PLURALS = {CHECKPOINT: "containercheckpoints", RESTORE: "containerrestores", MIGRATION: "containermigrations"}
# spec.compress of an export (docs/api.md).
COMPRESSIONS = tuple(c.value for c in Compression)
# An object's name is a DNS subdomain; 63 keeps it a valid label too, as most tools expect.
_NAME_MAX = 63
_NOT_IN_NAME = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class Target:
    """One container on one node: `NODE/CONTAINER` on the command line."""

    node: str
    container: str


@dataclass(frozen=True)
class ArchiveAddress:
    """`STORAGE:KEY`: an archive (or its folder) in a CheckpointStorage, the key relative to the
    namespace's folder as a ContainerRestore names it (docs/api.md). No storage: the default one."""

    storage: str | None
    key: str


def parse_target(text: str) -> Target:
    node, sep, container = text.partition("/")
    if not sep or not node or not container or "/" in container:
        raise ValueError(f"{text!r} is not NODE/CONTAINER (for example node-a/web)")
    return Target(node, container)


# kubectl's words for a Pod in `pod/NAME`.
_POD_WORDS = ("pod", "pods", "po")


def parse_pod(text: str) -> str | None:
    """The Pod's name of `pod/NAME` (kubectl's words for the kind); None for anything else."""
    word, sep, name = text.partition("/")
    if not sep or word.lower() not in _POD_WORDS:
        return None
    if not name or "/" in name:
        raise ValueError(f"{text!r} is not pod/NAME (for example pod/web)")
    return name


def parse_address(text: str) -> ArchiveAddress:
    storage, sep, key = text.partition(":")
    if not sep:
        storage, key = "", text
    key = key.strip("/")
    if not key:
        raise ValueError(f"{text!r} names no key: use STORAGE:KEY (for example local:web-1a2b3c4d/web.tar.zst)")
    return ArchiveAddress(storage or None, key)


def parse_kind(text: str) -> tuple[str, str]:
    """`ccp/NAME` (or any of kubectl's words for the kind) as (Kind, name)."""
    word, sep, name = text.partition("/")
    word = word.lower().removesuffix(f".{GROUP}")
    for kind, words in KINDS.items():
        if sep and name and word in words:
            return kind, name
    raise ValueError(
        f"{text!r} is not KIND/NAME with KIND one of ccp, crst, cmig, containercheckpoint, containerrestore, "
        "containermigration"
    )


def generated_name(base: str, token: str | None = None) -> str:
    """`<base>-<random>`, made a valid object name: a container may be named `Web_1`."""
    token = token or secrets.token_hex(3)
    clean = _NOT_IN_NAME.sub("-", base.lower()).strip("-") or "checkpoint"
    return f"{clean[: _NAME_MAX - len(token) - 1].rstrip('-')}-{token}"


def by_node(targets: list[Target]) -> dict[str, list[str]]:
    """The containers of each node, in the order given: one ContainerCheckpoint per node."""
    nodes: dict[str, list[str]] = {}
    for target in targets:
        containers = nodes.setdefault(target.node, [])
        if target.container not in containers:
            containers.append(target.container)
    return nodes


def split_export(export: str | None, targets: tuple[str, ...]) -> tuple[str | None, tuple[str, ...]]:
    """`--export node-a/web` means export to the default storage, and node-a/web is a target: a
    storage's name never holds a `/`, so the optional value took a target by mistake."""
    if export is not None and "/" in export:
        return "", (export, *targets)
    return export, targets


def _object(kind: str, name: str, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def checkpoint_objects(
    targets: list[Target],
    namespace: str,
    *,
    export: str | None = None,
    leave_running: bool = False,
    compress: str | None = None,
    name: str | None = None,
    token: str | None = None,
) -> list[dict[str, Any]]:
    """One ContainerCheckpoint per node. `export`: None keeps the checkpoint on the node, "" exports
    to the default storage, anything else names the CheckpointStorage."""
    if not targets:
        raise ValueError("name at least one NODE/CONTAINER")
    nodes = by_node(targets)
    if name and len(nodes) > 1:
        raise ValueError("--name names one object, and these containers are on several nodes: one object per node")
    if compress is not None and export is None:
        raise ValueError("--compress applies to an exported checkpoint: add --export")
    objects = []
    for node, containers in nodes.items():
        spec: dict[str, Any] = {"nodeName": node, "containers": containers}
        if leave_running:
            spec["leaveRunning"] = True
        if export is not None:
            spec["export"] = {"storageRef": {"name": export}} if export else {}
            if compress is not None:
                if compress not in COMPRESSIONS:
                    raise ValueError(f"--compress is one of {', '.join(COMPRESSIONS)}, not {compress!r}")
                spec["compress"] = compress
        objects.append(_object(CHECKPOINT, name or generated_name(containers[0], token), namespace, spec))
    return objects


def pod_checkpoint_object(
    pod: str,
    namespace: str,
    *,
    containers: tuple[str, ...] = (),
    export: str | None = None,
    compress: str | None = None,
    name: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """A ContainerCheckpoint of a Pod of `namespace` on the Pod's own node (spec.podRef), exported:
    `export` None or "" to the default storage, anything else names the CheckpointStorage."""
    ref: dict[str, Any] = {"name": pod}
    if containers:
        ref["containers"] = list(dict.fromkeys(containers))
    spec: dict[str, Any] = {"podRef": ref, "export": {"storageRef": {"name": export}} if export else {}}
    if compress is not None:
        if compress not in COMPRESSIONS:
            raise ValueError(f"--compress is one of {', '.join(COMPRESSIONS)}, not {compress!r}")
        spec["compress"] = compress
    return _object(CHECKPOINT, name or generated_name(pod, token), namespace, spec)


def restore_object(
    namespace: str,
    node: str,
    *,
    checkpoint: str | None = None,
    container: str | None = None,
    archive: ArchiveAddress | None = None,
    name: str | None = None,
    container_name: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """A ContainerRestore of a checkpoint by name, or of an archive by storage and key."""
    if (checkpoint is None) == (archive is None):
        raise ValueError("restore either a CHECKPOINT or an --archive STORAGE:KEY, not both or neither")
    source: dict[str, Any]
    if checkpoint is not None:
        source = {"checkpointRef": {"name": checkpoint, **({"container": container} if container else {})}}
        base = container or checkpoint
    else:
        assert archive is not None
        ref: dict[str, Any] = {"key": archive.key}
        if archive.storage:
            ref["storageRef"] = {"name": archive.storage}
        source = {"archive": ref}
        base = archive.key.rsplit("/", 1)[-1].split(".", 1)[0]
    spec: dict[str, Any] = {"nodeName": node, "source": source}
    if container_name:
        spec["name"] = container_name
    return _object(RESTORE, name or generated_name(f"{container_name or base}-restore", token), namespace, spec)


def migration_object(
    namespace: str,
    source: Target,
    *,
    to: str | None = None,
    storage: str | None = None,
    compress: str | None = None,
    name: str | None = None,
    container_name: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """A ContainerMigration of one container; without `to` the controller chooses the target node."""
    if to is not None and to == source.node:
        raise ValueError(f"--to {to} is the node the container runs on: name another node, or leave --to out")
    spec: dict[str, Any] = {"source": {"nodeName": source.node, "container": source.container}}
    if to:
        spec["targetNodeName"] = to
    if storage:
        spec["storageRef"] = {"name": storage}
    if compress is not None:
        if compress not in COMPRESSIONS:
            raise ValueError(f"--compress is one of {', '.join(COMPRESSIONS)}, not {compress!r}")
        spec["compress"] = compress
    if container_name:
        spec["name"] = container_name
    return _object(MIGRATION, name or generated_name(source.container, token), namespace, spec)


def archive_folder(key: str) -> str:
    """The folder of `key`: the key itself when it names a folder, its parent when it names a file."""
    last = key.rsplit("/", 1)[-1]
    return key.rsplit("/", 1)[0] if "." in last and "/" in key else key


def checkpoint_folder(checkpoint: dict[str, Any] | None) -> str | None:
    """The bucket folder of a ContainerCheckpoint's archives, from its status; None before it has one."""
    archives = CheckpointStatus.of(checkpoint or {}).archives
    key = next((a.key for a in archives if a.key), None)
    return key.rsplit("/", 1)[0] if key and "/" in key else None
