"""One object's folder on the node: what a restarted agent needs to carry on where it stopped.

Every record is written atomically and made durable (a temporary file, fsync, rename, fsync of the
folder), so that a crash leaves either the old record or the new one. A record that a crash left
empty or half-written all the same (a file system without ordered writes) loads as absent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from checkpointer.archive.spool import Digest
from checkpointer.models import Compression, Metadata

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
RESTORE = "restore"
_UID = re.compile(r"_([0-9a-f-]{36})$")


@dataclass(frozen=True)
class Target:
    """A container the checkpoint resolved, fixed before the first one is stopped."""

    name: str
    id: str


@dataclass(frozen=True)
class SpoolRecord:
    """A finished spool: written once podman has exported it whole."""

    container: str
    container_id: str
    compression: Compression
    raw_size: int
    digest: Digest
    stats: dict[str, Any] = field(default_factory=dict)
    # The age recipients the spool is encrypted to; empty: it is not encrypted.
    recipients: tuple[str, ...] = ()
    # The tar's size before compression; None when podman compressed it (its zstd frame does not say).
    uncompressed_size: int | None = None


@dataclass(frozen=True)
class UploadState:
    """A spool's upload across failures and restarts."""

    key: str
    storage: str  # the CheckpointStorage's name
    upload_id: str = ""
    # Wall-clock seconds of the first failure, so that the deadline survives a restart.
    failing_since: float = 0.0
    attempts: int = 0
    # Past the deadline: the multipart upload is aborted as soon as the storage answers again.
    abandoned: bool = False


@dataclass(frozen=True)
class PodmanRestore:
    """What a restore asked podman to make, written before podman is called: what an agent restarted
    meanwhile looks for on the node."""

    name: str  # the container's name
    expected_id: str  # the archive's container ID when podman keeps it; "" when podman makes a new one
    before: tuple[str, ...]  # the IDs that held the name before: not this restore's


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        log.warning("ignoring %s: a crash left it incomplete", path)
        return None


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WorkFolder:
    """`<spool>/<kind>_<namespace>_<name>_<uid>`: targets, markers, records and spools of one object."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def of(cls, root: Path, kind: str, meta: Metadata) -> WorkFolder:
        return cls(root / f"{kind}_{meta.namespace}_{meta.name}_{meta.uid}")

    @staticmethod
    def uid_of(path: Path) -> str | None:
        """The uid of the object whose folder `path` is; None for what is not a work folder."""
        found = _UID.search(path.name)
        return found.group(1) if found and path.name.startswith((CHECKPOINT + "_", RESTORE + "_")) else None

    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self) -> None:
        if not self.path.is_dir():
            self.path.mkdir(parents=True)
            _sync_dir(self.path.parent)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def file(self, name: str) -> Path:
        return self.path / name

    # --- markers ----------------------------------------------------------------------------------

    def mark(self, marker: str) -> None:
        self.create()
        path = self.path / f"{marker}.marker"
        with path.open("w") as f:
            os.fsync(f.fileno())
        _sync_dir(self.path)

    def marked(self, marker: str) -> bool:
        return (self.path / f"{marker}.marker").exists()

    # --- the folder's own state --------------------------------------------------------------------
    # Dot files: a container's name never starts with a dot, so no container's marker or record is one.

    def hand_over(self) -> None:
        """Every archive is stored and the object goes to the controller for signing: what stays here
        (podman's local checkpoints, the spool) waits for its word, Succeeded or Failed."""
        self.mark(".handed-over")

    def handed_over(self) -> bool:
        return self.marked(".handed-over")

    def drop_hand_over(self) -> None:
        (self.path / ".handed-over.marker").unlink(missing_ok=True)

    def hold(self) -> None:
        """A Warning named this folder's spool to an administrator: it stays until they remove it,
        whatever becomes of its object."""
        self.mark(".held")

    def held(self) -> bool:
        return self.marked(".held")

    # --- records ----------------------------------------------------------------------------------

    def targets(self) -> list[Target] | None:
        raw = read_json(self.path / "targets.json")
        if not isinstance(raw, list):
            return None
        return [Target(str(t["name"]), str(t["id"])) for t in raw]

    def save_targets(self, targets: list[Target]) -> None:
        self.create()
        write_json(self.path / "targets.json", [asdict(t) for t in targets])

    def spool_record(self, container: str) -> SpoolRecord | None:
        raw = read_json(self.path / f"{container}.spool.json")
        if not isinstance(raw, dict):
            return None
        try:
            digest = raw.pop("digest")
            digest["part_crc32"] = tuple(digest["part_crc32"])
            raw["recipients"] = tuple(raw.get("recipients", ()))
            return SpoolRecord(**{**raw, "compression": Compression(raw["compression"]), "digest": Digest(**digest)})
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring the spool record of %s in %s: it does not parse", container, self.path)
            return None

    def save_spool_record(self, record: SpoolRecord) -> None:
        write_json(self.path / f"{record.container}.spool.json", asdict(record))

    def podman_restore(self) -> PodmanRestore | None:
        raw = read_json(self.path / "podman-restore.json")
        if not isinstance(raw, dict):
            return None
        with contextlib.suppress(KeyError, TypeError):
            return PodmanRestore(str(raw["name"]), str(raw["expected_id"]), tuple(str(i) for i in raw["before"]))
        return None

    def save_podman_restore(self, record: PodmanRestore) -> None:
        self.create()
        write_json(self.path / "podman-restore.json", asdict(record))

    def upload_state(self, container: str) -> UploadState | None:
        raw = read_json(self.path / f"{container}.upload.json")
        if not isinstance(raw, dict):
            return None
        with contextlib.suppress(TypeError):
            return UploadState(**raw)
        return None

    def save_upload_state(self, container: str, state: UploadState) -> None:
        self.create()
        write_json(self.path / f"{container}.upload.json", asdict(state))

    def upload_states(self) -> dict[str, UploadState]:
        """Every upload state in the folder, by container."""
        found = {}
        for path in self.path.glob("*.upload.json"):
            container = path.name.removesuffix(".upload.json")
            state = self.upload_state(container)
            if state is not None:
                found[container] = state
        return found
