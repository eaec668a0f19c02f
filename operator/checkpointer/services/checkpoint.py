"""The agent's side of a ContainerCheckpoint: checkpoint each container, spool, upload, report.

Nothing lost (docs/failure-semantics.md): the containers are resolved and recorded in the object's
work folder before the first is stopped, and a marker is written before each checkpoint. Until an
archive is confirmed in the bucket, podman's local checkpoint and the spool stay on the node. A
restarted agent never checkpoints a container twice: with a finished spool it hashes it again and
uploads it; without one the checkpoint was cut short, and it gives the container back (restores it
in place when CRIU had stopped it) before the object fails with CheckpointInterrupted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import kopf

from checkpointer import layout
from checkpointer.adapters.kube import CHECKPOINTS
from checkpointer.adapters.podman import Container, PodmanError, checkpoint_in_progress, criu_supports
from checkpointer.archive import spool as spooling
from checkpointer.archive.codec import Chunk
from checkpointer.archive.spool import Digest, GrowingFile
from checkpointer.archive.store import ArchiveStore, Cancelled, StorageError, StoredMismatch
from checkpointer.archive.workfolder import CHECKPOINT, SpoolRecord, Target, UploadState, WorkFolder
from checkpointer.conditions import now
from checkpointer.errors import Failure, Retry
from checkpointer.models import Archive, CheckpointSpec, Compression, ContainerCheckpoint
from checkpointer.reasons import Phase, Reason
from checkpointer.services.node import EXCLUDE_LABEL, Node, classify
from checkpointer.settings import Settings
from checkpointer.status import Conflict, StatusWriter, event_subject

log = logging.getLogger(__name__)
ACTIVE = (Phase.SCHEDULED, Phase.CHECKPOINTING, Phase.UPLOADING)


def select_targets(spec: CheckpointSpec, containers: list[Container], latest: Container | None) -> list[Container]:
    """Expand containers/all/latest into the containers to checkpoint. Pure, for unit tests."""
    if spec.all:
        running = [c for c in containers if c.running and dict(c.labels).get(EXCLUDE_LABEL) != "true"]
        if not running:
            raise Failure(Reason.CONTAINER_NOT_FOUND, "all: there are no running containers on the node")
        return running
    if spec.latest:
        if latest is None:
            raise Failure(Reason.CONTAINER_NOT_FOUND, "latest: there are no containers on the node")
        chosen = [latest]
    else:
        by_key = {c.name: c for c in containers} | {c.id: c for c in containers}
        chosen = []
        for ref in spec.containers:
            found = by_key.get(ref) or next((c for c in containers if len(ref) >= 12 and c.id.startswith(ref)), None)
            if found is None:
                raise Failure(Reason.CONTAINER_NOT_FOUND, f"container {ref!r} does not exist on the node")
            chosen.append(found)
    stopped = [c.name for c in chosen if not c.running]
    if stopped:
        raise Failure(
            Reason.CONTAINER_NOT_RUNNING,
            f"container {', '.join(stopped)} is not running (state {chosen[0].state}); only running "
            "containers can be checkpointed",
        )
    return chosen


def retry_delay(attempt: int, first: float, cap: float) -> float:
    """Exponential backoff: `first`, doubling with each attempt, never above `cap`. Pure."""
    return float(min(cap, first * 2 ** max(0, attempt - 1)))


def run(node: Node, body: dict[str, Any]) -> None:
    ccp = ContainerCheckpoint.model_validate(body)
    if ccp.status.phase not in ACTIVE:
        return
    meta = ccp.metadata
    status = StatusWriter(node.kube, CHECKPOINTS, body)
    job = Checkpoint(node, ccp, status, WorkFolder.of(node.settings.spool_dir, CHECKPOINT, meta))
    log.info("checkpoint %s/%s: %s", meta.namespace, meta.name, ccp.status.phase)
    try:
        job.run()
    except Failure as e:
        log.warning("checkpoint %s/%s failed: %s: %s", meta.namespace, meta.name, e.reason, e.message)
        if not job.keep_folder:
            job.folder.remove()
        try:
            job.status.phase(Phase.FAILED, e.reason, e.message)
        except Conflict as c:
            log.info("checkpoint %s/%s: %s", meta.namespace, meta.name, c)
            return
        raise
    except Conflict as e:
        # The controller failed it or it is gone: someone else has the last word; stop here.
        log.info("checkpoint %s/%s: stopped: %s", meta.namespace, meta.name, e)


@dataclass
class Checkpoint:
    """One ContainerCheckpoint's run on its node."""

    node: Node
    ccp: ContainerCheckpoint
    status: StatusWriter
    folder: WorkFolder
    # Set once the object is being deleted: uploads stop, and the containers are given back.
    cancelled: threading.Event = field(default_factory=threading.Event)
    # A failure that leaves the spool on the node on purpose (an upload past its deadline).
    keep_folder: bool = False
    all_targets: list[Target] = field(default_factory=list)

    @property
    def spec(self) -> CheckpointSpec:
        return self.ccp.spec

    @property
    def settings(self) -> Settings:
        return self.node.settings

    @property
    def storage_name(self) -> str:
        ref = self.ccp.status.storage_ref
        return ref.name if ref else ""

    def run(self) -> None:
        targets = self.all_targets = self.targets()
        names = ", ".join(t.name for t in targets)
        if self.ccp.status.phase == Phase.SCHEDULED:
            self.status.phase(Phase.CHECKPOINTING, Reason.CHECKPOINTING, f"checkpointing {names}")
        store = (
            self.node.store(self.ccp.status.storage_ref) if self.spec.export and self.ccp.status.storage_ref else None
        )
        directory = layout.archive_dir(store.prefix, self.ccp) if store else ""
        archives = {a.container: a for a in self.ccp.status.archives}
        for i, target in enumerate(targets):
            if target.name in archives:
                continue  # uploaded before a restart
            archives[target.name] = self.one(target, store, directory)
            if i < len(targets) - 1:  # the last one goes out with the final phase, in one write
                self.status.write({"archives": _dump(archives.values())})
        if store is not None:
            started = str(self.status.status.get("startTime") or now(precise=True))
            manifest = layout.manifest(self.ccp, _dump(archives.values()), self.node.host(), started, now(precise=True))
            try:
                store.put_manifest(directory, manifest)
            except StorageError as e:
                raise Retry(Reason.UPLOAD_RETRYING, f"the manifest could not be written: {e}", delay=5) from None
        where = f" to {store.uri(directory)}/" if store else " (kept on the node)"
        self.status.phase(
            Phase.SUCCEEDED, Reason.SUCCEEDED, f"checkpointed {names}{where}", archives=_dump(archives.values())
        )
        log.info(
            "checkpoint %s/%s: checkpointed %s%s", self.ccp.metadata.namespace, self.ccp.metadata.name, names, where
        )
        if store is not None and not self.spec.keep and not self.spec.pre_checkpoint:
            # After the status, off the time a user waits: the archives are in the bucket now.
            for target in targets:
                self.release_local_checkpoint(target)
        self.folder.remove()

    def targets(self) -> list[Target]:
        """The containers of this checkpoint, resolved once and recorded before any is stopped."""
        recorded = self.folder.targets()
        if recorded is not None:
            return recorded
        try:
            # Each podman call costs a few hundred milliseconds through the CLI: ask only what the spec needs.
            runtime = self.node.runtime
            latest = self.spec.latest
            chosen = select_targets(
                self.spec, [] if latest else runtime.containers(), runtime.latest() if latest else None
            )
        except PodmanError as e:
            raise Failure(classify(e, Reason.CHECKPOINT_FAILED), e.message) from None
        targets = [Target(c.name, c.id) for c in chosen]
        self.folder.save_targets(targets)
        return targets

    # --- one container -------------------------------------------------------------------------------

    def one(self, target: Target, store: ArchiveStore | None, directory: str) -> Archive:
        record = self.folder.spool_record(target.name)
        if self.status.deleting:
            key = layout.archive_key(directory, target.name, self.spec.compress)
            raise self.cancel(target, store.abort_uploads if store else None, key)
        if record is None and self.folder.marked(target.name):
            raise self.give_back(
                target,
                Reason.CHECKPOINT_INTERRUPTED,
                f"the agent restarted while checkpointing {target.name}; it is not checkpointed twice",
                store.abort_uploads if store else None,
                layout.archive_key(directory, target.name, self.spec.compress),
            )
        if store is None:
            self.folder.mark(target.name)
            stats = self.podman_checkpoint(target, None, None, directory)
            return Archive(container=target.name, containerID=target.id, stats=stats)
        key = layout.archive_key(directory, target.name, self.spec.compress)
        if record is None:
            record = self.export(target, store, key, directory)
        else:
            self.upload_again(target, store, key, record)
        self.status.progress(record.digest.size, record.digest.size, force=True)
        return Archive(
            container=target.name,
            containerID=record.container_id,
            uri=store.uri(key),
            key=key,
            size=record.digest.size,
            sha256=record.digest.sha256,
            compression=record.compression,
            stats=record.stats,
        )

    def export(self, target: Target, store: ArchiveStore, key: str, directory: str) -> SpoolRecord:
        """Checkpoint with podman into the spool while the upload reads it; returns the finished spool's record."""
        self.require_space()
        compression = self.spec.compress
        # Podman compresses the export itself where it can (the CLI): then half the bytes cross the
        # pipe, and the agent only hashes, spools and uploads them.
        spooled = Compression.NONE if self.node.runtime.compresses(compression) else compression
        self.folder.mark(target.name)
        spool = GrowingFile(self.spool_path(target), self.settings.part_size)
        written: tuple[Digest, int] | None = None

        def write(chunks: Iterable[Chunk]) -> None:
            nonlocal written
            written = spooling.write(chunks, spool, spooled, self.settings.zstd_level)

        with ThreadPoolExecutor(1, thread_name_prefix=f"upload-{target.name}") as pool:
            uploading = pool.submit(self.upload, target, store, key, spool, None)
            log.info(
                "checkpoint %s/%s: podman checkpoints %s",
                self.ccp.metadata.namespace,
                self.ccp.metadata.name,
                target.name,
            )
            try:
                stats = self.podman_checkpoint(target, write, store, directory)
                if written is None:
                    raise Failure(Reason.CHECKPOINT_FAILED, f"podman produced no archive for {target.name}")
            except BaseException as e:
                spool.finish(e)
                uploading.exception()  # the upload aborts itself on the spool's bad verdict
                raise self.after_failed_export(target, e, store, key) from None
            spool.finish()
            digest, raw = written
            log.info(
                "checkpoint %s/%s: podman exported %s, %d bytes",
                self.ccp.metadata.namespace,
                self.ccp.metadata.name,
                target.name,
                digest.size,
            )
            record = SpoolRecord(target.name, target.id, compression, raw, digest, stats)
            self.folder.save_spool_record(record)
            self.status.phase(
                Phase.UPLOADING, Reason.UPLOADING, f"checkpointed {target.name}; uploading {digest.size} bytes"
            )
            error = uploading.exception()
        if error is not None:
            self.upload_failed(target, store, key, error)
        self.confirm(target, store, key, record)
        return record

    def upload_again(self, target: Target, store: ArchiveStore, key: str, record: SpoolRecord) -> None:
        """Upload a finished spool after a failure or a restart, from what it holds now."""
        try:
            digest = spooling.digest_file(self.spool_path(target), record.digest.part_size)
        except OSError as e:
            digest = None
            log.warning("the spool of %s cannot be read: %s", target.name, e)
        if digest != record.digest:
            raise self.give_back(
                target,
                Reason.ARCHIVE_CORRUPT,
                f"the spool of {target.name} on the node is not what podman exported (it changed or is gone); "
                "it was not uploaded",
                store.abort_uploads,
                key,
            )
        try:
            store.verify(key, digest)
            return  # completed before a restart: only the status was missing
        except (StoredMismatch, *StorageError):
            pass
        self.status.phase(
            Phase.UPLOADING, Reason.UPLOAD_RETRYING, f"uploading the spooled archive of {target.name} again"
        )
        try:
            self.upload(target, store, key, GrowingFile.finished(self.spool_path(target), digest), digest.size)
        except Exception as e:
            self.upload_failed(target, store, key, e)
        self.confirm(target, store, key, record)

    def upload(self, target: Target, store: ArchiveStore, key: str, spool: GrowingFile, total: int | None) -> None:
        state = self.folder.upload_state(target.name)
        state = state if state is not None and state.key == key else UploadState(key=key, storage=self.storage_name)

        def started(upload_id: str) -> None:
            self.folder.save_upload_state(target.name, replace(state, upload_id=upload_id))

        def progress(done: int) -> None:
            self.status.progress(done, total)
            if self.status.deleting:
                self.cancelled.set()

        store.upload(
            key, spool, upload_id=state.upload_id, on_started=started, on_progress=progress, cancelled=self.cancelled
        )

    def confirm(self, target: Target, store: ArchiveStore, key: str, record: SpoolRecord) -> None:
        """Stored equals reported: the object's size and part checksums are the spool's."""
        try:
            store.verify(key, record.digest)
        except StoredMismatch as e:
            with contextlib.suppress(*StorageError):  # the next upload replaces it either way
                store.delete(key)
            self.upload_failed(target, store, key, e)
        except StorageError as e:
            self.upload_failed(target, store, key, e)

    def upload_failed(self, target: Target, store: ArchiveStore, key: str, error: BaseException) -> None:
        """Retry later with backoff, or past the deadline fail and keep the spool; always raises."""
        if isinstance(error, Cancelled) or self.status.deleting:
            raise self.cancel(target, None, key)
        if isinstance(error, Failure | Retry | Conflict):
            raise error
        settings = self.settings
        state = self.folder.upload_state(target.name) or UploadState(key=key, storage=self.storage_name)
        now_s = time.time()
        since = state.failing_since or now_s
        attempts = state.attempts + 1
        elapsed = now_s - since
        where = self.spool_path(target)
        if elapsed >= settings.upload_deadline_seconds:
            abandoned = True
            try:
                store.abort_uploads(key)
                abandoned = False
            except StorageError:
                pass  # aborted by the node's sweep once the storage answers again
            self.folder.save_upload_state(target.name, replace(state, attempts=attempts, abandoned=abandoned))
            self.keep_folder = True
            message = (
                f"the upload of {target.name} kept failing for {elapsed:.0f}s, past the deadline "
                f"(CHECKPOINTER_UPLOAD_DEADLINE_SECONDS); the archive stays on node {settings.node_name} "
                f"at {where}: {error}"
            )
            kopf.warn(
                event_subject("ContainerCheckpoint", self.ccp.metadata),
                reason=str(Reason.UPLOAD_FAILED),
                message=message,
            )
            raise Failure(Reason.UPLOAD_FAILED, message)
        delay = min(
            retry_delay(attempts, settings.upload_retry_seconds, settings.upload_retry_max_seconds),
            max(1.0, settings.upload_deadline_seconds - elapsed),
        )
        self.folder.save_upload_state(target.name, replace(state, failing_since=since, attempts=attempts))
        message = (
            f"upload of {target.name} failed (attempt {attempts}); retrying in {delay:.0f}s from the node's "
            f"spool: {error}"
        )
        log.warning("%s/%s: %s", self.ccp.metadata.namespace, self.ccp.metadata.name, message)
        self.status.phase(Phase.UPLOADING, Reason.UPLOAD_RETRYING, message)
        raise Retry(Reason.UPLOAD_RETRYING, message, delay=delay)

    # --- podman --------------------------------------------------------------------------------------

    def podman_checkpoint(
        self, target: Target, write: Any, store: ArchiveStore | None, directory: str
    ) -> dict[str, Any]:
        try:
            return self.node.runtime.checkpoint(self.spec, target.name, write, self.folder.path)
        except PodmanError as e:
            reason = classify(e, Reason.CHECKPOINT_FAILED)
            message = f"podman could not checkpoint {target.name}: {e.message}"
            spec = self.spec
            needs_tracking = reason == Reason.CHECKPOINT_FAILED and (spec.pre_checkpoint or spec.with_previous)
            # Through the REST API podman reports only runc's exit status; CRIU's own check says why.
            if needs_tracking and not criu_supports(self.settings, "mem_dirty_track"):
                reason = Reason.CRIU_FEATURE_MISSING
                message += "; CRIU is missing features: this kernel has no memory dirty tracking (mem_dirty_track)"
            if spec.keep:
                message += self.criu_log(target.name, store, directory)
            raise Failure(reason, message) from None

    def criu_log(self, name: str, store: ArchiveStore | None, directory: str) -> str:
        # Only inspect names the container's own folder, where CRIU leaves dump.log with --keep.
        container = self.node.runtime.inspect(name)
        if container is None or not container.static_dir:
            return "; CRIU's log could not be located: the container is gone"
        path = f"{container.static_dir}/dump.log"
        if store is None:
            return f"; CRIU's log is kept on the node at {path}"
        content = self.node.runtime.read_file(path)
        if content is None:
            return f"; CRIU's log was not found at {path}"
        key = layout.log_key(directory, name)
        store.put_log(key, content)
        return f"; CRIU's log: {store.uri(key)}"

    def after_failed_export(self, target: Target, error: BaseException, store: ArchiveStore, key: str) -> BaseException:
        """What to raise once an export failed: the container is given back first if CRIU had stopped it."""
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            reason, why = (
                Reason.INSUFFICIENT_SPACE,
                f"the node's spool ran out of space while podman exported {target.name}",
            )
        elif isinstance(error, Failure):
            reason, why = error.reason, error.message
        elif isinstance(error, Exception):
            reason, why = Reason.CHECKPOINT_INTERRUPTED, f"the export of {target.name} failed: {error}"
        else:  # the agent is stopping: the restarted agent finds the marker and gives the container back
            return error
        return self.give_back(target, reason, why, store.abort_uploads, key)

    def give_back(
        self, target: Target, reason: Reason, why: str, abort: Callable[[str], object] | None, key: str
    ) -> Failure:
        """The container runs again, restored in place when the checkpoint had stopped it; returns the Failure."""
        runtime = self.node.runtime
        deadline = time.monotonic() + self.settings.podman_timeout_seconds
        # A podman killed mid-checkpoint leaves its runc and CRIU to finish: wait for the real state.
        while checkpoint_in_progress(target.id) and time.monotonic() < deadline:
            time.sleep(0.5)
        if abort is not None:
            try:
                abort(key)
            except StorageError as e:
                log.warning("could not abort the uploads of %s: %s", key, e)
        self.spool_path(target).unlink(missing_ok=True)
        try:
            container = runtime.inspect(target.name)
            if container is None:
                return Failure(reason, f"{why}; container {target.name} is gone")
            if container.running:
                return Failure(reason, f"{why}; {target.name} kept running")
            runtime.restore_in_place(target.name)
        except PodmanError as e:
            self.keep_folder = True
            if e.unavailable:
                return Failure(
                    reason, f"{why}; podman does not answer, so the state of {target.name} is unknown ({e.message})"
                )
            return Failure(
                reason,
                f"{why}; {target.name} is stopped and could not be restored in place ({e.message}); podman's "
                f"local checkpoint of it stays on the node: `podman container restore {target.name}` brings it back",
            )
        log.info("%s: restored %s in place", why, target.name)
        return Failure(reason, f"{why}; {target.name} was restored in place from its local checkpoint and runs again")

    def cancel(self, current: Target, abort: Callable[[str], object] | None, key: str) -> Failure:
        """Deleted in flight: every container this checkpoint stopped runs again, its archive or not."""
        why = "the ContainerCheckpoint was deleted in flight"
        stopped = [t for t in self.all_targets if self.folder.marked(t.name)]
        if not stopped:
            return Failure(Reason.CANCELLED, f"{why}, before any container was checkpointed")
        # The current one first: its upload is aborted; the others' archives go with the object.
        ordered = sorted(stopped, key=lambda t: t != current)
        given = [self.give_back(t, Reason.CANCELLED, why, abort if t == current else None, key) for t in ordered]
        return Failure(Reason.CANCELLED, "; ".join([why] + [g.message.removeprefix(why + "; ") for g in given]))

    def release_local_checkpoint(self, target: Target) -> None:
        """The archive is in the bucket: what `--keep` kept on the node is no longer the only copy."""
        try:
            container = self.node.runtime.inspect(target.name)
            if container is not None and container.static_dir:
                self.node.runtime.remove_local_checkpoint(container)
        except Exception as e:  # a leftover on the node, never a reason to fail a stored archive
            log.warning("could not remove the local checkpoint of %s: %s", target.name, e)

    def require_space(self) -> None:
        spool_dir = self.settings.spool_dir
        stat = os.statvfs(spool_dir)
        free = stat.f_bavail * stat.f_frsize
        needed = self.settings.spool_min_free_bytes
        if free < needed:
            raise Failure(
                Reason.INSUFFICIENT_SPACE,
                f"the node's spool {spool_dir} has {free // 2**20} MiB free, less than the "
                f"{needed // 2**20} MiB a checkpoint needs (CHECKPOINTER_SPOOL_MIN_FREE_BYTES); nothing was "
                "checkpointed and the container keeps running",
            )

    def spool_path(self, target: Target) -> Path:
        return self.folder.file(f"{target.name}{self.spec.compress.suffix}")


def _dump(archives: Iterable[Archive]) -> list[dict[str, Any]]:
    return [a.model_dump(by_alias=True, exclude_none=True) for a in archives]
