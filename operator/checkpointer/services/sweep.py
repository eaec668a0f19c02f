"""What piles up on a node and in the bucket, cleared: work folders, open uploads, kept local checkpoints.

An object's folder normally goes with the object's last step. It outlives it when the agent was
killed at the wrong moment (between the object's last status write and the folder's removal), when
the object was deleted while this agent was down, or on purpose: a failed checkpoint may keep its
spool (an upload past its deadline) for as long as its object exists.

The agent's ledger (archive/ledger.py) names the multipart uploads it opened and the local
checkpoints `keep: true` left in containers' folders; the sweep ends those no live object needs.
Less often it also lists the bucket's open uploads under each storage's prefix, and aborts those
under a checkpoint's folder that no live ContainerCheckpoint of any node owns: what a deletion while
every agent was down, or an upload opened by hand, left.

Every decision is a pure function below; `sweep` does the I/O.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from checkpointer import NODE_LABEL, layout
from checkpointer.adapters.kube import CHECKPOINTS, RESTORES
from checkpointer.adapters.podman import Container, PodmanError
from checkpointer.archive.ledger import KeptCheckpoint, OpenUpload
from checkpointer.archive.store import StorageError
from checkpointer.archive.workfolder import WorkFolder
from checkpointer.conditions import parse_time
from checkpointer.errors import Failure
from checkpointer.models import ContainerCheckpoint, NameRef
from checkpointer.reasons import FINISHED, Phase, Reason
from checkpointer.services.node import Node

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = tuple(
    f"{suffix}{encrypted}" for suffix in (".tar", ".tar.zst", ".tar.gz") for encrypted in ("", layout.ENCRYPTED_SUFFIX)
)


@dataclass(frozen=True)
class ObjectState:
    """A live object of the node, as the sweep sees it."""

    phase: str
    completed: datetime.datetime | None = None

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ObjectState:
        status = obj.get("status") or {}
        return cls(str(status.get("phase") or ""), parse_time(str(status.get("completionTime") or "")))


@dataclass
class Swept:
    """What one sweep removed."""

    folders: int = 0
    uploads: int = 0
    local_checkpoints: int = 0

    @property
    def total(self) -> int:
        return self.folders + self.uploads + self.local_checkpoints


class Verdict(StrEnum):
    KEEP = "keep"  # still needed
    REMOVE = "remove"  # remove it, then forget it
    FORGET = "forget"  # nothing left to remove


# --- decisions (pure) ----------------------------------------------------------------------------


def upload_unowned(upload: OpenUpload, states: dict[str, ObjectState]) -> bool:
    """An upload the agent opened is no one's once its object is gone or finished: a finished
    checkpoint never uploads again, and aborting a completed upload changes nothing."""
    state = states.get(upload.uid)
    return state is None or state.finished


def kept_checkpoint_verdict(
    entry: KeptCheckpoint,
    state: ObjectState | None,
    container: Container | None,
    now: datetime.datetime,
    retention_seconds: float,
) -> Verdict:
    """A local checkpoint `keep` left goes once its object is gone, or finished `retention_seconds` ago
    (the time to read CRIU's logs); never while its container is stopped, for it is then the way back,
    nor while the object of a checkpoint without export lives, for it is then the checkpoint itself."""
    if container is None:
        return Verdict.FORGET  # podman removed the container's folder with it
    if not container.running:
        return Verdict.KEEP
    if state is None:
        return Verdict.REMOVE
    if not entry.exported or not state.finished or state.completed is None:
        return Verdict.KEEP
    return Verdict.REMOVE if (now - state.completed).total_seconds() >= retention_seconds else Verdict.KEEP


def orphan_uploads(prefix: str, uploads: list[tuple[str, str]], live_dirs: set[str]) -> list[tuple[str, str]]:
    """The open uploads of archives under `prefix` whose folder no live checkpoint writes to.

    Only keys shaped as a checkpoint writes them (`<prefix>/<namespace>/<folder>/<container>.tar…`);
    `live_dirs` are the archive folders of every live ContainerCheckpoint, on every node.
    """
    base = prefix.strip("/")
    found = []
    for key, upload_id in uploads:
        rest = key.removeprefix(f"{base}/") if base else key
        if base and rest == key:
            continue
        directory, _, name = key.rpartition("/")
        if rest.count("/") < 2 or not name.endswith(ARCHIVE_SUFFIXES):
            continue
        if not any(directory == live or directory.startswith(f"{live}/") for live in live_dirs):
            found.append((key, upload_id))
    return found


# --- the sweep -----------------------------------------------------------------------------------


def sweep(node: Node, bucket: bool = False) -> Swept:
    """One sweep of the node; `bucket` also lists every storage's open uploads (costlier: less often)."""
    swept = Swept()
    root = node.settings.spool_dir
    # What may be orphaned is read first, the objects second: whatever a live object started before
    # the first read, the object listing that follows includes it.
    folders = {path: uid for path in root.iterdir() if (uid := WorkFolder.uid_of(path))}
    uploads = node.ledger.uploads()
    kept = node.ledger.kept()
    in_bucket = _bucket_uploads(node) if bucket else {}
    if not (folders or uploads or kept or any(in_bucket.values())):
        return swept
    selector = f"{NODE_LABEL}={node.settings.node_name}"
    states = {
        str(o["metadata"]["uid"]): ObjectState.of(o)
        for plural in (CHECKPOINTS, RESTORES)
        for o in node.kube.list_all(plural, selector)
    }
    for path, uid in folders.items():
        folder = WorkFolder(path)
        state = states.get(uid)
        gone = state is None
        _abort_abandoned(node, folder, gone=gone)
        if state is None or state.phase == Phase.SUCCEEDED:
            log.info("sweep: removing work folder %s: its object is %s", path, "gone" if gone else "done")
            folder.remove()
            swept.folders += 1
    swept.uploads += _abort_unowned(node, [u for u in uploads if upload_unowned(u, states)])
    swept.local_checkpoints += _remove_kept(node, kept, states)
    if any(in_bucket.values()):
        swept.uploads += _abort_orphans(node, in_bucket)
    if swept.total:
        log.info(
            "sweep: removed %d work folders, aborted %d uploads, removed %d local checkpoints",
            swept.folders,
            swept.uploads,
            swept.local_checkpoints,
        )
    return swept


def _abort_abandoned(node: Node, folder: WorkFolder, gone: bool) -> None:
    """Abort the uploads a deadline or a deletion left open, once their storage answers."""
    for container, state in folder.upload_states().items():
        if not (state.abandoned or (gone and state.upload_id)):
            continue
        try:
            node.store(NameRef(name=state.storage)).abort_uploads(state.key)
        except (Failure, *StorageError) as e:
            log.info("the upload of %s stays open for now: %s", state.key, e)
            continue
        log.info("aborted the open upload of %s", state.key)
        if not gone:
            folder.save_upload_state(container, replace(state, abandoned=False))


def _abort_unowned(node: Node, uploads: list[OpenUpload]) -> int:
    done, aborted = [], 0
    for upload in uploads:
        try:
            ended = node.store(NameRef(name=upload.storage)).abort_upload(upload.key, upload.upload_id)
        except Failure as e:
            if e.reason != Reason.STORAGE_NOT_FOUND:  # a storage that is gone took its uploads with it
                log.info("sweep: the upload of %s stays open for now: %s", upload.key, e.message)
                continue
        except StorageError as e:
            log.info("sweep: the upload of %s stays open for now: %s", upload.key, e)
            continue
        else:
            if ended:
                log.info("sweep: aborted upload %s of %s: its object is gone or finished", upload.upload_id, upload.key)
                aborted += 1
        done.append(upload)
    node.ledger.drop(uploads=done)
    return aborted


def _remove_kept(node: Node, kept: list[KeptCheckpoint], states: dict[str, ObjectState]) -> int:
    now = datetime.datetime.now(datetime.UTC)
    retention = node.settings.local_checkpoint_retention_seconds
    removed, forgotten = 0, []
    for entry in kept:
        try:
            container = node.runtime.inspect(entry.container_id)
            verdict = kept_checkpoint_verdict(entry, states.get(entry.uid), container, now, retention)
            if verdict == Verdict.REMOVE and container is not None:
                node.runtime.remove_local_checkpoint(container)
                log.info(
                    "sweep: removed the local checkpoint %s kept of %s: its %s is gone or finished",
                    container.static_dir,
                    container.name,
                    entry.kind,
                )
                removed += 1
        except PodmanError as e:
            log.info("sweep: the local checkpoint of %s stays for now: %s", entry.container_id[:12], e.message)
            continue
        if verdict != Verdict.KEEP:
            forgotten.append(entry)
    node.ledger.drop(kept=forgotten)
    return removed


def _bucket_uploads(node: Node) -> dict[str, list[tuple[str, str]]]:
    """Every storage's open uploads under its prefix, by storage name."""
    found: dict[str, list[tuple[str, str]]] = {}
    for storage in node.kube.storages():
        try:
            found[storage.metadata.name] = node.store(NameRef(name=storage.metadata.name)).open_uploads(
                storage.spec.prefix
            )
        except (Failure, *StorageError) as e:
            log.info("sweep: the open uploads of storage %s are not known now: %s", storage.metadata.name, e)
    return found


def _abort_orphans(node: Node, in_bucket: dict[str, list[tuple[str, str]]]) -> int:
    live = [ContainerCheckpoint.model_validate(o) for o in node.kube.list_all(CHECKPOINTS)]
    aborted = 0
    for name, uploads in in_bucket.items():
        try:
            store = node.store(NameRef(name=name))
        except Failure as e:  # gone or unreadable since the listing
            log.info("sweep: the open uploads of storage %s stay for now: %s", name, e.message)
            continue
        live_dirs = {layout.archive_dir(store.prefix, c) for c in live}
        for key, upload_id in orphan_uploads(store.prefix, uploads, live_dirs):
            try:
                if not store.abort_upload(key, upload_id):
                    continue  # ended meanwhile
            except StorageError as e:
                log.info("sweep: the upload of %s stays open for now: %s", key, e)
                continue
            log.info("sweep: aborted upload %s of %s: no live ContainerCheckpoint writes there", upload_id, key)
            aborted += 1
    return aborted
