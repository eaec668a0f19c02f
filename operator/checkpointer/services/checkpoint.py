"""The agent's side of a ContainerCheckpoint: checkpoint each container, spool, upload, report.

Nothing lost (docs/failure-semantics.md): the containers are resolved and recorded in the object's
work folder before the first is stopped, and a marker is written before each checkpoint. Until the
controller has signed the archives' manifest, podman's local checkpoint and the spool stay on the
node, and a signing that fails gives the containers back (settle). An upload is aborted only by the
id its start recorded: never another's upload of the same key. A restarted agent never checkpoints
a container twice: with a finished spool it hashes it again and uploads it; without one the
checkpoint was cut short, and it gives the container back (restores it in place when CRIU had
stopped it) before the object fails with CheckpointInterrupted.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from checkpointer import layout, metrics
from checkpointer.adapters.cri import drain
from checkpointer.adapters.kube import CHECKPOINTS
from checkpointer.adapters.podman import Container, PodmanError, checkpoint_in_progress, criu_supports
from checkpointer.archive import manifest
from checkpointer.archive import spool as spooling
from checkpointer.archive.codec import Chunk, ConfigurationTap
from checkpointer.archive.ledger import KeptCheckpoint, OpenUpload
from checkpointer.archive.spool import Digest, GrowingFile
from checkpointer.archive.store import ArchiveStore, Cancelled, StorageError, StoredMismatch
from checkpointer.archive.workfolder import CHECKPOINT, SpoolRecord, Target, UploadState, WorkFolder
from checkpointer.conditions import now
from checkpointer.errors import Failure, Retry
from checkpointer.models import (
    Archive,
    ArchiveStream,
    CheckpointSpec,
    CheckpointStatus,
    Compression,
    ContainerCheckpoint,
    ObjectStatus,
)
from checkpointer.reasons import ConditionType, Phase, Reason
from checkpointer.services.capabilities import live_export_refusal
from checkpointer.services.node import EXCLUDE_LABEL, NAMESPACE_LABEL, Node, classify
from checkpointer.services.pods import PodContainer, pod_containers, pod_record
from checkpointer.services.signing import signing_requested
from checkpointer.services.space import Estimate, refusal
from checkpointer.settings import Settings
from checkpointer.status import Conflict, StatusWriter, post_event

log = logging.getLogger(__name__)
ACTIVE = (Phase.SCHEDULED, Phase.CHECKPOINTING, Phase.UPLOADING)
# Asks that the archive's parts be readable while they land, for a restore that follows the checkpoint.
STREAM_ANNOTATION = "checkpointer.dev/stream"
# How often the parts that landed are published in status at most, but for the last.
STREAM_WRITE_SECONDS = 0.2


def streams_parts(body: dict[str, Any]) -> bool:
    """Whether a checkpoint makes its parts readable as they land (status.streams): one a
    ContainerMigration owns, or one annotated checkpointer.dev/stream: "true". Pure.

    Streaming costs the bucket a server-side copy of every part, so a checkpoint nobody follows
    does without it."""
    meta = body.get("metadata") or {}
    if (meta.get("annotations") or {}).get(STREAM_ANNOTATION) == "true":
        return True
    return any(
        o.get("kind") == "ContainerMigration" and str(o.get("apiVersion", "")).startswith("checkpointer.dev/")
        for o in meta.get("ownerReferences") or []
    )


@dataclass
class Stream:
    """What status.streams says of one archive: its key and, for each part that landed in order, the
    sha256 of the archive up to that part's end."""

    container: str
    key: str
    part_size: int
    landed: dict[int, str] = field(default_factory=dict)
    size: int | None = None

    def entry(self) -> dict[str, Any]:
        parts: list[str] = []
        while len(parts) in self.landed:
            parts.append(self.landed[len(parts)])
        entry: dict[str, Any] = {"container": self.container, "key": self.key, "partSize": self.part_size}
        entry["digests"] = parts
        if self.size is not None:
            entry["size"] = self.size
        return entry


def select_targets(
    spec: CheckpointSpec, containers: list[Container], namespace: str, admins: frozenset[str]
) -> list[Container]:
    """Expand containers/all/latest into the containers to checkpoint. Pure, for unit tests.

    A container belongs to the namespace its label checkpointer.dev/namespace names; a checkpoint
    may take only its own namespace's containers, unless its namespace is an admin namespace.
    `all` and `latest` see only those. A named container of anyone else fails the checkpoint before
    any container is touched, and the message says no more of it than the checkpoint named.
    """
    admin = namespace in admins
    permitted = [c for c in containers if admin or c.label(NAMESPACE_LABEL) == namespace]
    whose = "" if admin else f" labelled {NAMESPACE_LABEL}={namespace}"
    if spec.all:
        running = [c for c in permitted if c.running and c.label(EXCLUDE_LABEL) != "true"]
        if not running:
            raise Failure(Reason.CONTAINER_NOT_FOUND, f"all: there are no running containers{whose} on the node")
        return running
    if spec.latest:
        if not permitted:
            raise Failure(Reason.CONTAINER_NOT_FOUND, f"latest: there are no containers{whose} on the node")
        # The last of equals: the CLI's times are whole seconds, and it lists the oldest first.
        chosen = [max(reversed(permitted), key=lambda c: c.created)]
    else:
        by_key = {c.name: c for c in containers} | {c.id: c for c in containers}
        chosen = []
        for ref in spec.containers:
            found = by_key.get(ref) or next((c for c in containers if len(ref) >= 12 and c.id.startswith(ref)), None)
            if found is None:
                raise Failure(Reason.CONTAINER_NOT_FOUND, f"container {ref!r} does not exist on the node")
            if not admin and found.label(NAMESPACE_LABEL) != namespace:
                raise Failure(
                    Reason.CONTAINER_NOT_PERMITTED,
                    f"container {ref!r} is not labelled {NAMESPACE_LABEL}={namespace}, so a ContainerCheckpoint "
                    f"in namespace {namespace} may not checkpoint it; nothing was checkpointed and no container "
                    "was touched. Run the container with --label "
                    f"{NAMESPACE_LABEL}={namespace}, or checkpoint it from an admin namespace",
                )
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
    job.streaming = streams_parts(body)
    if signing_requested(ccp.status):
        # Stored and handed to the controller to sign: never checkpointed again. What it left on the
        # node waits for the controller's word, unless the object is being deleted (settle).
        settle(node, body)
        return
    log.info("checkpoint %s/%s: %s", meta.namespace, meta.name, ccp.status.phase)
    try:
        job.run()
    except Failure as e:
        log.warning("checkpoint %s/%s failed: %s: %s", meta.namespace, meta.name, e.reason, e.message)
        if not job.keep_folder:
            job.folder.remove()
        else:
            job.folder.drop_hand_over()  # given back (or tried) here: not once more by settle
        try:
            job.status.phase(Phase.FAILED, e.reason, e.message)
        except Conflict as c:
            log.info("checkpoint %s/%s: %s", meta.namespace, meta.name, c)
            return
        raise
    except Conflict as e:
        # The controller failed it or it is gone: someone else has the last word; stop here.
        log.info("checkpoint %s/%s: stopped: %s", meta.namespace, meta.name, e)
        fresh = node.kube.get(CHECKPOINTS, meta.namespace, meta.name)
        if ended_without_us(fresh, meta.uid):
            # Nothing will sign what was stored, nor restore it: what this run stopped runs again.
            why = "the ContainerCheckpoint was deleted or failed while its containers were checkpointed"
            log.info("checkpoint %s/%s: %s", meta.namespace, meta.name, job.give_all_back(Reason.CANCELLED, why))


def ended_without_us(fresh: dict[str, Any] | None, uid: str) -> bool:
    """Whether a checkpoint this agent was running has ended under it: gone (its finalizer removed and
    deleted, or made anew under its name) or failed by someone else. Pure."""
    if fresh is None or str(fresh["metadata"].get("uid")) != uid:
        return True
    return ObjectStatus.of(fresh).phase == Phase.FAILED


# The Succeeded or Failed event and the sweep may settle one object at once: one at a time restores.
_settling = threading.Lock()


def settle(node: Node, body: dict[str, Any], gone: bool = False) -> None:
    """After the hand-over for signing, what the agent kept on the node follows the controller's word.

    Succeeded: the archives are signed, podman's local checkpoints and the spool go. Failed (the
    manifest could not be signed), or deleted before it was signed: the archives will never be
    restored, so every container the checkpoint stopped is restored in place, and runs again. A no-op
    for an object without a handed-over work folder on this node (one stat), so it may be called on
    every event of a finished object. `gone`: `body` is the last state of an object deleted since.
    """
    ccp = ContainerCheckpoint.model_validate(body)
    folder = WorkFolder.of(node.settings.spool_dir, CHECKPOINT, ccp.metadata)
    phase = ccp.status.phase
    # Deleted before the hand-over was written: run() sees the deletion and cancels instead.
    deleting = (gone or bool(ccp.metadata.deletion_timestamp)) and signing_requested(ccp.status)
    if phase != Phase.SUCCEEDED and phase != Phase.FAILED and not deleting:
        return  # still waiting for the controller
    with _settling:
        if not folder.handed_over():
            return
        meta = ccp.metadata
        job = Checkpoint(node, ccp, StatusWriter(node.kube, CHECKPOINTS, body), folder)
        if phase == Phase.SUCCEEDED:
            job.let_go()
            log.info(
                "checkpoint %s/%s: signed; released podman's local checkpoints and the spool", meta.namespace, meta.name
            )
            return
        ready = ccp.status.condition(ConditionType.READY)
        if phase == Phase.FAILED:
            failed = ready.reason if ready else ""
            reason = Reason(failed) if failed in Reason.__members__.values() else Reason.ARCHIVE_UNTRUSTED
            why = f"the archives were stored, but the checkpoint failed before they were signed ({reason})"
        else:
            reason = Reason.CANCELLED
            why = "the ContainerCheckpoint was deleted before its archives were signed"
        message = job.give_all_back(reason, why)
        log.info("checkpoint %s/%s: %s", meta.namespace, meta.name, message)
        post_event("ContainerCheckpoint", meta, "Warning", reason, message)


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
    # The age recipients of the storage's encryption Secret; empty: archives are stored as they are.
    recipients: tuple[str, ...] = ()
    # Each container's configuration digests, and its inspection, once read (see configuration()).
    configs: dict[str, manifest.Configuration] = field(default_factory=dict)
    inspected: dict[str, Container | None] = field(default_factory=dict)
    # When podman was first asked to stop a container (status.frozenTime): a migration's downtime starts here.
    frozen: str = ""
    # By container: the archives whose parts land readable (streams_parts), as published.
    streaming: bool = False
    streams: dict[str, Stream] = field(default_factory=dict)
    # A Pod's checkpoint (podRef): the Pod as its agent read it, and its containers by name.
    pod: dict[str, Any] | None = None
    pod_members: dict[str, PodContainer] = field(default_factory=dict)
    _streamed_at: float = 0.0
    _stream_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def spec(self) -> CheckpointSpec:
        return self.ccp.spec

    @property
    def settings(self) -> Settings:
        return self.node.settings

    @property
    def of_pod(self) -> bool:
        """A Pod's checkpoint: its node's container runtime checkpoints and leaves the containers running."""
        return self.spec.pod_ref is not None

    @property
    def exporter(self) -> str:
        """Who writes the archive's tar, for messages."""
        return "the container runtime" if self.of_pod else "podman"

    @property
    def storage_name(self) -> str:
        ref = self.ccp.status.storage_ref
        return ref.name if ref else ""

    def run(self) -> None:
        began = time.monotonic()
        if self.folder.targets() is None and not self.of_pod:  # resolved before a restart: it passed then
            self.require_safe_live_export()
        targets = self.all_targets = self.targets()
        self.status.steps.took("resolve", began, containers=len(targets))
        names = ", ".join(t.name for t in targets)
        if self.ccp.status.phase == Phase.SCHEDULED:
            self.status.phase(Phase.CHECKPOINTING, Reason.CHECKPOINTING, f"checkpointing {names}")
        store = (
            self.node.store(self.ccp.status.storage_ref) if self.spec.export and self.ccp.status.storage_ref else None
        )
        directory = layout.archive_dir(store.prefix, self.ccp) if store else ""
        archives = {a.container: a for a in self.ccp.status.archives}
        if store is not None and not self.of_pod:  # a Pod's runtime tells no footprint up front
            self.require_room([t for t in targets if t.name not in archives])
        for i, target in enumerate(targets):
            if target.name in archives:
                continue  # uploaded before a restart
            archives[target.name] = self.one(target, store, directory)
            if i < len(targets) - 1:  # the last one goes out with the final phase, in one write
                self.status.write(CheckpointStatus(archives=list(archives.values())))
        if store is not None:
            started = self.status.phased.start_time or now(precise=True)
            entries = [self.manifest_entry(a) for a in archives.values()]
            if self.of_pod and not self.pod_members:  # resolved before a restart: the Pod for the manifest
                with contextlib.suppress(Failure):
                    self.pod_containers()
            pod = pod_record(self.pod) if self.of_pod and self.pod is not None else None
            finished = now(precise=True)
            document = manifest.Manifest.of(self.ccp, entries, self.host(), started, finished, pod).document()
            began = time.monotonic()
            try:
                sha256 = store.put_manifest(directory, document)
            except StorageError as e:
                raise Retry(Reason.UPLOAD_RETRYING, f"the manifest could not be written: {e}", delay=5) from None
            self.status.steps.took("manifest", began)
            # Only the controller holds the signing key: it checks this manifest against the object,
            # signs it and writes Succeeded (controller/signer.py). Until it has, podman's local checkpoints and
            # the spool stay: a signing that fails gives the containers back (settle).
            where = f" to {store.uri(directory)}/"
            self.folder.hand_over()
            self.status.phase(
                Phase.UPLOADING,
                Reason.SIGNING,
                f"checkpointed {names}{where}; the controller signs the manifest",
                patch=CheckpointStatus(archives=list(archives.values()), manifest_sha256=sha256),
            )
        else:
            where = " (kept on the node)"
            self.status.phase(
                Phase.SUCCEEDED,
                Reason.SUCCEEDED,
                f"checkpointed {names}{where}",
                patch=self.frozen_patch(archives=list(archives.values())),
            )
        log.info(
            "checkpoint %s/%s: checkpointed %s%s", self.ccp.metadata.namespace, self.ccp.metadata.name, names, where
        )
        if store is None:
            self.folder.remove()

    def freezing(self) -> None:
        """Podman is asked to checkpoint now: unless leaveRunning, CRIU freezes the container and it
        serves nothing from here on. Taken on the clock before the call, not when podman returns."""
        if not self.frozen:
            self.frozen = now(precise=True)

    def frozen_patch(self, **fields: Any) -> CheckpointStatus:
        """`fields` and status.frozenTime, in the next phase write (no write of its own before podman runs)."""
        written = self.status.status
        first = bool(self.frozen) and not (isinstance(written, CheckpointStatus) and written.frozen_time)
        return CheckpointStatus(**fields, **({"frozen_time": self.frozen} if first else {}))

    def let_go(self) -> None:
        """The archives are signed (the object Succeeded): podman's local checkpoints and the spool go."""
        targets = self.folder.targets()
        # A Pod's runtime keeps no local checkpoint; and a podman container may share a Pod container's name.
        if targets is not None and not self.spec.keep and not self.spec.pre_checkpoint and not self.of_pod:
            for target in targets:
                self.release_local_checkpoint(target)
        self.folder.remove()

    def give_all_back(self, reason: Reason, why: str) -> str:
        """The archives were handed over but will never be restored (signing failed, or the object is
        deleted before it was signed): every container this checkpoint stopped runs again, restored in
        place from podman's local checkpoint. Returns what became of them."""
        targets = self.folder.targets() or []
        given = [self.give_back(t, reason, why, None, "") for t in targets if self.folder.marked(t.name)]
        if self.keep_folder:
            # Podman could not restore one: its local checkpoint stays, and the message says how to
            # restore it by hand. Not tried again on every sweep; the folder goes with the object.
            self.folder.drop_hand_over()
        else:
            self.folder.remove()
        return "; ".join([why] + [g.message.removeprefix(why + "; ") for g in given])

    def targets(self) -> list[Target]:
        """The containers of this checkpoint, resolved once and recorded before any is stopped."""
        recorded = self.folder.targets()
        if recorded is not None:
            return recorded
        if self.of_pod:
            targets = [Target(c.name, c.id) for c in self.pod_containers()]
            self.folder.save_targets(targets)
            return targets
        try:
            # One podman call, a few hundred milliseconds through the CLI: the list carries the labels
            # that say whose each container is, and the creation times that `latest` compares.
            namespace = self.ccp.metadata.namespace
            chosen = select_targets(self.spec, self.node.runtime.containers(), namespace, self.settings.admins)
        except PodmanError as e:
            raise Failure(classify(e, Reason.CHECKPOINT_FAILED), e.message) from None
        targets = [Target(c.name, c.id) for c in chosen]
        self.folder.save_targets(targets)
        return targets

    # --- one container -------------------------------------------------------------------------------

    def one(self, target: Target, store: ArchiveStore | None, directory: str) -> Archive:
        record = self.folder.spool_record(target.name)
        if self.status.deleting:
            key = self.key(directory, target, record)
            raise self.cancel(target, self.aborter(store, target), key)
        if record is None and self.folder.marked(target.name):
            raise self.give_back(
                target,
                Reason.CHECKPOINT_INTERRUPTED,
                f"the agent restarted while checkpointing {target.name}; it is not checkpointed twice",
                self.aborter(store, target),
                self.key(directory, target, record),
            )
        if store is None:
            self.folder.mark(target.name)
            began = time.monotonic()
            self.freezing()
            stats = self.podman_checkpoint(target, None, None, directory)
            self.status.steps.took("checkpoint", began, container=target.name)
            return Archive(container=target.name, containerID=target.id, stats=stats)
        if record is None and self.ccp.status.storage_ref:
            # Read before the container is stopped: a storage that cannot encrypt fails the checkpoint first.
            keys = self.node.encryption(self.ccp.status.storage_ref)
            self.recipients = keys.recipients if keys else ()
        key = self.key(directory, target, record)
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
        spooled = Compression.NONE if not self.of_pod and self.node.runtime.compresses(compression) else compression
        # A Pod's tar comes in one burst at the end of the runtime's work, at the pace of its copy, which
        # one core of zstd outruns: its workers would only take the other core from the runtime and the
        # upload, and their buffers 40 MiB.
        zstd_threads = 0 if self.of_pod else -1
        self.folder.mark(target.name)
        spool = GrowingFile(self.spool_path(target), self.settings.part_size)
        written: tuple[Digest, int] | None = None

        def write(chunks: Iterable[Chunk]) -> None:
            nonlocal written
            written = spooling.write(chunks, spool, spooled, self.settings.zstd_level, self.recipients, zstd_threads)

        with ThreadPoolExecutor(2, thread_name_prefix=f"upload-{target.name}") as pool:
            uploading = pool.submit(self.upload, target, store, key, spool, None)
            log.info(
                "checkpoint %s/%s: %s checkpoints %s",
                self.ccp.metadata.namespace,
                self.ccp.metadata.name,
                self.exporter,
                target.name,
            )
            began = time.monotonic()
            self.freezing()
            try:
                if self.of_pod:
                    stats = self.runtime_checkpoint(target, write)
                else:
                    stats = self.podman_checkpoint(target, write, store, directory)
                if written is None:
                    raise Failure(Reason.CHECKPOINT_FAILED, f"{self.exporter} produced no archive for {target.name}")
            except BaseException as e:
                spool.finish(e)
                uploading.exception()  # the upload aborts itself on the spool's bad verdict
                raise self.after_failed_export(target, e, store, key) from None
            spool.finish()
            exported = time.monotonic()
            self.status.steps.took("checkpoint", began, container=target.name)
            # While the upload goes on: the configuration podman kept beside its local checkpoint.
            if not self.of_pod:  # a Pod's was read from the runtime's tar
                pool.submit(self.configuration, target)
            digest, raw = written
            log.info(
                "checkpoint %s/%s: %s exported %s, %d bytes",
                self.ccp.metadata.namespace,
                self.ccp.metadata.name,
                self.exporter,
                target.name,
                digest.size,
            )
            # Podman's own zstd frame does not say the size of the tar it holds.
            uncompressed = raw if spooled is compression else None
            record = SpoolRecord(target.name, target.id, compression, raw, digest, stats, self.recipients, uncompressed)
            self.folder.save_spool_record(record)
            self.status.phase(
                Phase.UPLOADING,
                Reason.UPLOADING,
                f"checkpointed {target.name}; uploading {digest.size} bytes",
                patch=self.frozen_patch(),
            )
            error = uploading.exception()
        if error is not None:
            self.upload_failed(target, store, key, error)
        self.confirm(target, store, key, record)
        # The upload ran beside the export: this is the part of it a checkpoint waits for after.
        self.status.steps.took("upload", exported, container=target.name)
        return record

    def upload_again(self, target: Target, store: ArchiveStore, key: str, record: SpoolRecord) -> None:
        """Upload a finished spool after a failure or a restart, from what it holds now."""
        try:
            digest, prefixes = spooling.hashed_file(self.spool_path(target), record.digest.part_size)
        except OSError as e:
            digest, prefixes = None, ()
            log.warning("the spool of %s cannot be read: %s", target.name, e)
        if digest != record.digest:
            raise self.give_back(
                target,
                Reason.ARCHIVE_CORRUPT,
                f"the spool of {target.name} on the node is not what podman exported (it changed or is gone); "
                "it was not uploaded",
                self.aborter(store, target),
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
        began = time.monotonic()
        try:
            spool = GrowingFile.finished(self.spool_path(target), digest, prefixes)
            self.upload(target, store, key, spool, digest.size)
        except Exception as e:
            self.upload_failed(target, store, key, e)
        self.confirm(target, store, key, record)
        self.status.steps.took("upload", began, container=target.name)

    def upload(self, target: Target, store: ArchiveStore, key: str, spool: GrowingFile, total: int | None) -> None:
        state = self.folder.upload_state(target.name)
        state = state if state is not None and state.key == key else UploadState(key=key, storage=self.storage_name)

        def started(upload_id: str) -> None:
            # In the ledger first: a folder lost later does not leave the upload open for ever.
            self.node.ledger.add_upload(OpenUpload(self.ccp.metadata.uid, self.storage_name, key, upload_id))
            self.folder.save_upload_state(target.name, replace(state, upload_id=upload_id))

        uploaded = metrics.byte_counter(metrics.UPLOADED, self.settings.node_name, self.storage_name)

        def progress(done: int) -> None:
            uploaded(done)
            self.status.progress(done, total)
            if self.status.deleting:
                self.cancelled.set()

        on_part = None
        if self.streaming:
            stream = self.streams.setdefault(target.name, Stream(target.name, key, spool.part_size))

            def on_part(index: int, sha256: str, length: int) -> None:
                with self._stream_lock:
                    stream.landed[index] = sha256
                    last = length < spool.part_size
                    if last:
                        stream.size = index * spool.part_size + length
                self.publish_streams(force=last)

        store.upload(
            key,
            spool,
            upload_id=state.upload_id,
            on_started=started,
            on_progress=progress,
            cancelled=self.cancelled,
            on_part=on_part,
        )
        if on_part is not None:
            stream = self.streams[target.name]
            stream.size = spool.verdict()
            self.publish_streams(force=True)

    def publish_streams(self, force: bool) -> None:
        """status.streams: the parts that landed, for a restore that reads them as they do. Like
        progress, informative until the end: a write that fails is skipped, the next carries it."""
        with self._stream_lock:
            if not force and time.monotonic() - self._streamed_at < STREAM_WRITE_SECONDS:
                return
            self._streamed_at = time.monotonic()
            entries = [ArchiveStream.model_validate(s.entry()) for s in self.streams.values()]
        with contextlib.suppress(Exception):
            self.status.write(CheckpointStatus(streams=entries), patient=force)

    def confirm(self, target: Target, store: ArchiveStore, key: str, record: SpoolRecord) -> None:
        """Stored equals reported: the object's size and part checksums are the spool's."""
        try:
            store.verify(key, record.digest)
            self.node.ledger.upload_done(self.ccp.metadata.uid, key)
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
                self.abort_own(store, target, key)
                abandoned = False
            except StorageError:
                pass  # aborted by the node's sweep once the storage answers again
            self.folder.save_upload_state(target.name, replace(state, attempts=attempts, abandoned=abandoned))
            self.keep_folder = True
            self.folder.hold()  # the Warning below names it: it is the administrator's now
            message = (
                f"the upload of {target.name} kept failing for {elapsed:.0f}s, past the deadline "
                f"(CHECKPOINTER_UPLOAD_DEADLINE_SECONDS); the archive stays on node {settings.node_name} "
                f"at {where}: {error}"
            )
            post_event("ContainerCheckpoint", self.ccp.metadata, "Warning", Reason.UPLOAD_FAILED, message)
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
        if self.spec.keep:  # what podman keeps goes once nobody needs it (services/sweep.py)
            entry = KeptCheckpoint(self.ccp.metadata.uid, CHECKPOINT, target.id, exported=store is not None)
            self.node.ledger.add_kept(entry)
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
        return self.give_back(target, reason, why, self.aborter(store, target), key)

    def abort_own(self, store: ArchiveStore, target: Target, key: str) -> int:
        """Abort the multipart uploads of `key` this agent started for this object, by the ids it
        recorded (work folder and ledger), and no other; returns how many were still open."""
        uid = self.ccp.metadata.uid
        state = self.folder.upload_state(target.name)
        ids = {state.upload_id} if state is not None and state.key == key and state.upload_id else set()
        ids |= {u.upload_id for u in self.node.ledger.uploads() if (u.uid, u.key) == (uid, key)}
        aborted = sum(store.abort_upload(key, upload_id) for upload_id in sorted(ids))
        if self.streaming:
            store.delete_parts(key)  # the parts a restore could read go with the upload
        self.node.ledger.upload_done(uid, key)
        return aborted

    def aborter(self, store: ArchiveStore | None, target: Target) -> Callable[[str], object] | None:
        return None if store is None else functools.partial(self.abort_own, store, target)

    def give_back(
        self, target: Target, reason: Reason, why: str, abort: Callable[[str], object] | None, key: str
    ) -> Failure:
        """The container runs again, restored in place when the checkpoint had stopped it; returns the Failure."""

        def forget() -> None:
            """No archive comes of this run: its open uploads and its spool go."""
            if abort is not None:
                try:
                    abort(key)
                except StorageError as e:
                    log.warning("could not abort the uploads of %s: %s", key, e)
            self.spool_path(target).unlink(missing_ok=True)

        if self.of_pod:
            # The runtime never stops a Pod's container: nothing to give back but the bucket and the spool.
            forget()
            # An agent killed while the runtime wrote leaves it blocked on the FIFO until it is read.
            drain(self.runtime_fifo(target))
            return Failure(reason, f"{why}; {target.name} kept running (a Pod's container is never stopped)")
        runtime = self.node.runtime
        deadline = time.monotonic() + self.settings.podman_timeout_seconds
        # A podman killed mid-checkpoint leaves its runc and CRIU to finish: wait for the real state.
        while checkpoint_in_progress(target.id) and time.monotonic() < deadline:
            time.sleep(0.5)
        forget()
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

    def configuration(self, target: Target) -> manifest.Configuration:
        """The digests of the container's config.dump and spec.dump, as podman's local checkpoint holds
        them: the same files its export put into the archive. None for those that cannot be read."""
        if target.name in self.configs or self.of_pod:
            return self.configs.get(target.name, manifest.Configuration())
        files: dict[str, bytes] = {}
        try:
            container = self.inspected[target.name] = self.node.runtime.inspect(target.name)
            folder = container.static_dir if container else ""
            for name in manifest.CONFIGURATION_FILES if folder else ():
                content = self.node.runtime.read_file(f"{folder}/{name}")
                if content is not None:
                    files[name] = content
        except Exception as e:  # the archive's sha256 binds its configuration all the same
            log.warning("could not read the configuration of %s: %s", target.name, e)
        found = self.configs[target.name] = manifest.Configuration.of(files)
        return found

    def manifest_entry(self, archive: Archive) -> manifest.Entry:
        """The archive's entry in the manifest, from what this node knows of it beyond status."""
        target = next((t for t in self.all_targets if t.name == archive.container), None)
        configuration = self.configuration(target) if target else manifest.Configuration()
        image = None
        if self.of_pod:
            member = self.pod_members.get(archive.container)
            image = manifest.PodImage(image=member.image, imageID=member.image_id) if member else None
        return manifest.entry(archive, configuration, self.folder.spool_record(archive.container), image)

    # --- a Pod's containers, through the node's container runtime ------------------------------------

    def pod_containers(self) -> list[PodContainer]:
        """The Pod's containers to checkpoint, from the Pod as the API server has it now."""
        ref = self.spec.pod_ref
        assert ref is not None
        self.pod = self.node.kube.pod(self.ccp.metadata.namespace, ref.name)
        found = pod_containers(self.spec, self.pod, self.settings.node_name)
        self.pod_members = {c.name: c for c in found}
        return found

    def runtime_fifo(self, target: Target) -> Path:
        """Where the node's container runtime writes a Pod container's checkpoint: a FIFO in the work
        folder, at the same path for the runtime on the node and for the agent in its Pod."""
        return self.folder.file(f"{target.name}.runtime.fifo")

    def runtime_checkpoint(self, target: Target, write: Callable[[Iterable[Chunk]], None]) -> dict[str, Any]:
        """The node's container runtime checkpoints a Pod's container (CRI CheckpointContainer) as a
        plain tar into a FIFO, which `write` compresses into the spool as it comes, so that the upload
        overlaps the runtime's writing as it does podman's export; config.dump and spec.dump are kept
        on the way for the manifest. The container keeps running."""
        cri = self.node.cri
        if cri is None:
            raise Failure(
                Reason.RUNTIME_CANNOT_CHECKPOINT,
                f"the agent on node {self.settings.node_name} has no container runtime socket "
                "(CHECKPOINTER_CRI_SOCKET, chart value cri.socketPath), so it cannot checkpoint a Pod's container",
            )
        self.folder.create()
        tap = ConfigurationTap()
        try:
            cri.checkpoint_streamed(
                target.id,
                self.runtime_fifo(target),
                self.settings.cri_checkpoint_timeout_seconds,
                lambda chunks: write(tap.tap(chunks)),
            )
        except (Retry, Failure) as e:  # no second call: the object fails, the container runs on
            raise Failure(e.reason, f"the container runtime could not checkpoint {target.name}: {e.message}") from None
        self.configs[target.name] = manifest.Configuration.of(tap.files)
        return {}

    def host(self) -> dict[str, str]:
        """The node's versions for the manifest; a Pod's checkpoint adds its container runtime's."""
        host = dict(self.node.host())
        cri = self.node.cri if self.of_pod else None
        if cri is not None:
            with contextlib.suppress(Exception):  # the versions are informative; the archive is not
                version = cri.version()
                host |= {
                    "criRuntime": version.runtime_name,
                    "criVersion": version.runtime_version,
                    "criAPIVersion": version.runtime_api_version,
                }
        return host

    def release_local_checkpoint(self, target: Target) -> None:
        """The archive is in the bucket: what `--keep` kept on the node is no longer the only copy."""
        try:
            known = target.name in self.inspected
            container = self.inspected[target.name] if known else self.node.runtime.inspect(target.name)
            if container is not None and container.static_dir:
                self.node.runtime.remove_local_checkpoint(container)
        except Exception as e:  # a leftover on the node, never a reason to fail a stored archive
            log.warning("could not remove the local checkpoint of %s: %s", target.name, e)

    def require_safe_live_export(self) -> None:
        """The controller's LiveExportNotPermitted, asked again of this node's own podman before any
        container is resolved: a Lease that records no podman version yet is no way around it."""
        admin = self.ccp.metadata.namespace in self.settings.admins
        node = self.settings.node_name
        if live_export_refusal(self.spec, node, "", admin=admin) is None:
            return
        try:
            podman = self.node.host().get("podman", "")
        except PodmanError as e:
            raise Failure(classify(e, Reason.CHECKPOINT_FAILED), f"podman's version is unknown: {e.message}") from None
        why = live_export_refusal(self.spec, node, podman, admin=admin)
        if why is not None:
            raise Failure(Reason.LIVE_EXPORT_NOT_PERMITTED, why)

    def require_room(self, targets: list[Target]) -> None:
        """Refuse up front a checkpoint whose archives the spool cannot take (services/space.py)."""
        fresh = [t for t in targets if not self.folder.marked(t.name) and self.folder.spool_record(t.name) is None]
        if not fresh:
            return  # spooled or cut short before a restart: nothing new goes into the spool
        asked = time.monotonic()
        try:
            estimate = Estimate.of(self.node.runtime.footprint(t.name) for t in fresh)
        except PodmanError as e:
            message = f"podman could not tell the memory and root file system changes of the containers: {e.message}"
            raise Failure(classify(e, Reason.CHECKPOINT_FAILED), message) from None
        settings = self.settings
        usage = spooling.spool_usage(settings.spool_dir, settings.spool_max_bytes)
        why = refusal(estimate, usage, settings.spool_min_free_bytes, settings.spool_dir)
        if why is not None:
            raise Failure(Reason.INSUFFICIENT_SPACE, why)
        log.info(
            "checkpoint %s/%s: archives estimated at %d MiB in %.2fs, the spool has %d MiB free",
            self.ccp.metadata.namespace,
            self.ccp.metadata.name,
            estimate.total // 2**20,
            time.monotonic() - asked,
            usage.free_bytes // 2**20,
        )

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

    def encrypted(self, target: Target, record: SpoolRecord | None) -> bool:
        """Whether the archive of `target` is (or is to be) encrypted: a spool keeps what it was made as."""
        record = record if record is not None else self.folder.spool_record(target.name)
        return bool(record.recipients) if record is not None else bool(self.recipients)

    def key(self, directory: str, target: Target, record: SpoolRecord | None) -> str:
        """The archive's key; `.age` after it when encrypted. An export cut short keeps its upload's key."""
        state = self.folder.upload_state(target.name) if record is None else None
        if state is not None and directory:
            return state.key
        return layout.archive_key(directory, target.name, self.spec.compress, self.encrypted(target, record))

    def spool_path(self, target: Target) -> Path:
        return self.folder.file(posixpath.basename(self.key("", target, None)))
