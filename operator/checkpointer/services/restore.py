"""The agent's side of a ContainerRestore: fetch, verify, check the node, restore, report.

Nothing runs before the archive is verified: its sha256 must match the one the checkpoint recorded
(status or manifest), or, when none was recorded, it must read as a whole checkpoint archive. A
restarted agent never restores twice: a marker is written before podman is called, and an
interrupted restore fails with RestoreInterrupted instead of trying again. A restart before that
marker downloads again.
"""

from __future__ import annotations

import logging
import posixpath
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from checkpointer.adapters.kube import RESTORES
from checkpointer.adapters.podman import PodmanError
from checkpointer.archive.codec import CorruptArchive, read_config
from checkpointer.archive.store import ArchiveMissing, ArchiveStore, StorageError
from checkpointer.archive.workfolder import RESTORE, WorkFolder
from checkpointer.errors import Failure, Retry
from checkpointer.models import ArchiveRef, ContainerRestore, NameRef
from checkpointer.reasons import Phase, Reason
from checkpointer.services.node import Node, classify
from checkpointer.services.scheduling import choose_storage
from checkpointer.status import Conflict, StatusWriter

log = logging.getLogger(__name__)
RESTORING = "restoring"


def run(node: Node, body: dict[str, Any]) -> None:
    crst = ContainerRestore.model_validate(body)
    if crst.status.phase not in (Phase.SCHEDULED, Phase.DOWNLOADING, Phase.RESTORING):
        return
    status = StatusWriter(node.kube, RESTORES, body)
    meta = crst.metadata
    folder = WorkFolder.of(node.settings.spool_dir, RESTORE, meta)
    try:
        _run(node, crst, status, folder)
    except Failure as e:
        log.warning("restore %s/%s failed: %s: %s", meta.namespace, meta.name, e.reason, e.message)
        folder.remove()
        try:
            status.phase(Phase.FAILED, e.reason, e.message)
        except Conflict:
            return
        raise
    except Conflict as e:
        log.info("restore %s/%s: stopped: %s", meta.namespace, meta.name, e)
        folder.remove()
        return
    except (*StorageError, OSError) as e:
        # Any other error keeps the folder: its marker is what stops a retry from restoring twice.
        raise Retry(Reason.DOWNLOADING, f"the archive could not be fetched yet: {e}", delay=5) from None
    # Kept until here for the same reason.
    folder.remove()


def _run(node: Node, crst: ContainerRestore, status: StatusWriter, folder: WorkFolder) -> None:
    if folder.marked(RESTORING):
        raise Failure(
            Reason.RESTORE_INTERRUPTED,
            "the agent restarted while podman was restoring; it does not restore twice. Check the node "
            "for the container and delete it before retrying with a new ContainerRestore",
        )
    archive = crst.status.archive
    if archive is None:
        raise Failure(Reason.ARCHIVE_NOT_FOUND, "the controller resolved no archive for this restore")
    folder.create()
    store = node.store(archive.storage_ref)
    status.phase(Phase.DOWNLOADING, Reason.DOWNLOADING, f"downloading {store.uri(archive.key)}")
    expected = archive.sha256 or store.manifest_sha256(archive.key)
    path = folder.file(_local_name(archive.key))
    digest = _fetch(store, archive.key, path, status)
    log.info("restore %s/%s: downloaded %s to the node", crst.metadata.namespace, crst.metadata.name, archive.key)
    if expected and digest != expected:
        raise Failure(
            Reason.ARCHIVE_CORRUPT, f"sha256 of {archive.key} is {digest}, expected {expected}; nothing was restored"
        )
    # A matching sha256 proves the bytes are those podman exported: reading up to config.dump is
    # enough. Without one, the whole archive is read, so that a damaged one never reaches podman.
    try:
        config = read_config(path, whole=not expected)
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"{e}; nothing was restored") from None
    previous = _previous(node, crst.spec.previous, folder, status) if crst.spec.previous else None

    image = str(config.get("rootfsImageName") or config.get("rootfsImageID") or "")
    name = crst.spec.name or str(config.get("name") or "")
    runtime = node.runtime
    # Two independent questions to podman, each a few hundred milliseconds through the CLI: asked together.
    try:
        with ThreadPoolExecutor(2) as pool:
            image_found = pool.submit(lambda: not image or runtime.image_exists(image))
            name_taken = pool.submit(lambda: bool(name) and runtime.inspect(name) is not None)
            if not image_found.result():
                raise Failure(
                    Reason.IMAGE_NOT_FOUND,
                    f"image {image!r} of the checkpointed container is not on node {crst.spec.node_name}; "
                    "load or pull it there first",
                )
            if name_taken.result():
                raise Failure(
                    Reason.NAME_IN_USE,
                    f"a container named {name!r} already exists on node {crst.spec.node_name}; set spec.name "
                    "to restore under another name",
                )
    except PodmanError as e:
        raise Failure(
            classify(e, Reason.RESTORE_FAILED), f"podman could not be asked about the node: {e.message}"
        ) from None

    folder.mark(RESTORING)
    status.phase(Phase.RESTORING, Reason.RESTORING, f"restoring {name or 'container'} with podman")
    log.info("restore %s/%s: podman restores %s", crst.metadata.namespace, crst.metadata.name, name or "the container")
    try:
        stats = runtime.restore(crst.spec, path, previous)
    except PodmanError as e:
        _remove_half_restored(node, name)
        raise Failure(classify(e, Reason.RESTORE_FAILED), f"podman could not restore: {e.message}") from None
    restored = runtime.inspect(name) if name else None
    status.phase(
        Phase.SUCCEEDED,
        Reason.SUCCEEDED,
        f"restored {name} on {crst.spec.node_name}",
        containerID=restored.id if restored else "",
        containerName=name,
        stats=stats,
    )
    log.info("restore %s/%s: restored %s", crst.metadata.namespace, crst.metadata.name, name or "the container")


def _local_name(key: str) -> str:
    """The node-side file name: a zstd archive is stored decompressed (see ArchiveStore.download)."""
    return posixpath.basename(key).removesuffix(".zst")


def _fetch(store: ArchiveStore, key: str, path: Path, status: StatusWriter) -> str:
    try:
        digest, size = store.download(key, path, status.progress)
    except ArchiveMissing as e:
        raise Failure(Reason.ARCHIVE_NOT_FOUND, str(e)) from None
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"{e}; nothing was restored") from None
    status.progress(size, size, force=True)
    return digest


def _previous(node: Node, ref: ArchiveRef, folder: WorkFolder, status: StatusWriter) -> Path:
    storage = choose_storage(ref.storage_ref, node.kube.storages())
    store = node.store(NameRef(name=storage.metadata.name))
    path = folder.file("previous-" + _local_name(ref.key))
    digest = _fetch(store, ref.key, path, status)
    if ref.sha256 and digest != ref.sha256:
        raise Failure(
            Reason.ARCHIVE_CORRUPT, f"sha256 of previous archive {ref.key} is {digest}, expected {ref.sha256}"
        )
    return path


def _remove_half_restored(node: Node, name: str) -> None:
    if not name:
        return
    try:
        if node.runtime.inspect(name) is not None:
            node.runtime.remove(name)
    except PodmanError as e:
        log.warning("could not remove half-restored container %s: %s", name, e)
