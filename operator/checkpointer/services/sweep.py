"""What piles up on a node and in the bucket, cleared: work folders, open uploads, kept local checkpoints.

An object's folder normally goes with the object's last step. It outlives it when the agent was
killed at the wrong moment (between the object's last status write and the folder's removal), when
the object was deleted while this agent was down, or on purpose: a checkpoint handed over for
signing keeps it until the controller's word (then settled as checkpoint.settle says, by the agent's
event handler, or here after a restart), a failed one keeps it while its object exists, and one
whose spool an UploadFailed Warning named keeps it until an administrator removes it.

The agent's ledger (archive/ledger.py) names the multipart uploads it opened and the local
checkpoints `keep: true` left in containers' folders; the sweep ends those no live object needs,
each upload by the id recorded. Less often it also lists the bucket's open uploads under each
storage's prefix, and aborts those under a checkpoint's folder that no unfinished
ContainerCheckpoint of any node, through any storage on that bucket, writes to: what a deletion
while every agent was down, a crash before an upload's id was recorded, or an upload opened by
hand, left.

Every decision is a pure function below; `sweep` does the I/O.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
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
from checkpointer.models import CheckpointStorage, ContainerCheckpoint, NameRef, ObjectStatus
from checkpointer.reasons import FINISHED, Phase, Reason
from checkpointer.services.checkpoint import settle
from checkpointer.services.node import Node
from checkpointer.services.validation import location

log = logging.getLogger(__name__)
ARCHIVE_SUFFIXES = tuple(
    f"{suffix}{encrypted}" for suffix in (".tar", ".tar.zst", ".tar.gz") for encrypted in ("", layout.ENCRYPTED_SUFFIX)
)


@dataclass(frozen=True)
class ObjectState:
    """A live object of the node, as the sweep sees it."""

    phase: str
    completed: datetime.datetime | None = None
    deleting: bool = False

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ObjectState:
        status = ObjectStatus.of(obj)
        deleting = bool((obj.get("metadata") or {}).get("deletionTimestamp"))
        return cls(status.phase or "", parse_time(status.completion_time), deleting)


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
    SETTLE = "settle"  # a handed-over checkpoint's folder: as the controller's word says (checkpoint.settle)


# --- decisions (pure) ----------------------------------------------------------------------------


def folder_verdict(state: ObjectState | None, *, held: bool, handed_over: bool) -> Verdict:
    """What becomes of a work folder.

    One an UploadFailed Warning named to an administrator stays, whatever becomes of its object. A
    handed-over checkpoint's folder (podman's local checkpoints and the spool wait for the signing)
    is settled once the object Succeeded, Failed or is being deleted. Otherwise a folder goes once its
    object is gone or Succeeded; a Failed one keeps it while the object exists.

    A handed-over folder whose object is gone is only removed: whether it had been signed, and its
    archive restored elsewhere since, cannot be known any more, so its container is not restored in
    place; podman's local checkpoint stays in the container's folder, the way back by hand.
    """
    if held:
        return Verdict.KEEP
    if state is None:
        return Verdict.REMOVE
    if handed_over and (state.finished or state.deleting):
        return Verdict.SETTLE
    return Verdict.REMOVE if state.phase == Phase.SUCCEEDED else Verdict.KEEP


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


def live_folders(
    checkpoints: list[ContainerCheckpoint], storages: list[CheckpointStorage]
) -> dict[tuple[str, str], set[str]]:
    """The folders that unfinished checkpoints may write to, by bucket (validation.location). Pure.

    Each checkpoint's folder under the prefix of every storage on a bucket, not only its own
    storage's: an upload is judged against every storage's live checkpoints, so that storages whose
    prefixes nest (refused by validation, but they may predate it) never take each other's uploads
    for orphans. A finished checkpoint never uploads again: an upload left open in its folder (a
    crash between opening it and recording its id) is an orphan.
    """
    live = [c for c in checkpoints if c.status.phase not in FINISHED]
    found: dict[tuple[str, str], set[str]] = {}
    for storage in storages:
        found.setdefault(location(storage), set()).update(layout.archive_dir(storage.spec.prefix, c) for c in live)
    return found


def orphan_uploads(prefix: str, uploads: list[tuple[str, str]], live_dirs: set[str]) -> list[tuple[str, str]]:
    """The open uploads of archives under `prefix` whose folder no live checkpoint writes to.

    Only keys shaped as a checkpoint writes them (`<prefix>/<namespace>/<folder>/<container>.tar…`);
    `live_dirs` are the archive folders of every unfinished ContainerCheckpoint, on every node,
    under every storage's prefix on the bucket (live_folders).
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


def sweep(node: Node, bucket: bool = False, working: Callable[[str], bool] = lambda uid: False) -> Swept:
    """One sweep of the node; `bucket` also lists every storage's open uploads (costlier: less often).

    `working(uid)`: a handler of this agent is at work on that object now. Its folder is that handler's
    to end, even once the object is gone: the handler finds out at its next write and gives back what
    it stopped, which needs the folder's markers."""
    swept = Swept()
    root = node.settings.spool_dir
    # What may be orphaned is read first, the objects second: whatever a live object started before
    # the first read, the object listing that follows includes it.
    folders = {path: uid for path in root.iterdir() if (uid := WorkFolder.uid_of(path))}
    uploads = node.ledger.uploads()
    kept = node.ledger.kept()
    storages, in_bucket = _bucket_uploads(node) if bucket else ([], {})
    if not (folders or uploads or kept or any(in_bucket.values())):
        return swept
    selector = f"{NODE_LABEL}={node.settings.node_name}"
    bodies = {
        str(o["metadata"]["uid"]): o for plural in (CHECKPOINTS, RESTORES) for o in node.kube.list_all(plural, selector)
    }
    states = {uid: ObjectState.of(o) for uid, o in bodies.items()}
    for path, uid in folders.items():
        if working(uid):
            continue
        folder = WorkFolder(path)
        state = states.get(uid)
        gone = state is None
        _abort_abandoned(node, folder, gone=gone)
        verdict = folder_verdict(state, held=folder.held(), handed_over=folder.handed_over())
        if verdict == Verdict.SETTLE:
            settle(node, bodies[uid])  # the Succeeded or Failed event's handler missed it (a restart)
            swept.folders += not folder.exists()
        elif verdict == Verdict.REMOVE:
            log.info("sweep: removing work folder %s: its object is %s", path, "gone" if gone else "done")
            folder.remove()
            swept.folders += 1
    swept.uploads += _abort_unowned(node, [u for u in uploads if upload_unowned(u, states)])
    swept.local_checkpoints += _remove_kept(node, kept, states)
    if any(in_bucket.values()):
        swept.uploads += _abort_orphans(node, storages, in_bucket)
    if swept.total:
        log.info(
            "sweep: removed %d work folders, aborted %d uploads, removed %d local checkpoints",
            swept.folders,
            swept.uploads,
            swept.local_checkpoints,
        )
    return swept


def _abort_abandoned(node: Node, folder: WorkFolder, gone: bool) -> None:
    """Abort the uploads a deadline or a deletion left open, by the ids recorded, once their storage answers."""
    for container, state in folder.upload_states().items():
        if not state.upload_id or not (state.abandoned or gone):
            continue
        try:
            node.store(NameRef(name=state.storage)).abort_upload(state.key, state.upload_id)
        except (Failure, *StorageError) as e:
            log.info("the upload of %s stays open for now: %s", state.key, e)
            continue
        log.info("aborted the open upload %s of %s", state.upload_id, state.key)
        if folder.exists():  # a folder held for its administrator stays: ask the bucket only once
            folder.save_upload_state(container, replace(state, upload_id="", abandoned=False))


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


def _bucket_uploads(node: Node) -> tuple[list[CheckpointStorage], dict[str, list[tuple[str, str]]]]:
    """Every storage, and the open uploads under each one's prefix, by storage name."""
    storages = node.kube.storages()
    found: dict[str, list[tuple[str, str]]] = {}
    for storage in storages:
        try:
            found[storage.metadata.name] = node.store(NameRef(name=storage.metadata.name)).open_uploads(
                storage.spec.prefix
            )
        except (Failure, *StorageError) as e:
            log.info("sweep: the open uploads of storage %s are not known now: %s", storage.metadata.name, e)
    return storages, found


def _abort_orphans(node: Node, storages: list[CheckpointStorage], in_bucket: dict[str, list[tuple[str, str]]]) -> int:
    live = live_folders([ContainerCheckpoint.model_validate(o) for o in node.kube.list_all(CHECKPOINTS)], storages)
    by_name = {s.metadata.name: s for s in storages}
    aborted = 0
    for name, uploads in in_bucket.items():
        try:
            store = node.store(NameRef(name=name))
        except Failure as e:  # gone or unreadable since the listing
            log.info("sweep: the open uploads of storage %s stay for now: %s", name, e.message)
            continue
        for key, upload_id in orphan_uploads(store.prefix, uploads, live.get(location(by_name[name]), set())):
            try:
                if not store.abort_upload(key, upload_id):
                    continue  # ended meanwhile
            except StorageError as e:
                log.info("sweep: the upload of %s stays open for now: %s", key, e)
                continue
            log.info("sweep: aborted upload %s of %s: no unfinished ContainerCheckpoint writes there", upload_id, key)
            aborted += 1
    return aborted
