"""The agent's side of a ContainerRestore: fetch, verify, check the node, restore, report.

Nothing runs before the archive is verified: its sha256 must match the one the checkpoint recorded
(status or manifest), or, when none was recorded, it must read as a whole checkpoint archive. A
restarted agent never restores twice: a marker is written before podman is called, and an
interrupted restore fails with RestoreInterrupted instead of trying again. A restart before that
marker downloads again.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from checkpointer import layout, metrics
from checkpointer.adapters.kube import RESTORES
from checkpointer.adapters.podman import PodmanError
from checkpointer.archive.codec import ContainerConfiguration, CorruptArchive, read_configuration
from checkpointer.archive.encryption import Keys
from checkpointer.archive.ledger import KeptCheckpoint
from checkpointer.archive.store import ArchiveMissing, ArchiveStore, StorageError
from checkpointer.archive.workfolder import RESTORE, WorkFolder
from checkpointer.errors import Failure, Retry
from checkpointer.models import ArchiveRef, Compression, ContainerRestore, NameRef
from checkpointer.reasons import Phase, Reason
from checkpointer.services import archive_policy, signing
from checkpointer.services.node import Node, classify
from checkpointer.services.scheduling import choose_storage
from checkpointer.settings import Settings
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
    began = time.monotonic()
    # Before a byte is fetched: is it an archive this cluster's controller signed?
    trust = _trust(node, store, archive.storage_ref, archive.key)
    expected = archive.sha256 or trust.sha256
    path = folder.file(_local_name(archive.key))
    keys = node.encryption(archive.storage_ref)
    digest = _fetch(node.settings, store, keys, archive.key, path, status, trust, archive.storage_ref.name)
    status.steps.took("download", began)
    began = time.monotonic()
    log.info("restore %s/%s: downloaded %s to the node", crst.metadata.namespace, crst.metadata.name, archive.key)
    if trust.signed and digest != trust.sha256:
        raise Failure(
            Reason.ARCHIVE_UNTRUSTED,
            f"the bytes of {store.uri(archive.key)} are not those its signed manifest records: sha256 {digest}, "
            f"signed {trust.sha256}; nothing was restored",
        )
    if expected and digest != expected:
        raise Failure(
            Reason.ARCHIVE_CORRUPT, f"sha256 of {archive.key} is {digest}, expected {expected}; nothing was restored"
        )
    # A matching sha256 proves the bytes are those podman exported: reading config.dump and
    # spec.dump is enough. Without one, the whole archive is read, so that a damaged one never
    # reaches podman.
    try:
        configuration = read_configuration(path, whole=not expected)
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"{e}; nothing was restored") from None
    archive_policy.require_safe_unpacking(path)  # every restore's: it guards the node, not the namespace
    config = configuration.config
    _check_policy(node, crst, configuration)
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

    status.steps.took("verify", began)
    folder.mark(RESTORING)
    status.phase(Phase.RESTORING, Reason.RESTORING, f"restoring {name or 'container'} with podman")
    log.info("restore %s/%s: podman restores %s", crst.metadata.namespace, crst.metadata.name, name or "the container")
    try:
        with status.steps.step("restore", container=name):
            stats = runtime.restore(crst.spec, path, previous)
    except PodmanError as e:
        _remove_half_restored(node, name)
        raise Failure(classify(e, Reason.RESTORE_FAILED), f"podman could not restore: {e.message}") from None
    restored = runtime.inspect(name) if name else None
    if crst.spec.keep and restored is not None:  # what podman kept goes once nobody needs it (services/sweep.py)
        node.ledger.add_kept(KeptCheckpoint(crst.metadata.uid, RESTORE, restored.id))
    status.phase(
        Phase.SUCCEEDED,
        Reason.SUCCEEDED,
        f"restored {name} on {crst.spec.node_name}",
        containerID=restored.id if restored else "",
        containerName=name,
        stats=stats,
    )
    log.info("restore %s/%s: restored %s", crst.metadata.namespace, crst.metadata.name, name or "the container")


def _check_policy(node: Node, crst: ContainerRestore, configuration: ContainerConfiguration) -> None:
    """Refuses an archive that asks for more than an ordinary container gets, unless the restore's
    namespace is an admin namespace (services/archive_policy.py)."""
    namespace = crst.metadata.namespace
    asked = archive_policy.not_permitted(configuration) + archive_policy.foreign_owner(configuration, namespace)
    if not asked:
        return
    admins = node.settings.admins
    if namespace in admins:
        log.info(
            "restore %s/%s: an admin namespace may restore an archive asking for %s",
            namespace,
            crst.metadata.name,
            "; ".join(asked),
        )
        return
    raise Failure(
        Reason.ARCHIVE_NOT_PERMITTED,
        f"the archive asks for {'; '.join(asked)}; only a restore in an admin namespace "
        f"({', '.join(sorted(admins))}) may restore it; nothing was restored",
    )


def _local_name(key: str) -> str:
    """The node-side file name: an archive is stored decrypted and decompressed (see ArchiveStore.download)."""
    return posixpath.basename(key).removesuffix(layout.ENCRYPTED_SUFFIX).removesuffix(".zst")


def download_limit(settings: Settings, free: int, stated: int | None) -> int:
    """How many bytes a download may write on the node. Pure.

    No more than the archive's manifest states it inflates to, nor CHECKPOINTER_MAX_ARCHIVE_BYTES,
    nor the spool's free space less its reserve (CHECKPOINTER_SPOOL_MIN_FREE_BYTES): a small object
    that inflates hugely ends as ArchiveCorrupt with the node's disk and the agent's memory bounded.
    """
    caps = [free - settings.spool_min_free_bytes]
    if settings.max_archive_bytes > 0:
        caps.append(settings.max_archive_bytes)
    if stated is not None:
        caps.append(stated)
    return max(0, min(caps))


def _fetch(
    settings: Settings,
    store: ArchiveStore,
    keys: Keys | None,
    key: str,
    path: Path,
    status: StatusWriter,
    trust: signing.Trust,
    storage: str = "",
) -> str:
    # The stated size is of the tar: only a zstd archive is decompressed on the way.
    stated = trust.uncompressed_size if layout.compression_of(key) is Compression.ZSTD else None
    stat = os.statvfs(path.parent)
    limit = download_limit(settings, stat.f_bavail * stat.f_frsize, stated)
    try:
        downloaded = metrics.byte_counter(metrics.DOWNLOADED, settings.node_name, storage)

        def progress(done: int, total: int) -> None:
            downloaded(done)
            status.progress(done, total)

        digest, size = store.download(key, path, progress, keys=keys, limit=limit)
    except ArchiveMissing as e:
        raise Failure(Reason.ARCHIVE_NOT_FOUND, str(e)) from None
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"{e}; nothing was restored") from None
    status.progress(size, size, force=True)
    return digest


def _previous(node: Node, ref: ArchiveRef, folder: WorkFolder, status: StatusWriter) -> Path:
    # Like source.archive (services/scheduling.py): a storage the namespace may use, a key in its folder.
    namespace = status.namespace
    storage = choose_storage(ref.storage_ref, node.kube.storages(), namespace=namespace)
    store = node.store(NameRef(name=storage.metadata.name))
    key = layout.resolve_archive_key(store.prefix, namespace, ref, node.settings.admins)
    path = folder.file("previous-" + _local_name(key))
    trust = _trust(node, store, NameRef(name=storage.metadata.name), key)
    keys = node.encryption(NameRef(name=storage.metadata.name))
    digest = _fetch(node.settings, store, keys, key, path, status, trust, storage.metadata.name)
    if trust.signed and digest != trust.sha256:
        raise Failure(
            Reason.ARCHIVE_UNTRUSTED, f"the bytes of previous archive {key} are not those its signed manifest records"
        )
    if ref.sha256 and digest != ref.sha256:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"sha256 of previous archive {key} is {digest}, expected {ref.sha256}")
    return path


def _trust(node: Node, store: ArchiveStore, ref: NameRef, key: str) -> signing.Trust:
    storage = node.kube.storage(ref.name)
    accept_unsigned = bool(storage and storage.spec.accept_unsigned_archives)
    return signing.archive_trust(store, key, accept_unsigned, lambda: signing.published_keys(node.kube, node.settings))


def _remove_half_restored(node: Node, name: str) -> None:
    if not name:
        return
    try:
        if node.runtime.inspect(name) is not None:
            node.runtime.remove(name)
    except PodmanError as e:
        log.warning("could not remove half-restored container %s: %s", name, e)
