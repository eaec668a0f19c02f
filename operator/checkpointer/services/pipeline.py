"""A ContainerRestore behind a ContainerCheckpoint that is still running: the restore starts before
the checkpoint ends (docs/architecture.md, "A restore behind its checkpoint").

The agent follows the checkpoint through the API server. A checkpoint that streams (status.streams)
publishes, once a part is readable as an object of its own, the sha256 of the archive up to that
part's end; the agent fetches each part, checks the archive so far against that sha256, decrypts and
decompresses it into the node's file, and judges the tar's members as they arrive
(archive_policy.UnpackingJudge): podman reads from a FIFO only bytes that were checked and judged.
Podman starts once config.dump and spec.dump passed the restore's policy and the node's checks, and
imports while the archive arrives; the end of the tar, without which podman restores nothing, is
held back until the checkpoint Succeeded, its signed manifest lists the archive, and the sha256 of
all the bytes is the signed one. A checkpoint that fails, or any check that fails, stops podman:
nothing is restored, and the container podman had created is removed.

A checkpoint that does not stream (or a restore this agent cannot feed podman as it streams: the
REST runtime, a previous archive) is waited for, and restored the usual way once it Succeeded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import zstandard

from checkpointer import layout
from checkpointer.adapters.kube import CHECKPOINTS
from checkpointer.adapters.podman import CliRuntime
from checkpointer.archive import encryption
from checkpointer.archive.codec import (
    STREAM_READ,
    CorruptArchive,
    configuration_of,
    configuration_tar,
    streamed_members,
)
from checkpointer.archive.encryption import Keys
from checkpointer.archive.store import ArchiveMissing, ArchiveStore, CappedFile, PlaintextSink, StorageError
from checkpointer.archive.workfolder import WorkFolder
from checkpointer.errors import Failure
from checkpointer.models import ContainerCheckpoint, ContainerRestore, NameRef, ResolvedArchive
from checkpointer.reasons import Phase, Reason
from checkpointer.services import archive_policy
from checkpointer.services.node import Node
from checkpointer.services.scheduling import RUNNING, resolve_restore_archive
from checkpointer.status import StatusWriter

log = logging.getLogger(__name__)
# How often the followed checkpoint is read while the restore waits for it.
FOLLOW_SECONDS = 0.1
# Parts fetched ahead of the one being decoded.
FETCH_AHEAD = 4
# How long a part is asked for while the bucket does not answer, podman waiting meanwhile.
PART_PATIENCE_SECONDS = 120.0


@dataclass(frozen=True)
class StreamView:
    """One archive of status.streams."""

    container: str
    key: str
    part_size: int
    digests: tuple[str, ...]
    size: int | None

    @classmethod
    def of(cls, entry: dict[str, Any]) -> StreamView:
        size = entry.get("size")
        return cls(
            container=str(entry.get("container") or ""),
            key=str(entry.get("key") or ""),
            part_size=int(entry.get("partSize") or 0),
            digests=tuple(str(p) for p in entry.get("digests") or []),
            size=int(size) if size is not None else None,
        )

    def count(self) -> int | None:
        """How many parts the archive has, once its size is known."""
        if self.size is None or self.part_size <= 0:
            return None
        return max(1, -(-self.size // self.part_size))


def chosen_stream(body: dict[str, Any], container: str) -> StreamView | None:
    """The stream of the container a restore reads (`container` from its checkpointRef, or the only
    one the checkpoint names), None while there is none. Pure."""
    entries = [StreamView.of(e) for e in (body.get("status") or {}).get("streams") or []]
    if container:
        return next((s for s in entries if s.container == container), None)
    spec = body.get("spec") or {}
    if len(spec.get("containers") or []) > 1 or spec.get("all"):
        return None  # which one is the restore's: said once it Succeeded, by the usual path
    return entries[0] if entries else None


def followable(stream: StreamView, succeeded: bool) -> bool:
    """Whether a restore reads this stream: one of the archives podman imports, with a part published.
    Also once its checkpoint Succeeded, if it published every part: a small archive can be published
    and signed between two looks of the restore's agent (or before that agent took the restore up),
    and its parts, read from the archive's range then, are checked and fed to podman the same way. Pure.
    """
    if not stream.digests or not stream.key.endswith((".zst", ".tar", ".age")):
        return False
    count = stream.count()
    return not succeeded or (count is not None and len(stream.digests) >= count)


class Follow:
    """The ContainerCheckpoint a restore follows, read through the API server."""

    def __init__(self, node: Node, namespace: str, name: str) -> None:
        self.node = node
        self.namespace = namespace
        self.name = name
        self.uid = ""
        self.body: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._read_at = 0.0

    def read(self, fresh_within: float = FOLLOW_SECONDS) -> dict[str, Any]:
        """The checkpoint as read at most `fresh_within` seconds ago; Failure once it is gone, made
        anew or Failed."""
        with self._lock:
            if time.monotonic() - self._read_at >= fresh_within or not self.body:
                found = self.node.kube.get(CHECKPOINTS, self.namespace, self.name)
                uid = str((found or {}).get("metadata", {}).get("uid") or "")
                if found is None or (self.uid and uid != self.uid):
                    raise Failure(
                        Reason.CHECKPOINT_NOT_FOUND,
                        f"ContainerCheckpoint {self.name!r} is gone while this restore followed it; "
                        "nothing was restored",
                    )
                self.uid, self.body, self._read_at = uid, found, time.monotonic()
            body = self.body
        status = body.get("status") or {}
        if status.get("phase") == Phase.FAILED:
            ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
            raise Failure(
                Reason.CHECKPOINT_NOT_READY,
                f"ContainerCheckpoint {self.name!r} failed ({ready.get('reason') or 'Failed'}: "
                f"{ready.get('message') or ''}); nothing was restored",
            )
        return body

    def phase(self) -> str:
        return str((self.read().get("status") or {}).get("phase") or "")


def follow(node: Node, crst: ContainerRestore, status: StatusWriter, folder: WorkFolder) -> ResolvedArchive | None:
    """Follow the restore's checkpoint. Returns the archive to restore the usual way once it
    Succeeded, or None once the container was restored from the parts as they landed."""
    ref = crst.spec.source.checkpoint_ref
    assert ref is not None  # the controller resolves no key only for a checkpointRef
    namespace = crst.metadata.namespace
    checkpoint = Follow(node, namespace, ref.name)
    status.phase(
        Phase.DOWNLOADING,
        Reason.WAITING_FOR_CHECKPOINT,
        f"waiting for ContainerCheckpoint {ref.name} to store its first part",
    )
    streamable = isinstance(node.runtime, CliRuntime) and crst.spec.previous is None
    while True:
        body = checkpoint.read()
        phase = (body.get("status") or {}).get("phase")
        stream = chosen_stream(body, ref.container or "") if streamable else None
        if stream is not None and followable(stream, succeeded=phase == Phase.SUCCEEDED):
            break
        if phase == Phase.SUCCEEDED:
            why = "it streams no parts" if streamable else "this node's podman cannot import a stream"
            log.info("restore %s/%s: %s Succeeded; %s: downloading it", namespace, crst.metadata.name, ref.name, why)
            return resolve_restore_archive(node.kube, crst, node.settings.admins)
        if phase not in RUNNING:
            raise Failure(
                Reason.CHECKPOINT_NOT_READY, f"ContainerCheckpoint {ref.name!r} is {phase}; nothing was restored"
            )
        time.sleep(FOLLOW_SECONDS)
    log.info(
        "restore %s/%s: streams %s from %s (%s, %d parts published)",
        namespace,
        crst.metadata.name,
        stream.key,
        ref.name,
        phase,
        len(stream.digests),
    )
    storage = ContainerCheckpoint.model_validate(body).status.storage_ref
    if storage is None:
        raise Failure(Reason.ARCHIVE_NOT_FOUND, f"ContainerCheckpoint {ref.name!r} streams without a storage")
    _require_own_folder(node, crst, stream.key, storage.name)
    Streamed(node, crst, status, folder, checkpoint, stream, storage.name).run()
    return None


def _require_own_folder(node: Node, crst: ContainerRestore, key: str, storage: str) -> None:
    """The key the checkpoint names lies in the restore's namespace folder, as every checkpointRef's does."""
    store = node.store(NameRef(name=storage))
    folder = layout.namespace_dir(store.prefix, crst.metadata.namespace)
    if not key.startswith(folder.rstrip("/") + "/") or ".." in key.split("/"):
        raise Failure(Reason.ARCHIVE_NOT_PERMITTED, f"{key} is not in namespace {crst.metadata.namespace}'s folder")


class _Flow:
    """What the stages of a streamed restore share: how far the node's file is written, how far its
    bytes were judged, whether the tail may go, and the first error."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.written = 0
        self.safe = 0
        self.ended = False
        self.judged = False
        self.released = False
        self.configured = False
        self.error: BaseException | None = None
        self.digest = ""
        self.size = 0

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def update(self, **fields: Any) -> None:
        with self.cond:
            for name, value in fields.items():
                setattr(self, name, value)
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float | None = None) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.error is not None or predicate(), timeout)
            self.check()


class _GrowingReader:
    """The node's file as the fetch writes it: reads wait for bytes and end where the fetch ended; a
    seek forward skips bytes without reading them (what the tar reader does over a member's data)."""

    def __init__(self, path: Path, flow: _Flow) -> None:
        self._file = path.open("rb", buffering=0)
        self._flow = flow
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        flow = self._flow
        want = STREAM_READ if size < 0 else size
        flow.wait(lambda: flow.written >= self._pos + want or flow.ended)
        self._file.seek(self._pos)
        data = self._file.read(max(0, min(want, flow.written - self._pos)))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = offset if whence == os.SEEK_SET else self._pos + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._file.close()


class _Counted:
    """The node's file: every write says how far it is written."""

    def __init__(self, path: Path, flow: _Flow) -> None:
        self._out = path.open("wb", buffering=0)
        self._flow = flow
        self.written = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        n = len(view)
        while view:  # unbuffered: a write may take less than it was given
            view = view[self._out.write(view) or 0 :]
        self.written += n
        self._flow.update(written=self.written)
        return n

    def close(self) -> None:
        self._out.close()


class Streamed:
    """One restore fed to podman from the parts of an archive as they land."""

    def __init__(
        self,
        node: Node,
        crst: ContainerRestore,
        status: StatusWriter,
        folder: WorkFolder,
        checkpoint: Follow,
        stream: StreamView,
        storage: str,
    ) -> None:
        self.node = node
        self.crst = crst
        self.status = status
        self.folder = folder
        self.checkpoint = checkpoint
        self.container = stream.container
        self.key = stream.key
        self.storage = storage
        self.store: ArchiveStore = node.store(NameRef(name=storage))
        self.keys: Keys | None = node.encryption(NameRef(name=storage))
        self.path = folder.file(posixpath.basename(self.key).removesuffix(layout.ENCRYPTED_SUFFIX).removesuffix(".zst"))
        self.flow = _Flow()
        self.dumps: dict[str, bytes] = {}

    def run(self) -> None:
        from checkpointer.services import restore  # the usual path's checks and podman call

        crst, flow = self.crst, self.flow
        began = time.monotonic()
        self.status.phase(
            Phase.DOWNLOADING, Reason.STREAMING, f"reading {self.store.uri(self.key)} while it is written"
        )
        threads = [
            threading.Thread(target=self._guard(self._fetch), name="stream-fetch", daemon=True),
            threading.Thread(target=self._guard(self._judge), name="stream-judge", daemon=True),
            threading.Thread(target=self._guard(self._verify), name="stream-verify", daemon=True),
        ]
        self.path.touch()
        for thread in threads:
            thread.start()
        try:
            flow.wait(lambda: flow.configured)
            self.status.steps.took("first-part", began)
            try:
                configuration = configuration_of(self.dumps)
            except CorruptArchive as e:
                raise Failure(Reason.ARCHIVE_CORRUPT, f"{e}; nothing was restored") from None
            restore.check_policy(self.node, crst, configuration)
            config = configuration.config
            name = crst.spec.name or str(config.get("name") or "")
            volumes = restore.named_volumes(config)
            head = configuration_tar(self.dumps)
            runtime = self.node.runtime
            assert isinstance(runtime, CliRuntime)
            with restore.CLAIMS.hold([f"container {name}", *(f"volume {v}" for v in volumes)]):
                spec, before, stale = restore.check_node(self.node, crst, config, name, volumes)

                def podman(judged: Any) -> dict[str, Any]:
                    return runtime.restore_streamed(judged, self.folder.path, head, self._feed)

                restore.run_podman(
                    self.node,
                    crst,
                    self.status,
                    self.folder,
                    spec,
                    self.path,
                    None,
                    name,
                    before,
                    config,
                    podman,
                    stale=stale,
                )
        except BaseException as e:
            flow.fail(e if flow.error is None else flow.error)
            raise
        finally:
            flow.fail(_Stopped())  # the stages stop, if they still run
            for thread in threads:
                thread.join(timeout=30)

    def _guard(self, stage: Any) -> Any:
        def run() -> None:
            try:
                stage()
            except (Failure, _Stopped) as e:
                self.flow.fail(e)
            except BaseException as e:
                # Whatever stopped a stage stops the restore: the podman it fed is stopped, and what
                # podman made of the bytes so far is removed (restore.run_podman).
                self.flow.fail(Failure(Reason.RESTORE_FAILED, f"the stream stopped: {e}; nothing was restored"))

        return run

    # --- the stages ----------------------------------------------------------------------------

    def _parts(self) -> Iterator[bytearray]:
        """The archive's stored bytes in order, each part checked against the sha256 its checkpoint's
        agent published for it before it is passed on."""
        digest = hashlib.sha256()
        size = 0
        pending: deque[tuple[int, str, Future[bytearray]]] = deque()
        index = 0  # the next part to ask for
        with ThreadPoolExecutor(FETCH_AHEAD, thread_name_prefix="stream-part") as pool:
            try:
                while True:
                    stream = self._stream()
                    count = stream.count()
                    while len(pending) < FETCH_AHEAD and index < len(stream.digests):
                        start = index * stream.part_size
                        length = stream.part_size
                        if count is not None and index == count - 1 and stream.size is not None:
                            length = stream.size - start
                        number = index + 1
                        future = pool.submit(self._read_part, number, start, length)
                        pending.append((number, stream.digests[index], future))
                        index += 1
                    if not pending:
                        if count is not None and index >= count:
                            break
                        # Read after the phase, the stream holds every part published before Succeeded:
                        # none comes after it, and waiting on would be waiting forever.
                        if self.checkpoint.phase() == Phase.SUCCEEDED and index >= len(self._stream().digests):
                            raise Failure(
                                Reason.ARCHIVE_NOT_FOUND,
                                f"ContainerCheckpoint {self.checkpoint.name!r} Succeeded with {index} "
                                f"part(s) of {self.store.uri(self.key)} published and no more to come; "
                                "nothing was restored",
                            )
                        self.flow.check()
                        time.sleep(FOLLOW_SECONDS)
                        continue
                    number, expected, future = pending.popleft()
                    data = future.result()
                    # One sha256 over the bytes: the whole's, taken anyway; at each part's end its copy is the
                    # sha256 of the archive so far, which the checkpoint's agent published for that part.
                    digest.update(data)
                    got = digest.copy().hexdigest()
                    if got != expected:
                        raise Failure(
                            Reason.ARCHIVE_CORRUPT,
                            f"the archive {self.store.uri(self.key)} up to the end of part {number} has sha256 {got}, "
                            f"its checkpoint's agent published {expected}; nothing was restored",
                        )
                    size += len(data)
                    self.status.progress(size, self._stream().size)
                    yield data
            finally:
                for _, _, future in pending:
                    future.cancel()
        self.flow.update(digest=digest.hexdigest(), size=size)

    def _read_part(self, number: int, start: int, length: int) -> bytearray:
        """One part, asked again while the bucket does not answer (up to PART_PATIENCE_SECONDS)."""
        since = time.monotonic()
        while True:
            self.flow.check()
            try:
                return self.store.read_part(self.key, number, start, length)
            except ArchiveMissing:
                self.checkpoint.read(fresh_within=0)  # gone or failed: says so
                raise Failure(
                    Reason.ARCHIVE_NOT_FOUND,
                    f"part {number} of {self.store.uri(self.key)} is not in the bucket; nothing was restored",
                ) from None
            except StorageError as e:
                if time.monotonic() - since > PART_PATIENCE_SECONDS:
                    raise Failure(
                        Reason.ARCHIVE_NOT_FOUND,
                        f"part {number} of {self.store.uri(self.key)} could not be read for "
                        f"{PART_PATIENCE_SECONDS:.0f}s: {e}; nothing was restored",
                    ) from None
                time.sleep(1.0)

    def _stream(self) -> StreamView:
        stream = chosen_stream(self.checkpoint.read(), self.container)
        if stream is None or stream.key != self.key:
            raise Failure(Reason.ARCHIVE_NOT_FOUND, f"ContainerCheckpoint no longer streams {self.key}")
        return stream

    def _fetch(self) -> None:
        from checkpointer.services.restore import download_limit

        flow = self.flow
        stat = os.statvfs(self.path.parent)
        limit = download_limit(self.node.settings, stat.f_bavail * stat.f_frsize, None)
        out = _Counted(self.path, flow)
        began = time.monotonic()
        try:
            sink = PlaintextSink(CappedFile(out, limit, self.store.uri(self.key)))  # type: ignore[arg-type]
            parts = self._parts()
            first = next(parts, None)
            if first is not None:
                rest = chain([first], parts)
                if encryption.is_encrypted(first):
                    if self.keys is None or self.keys.identity is None:
                        raise Failure(
                            Reason.ARCHIVE_CORRUPT,
                            f"{self.store.uri(self.key)} is encrypted (age), and its storage has no identity to "
                            "decrypt it with; nothing was restored",
                        )
                    encryption.decrypt(rest, sink.write, self.keys.identity)
                else:
                    for data in rest:
                        sink.write(data)
            sink.flush()
        except (CorruptArchive, zstandard.ZstdError) as e:
            raise Failure(Reason.ARCHIVE_CORRUPT, f"the archive cannot be read: {e}; nothing was restored") from None
        finally:
            out.close()
        flow.update(ended=True)
        # From the first part asked for to the last one decoded (the agent's own clock, for the README's breakdown).
        self.status.steps.took("download", began, bytes=flow.size)

    def _judge(self) -> None:
        """Every member is judged before its bytes may go to podman (flow.safe)."""
        flow = self.flow
        judge = archive_policy.UnpackingJudge()
        reader = _GrowingReader(self.path, flow)
        try:
            for member, end in streamed_members(reader, self.dumps):
                if member is not None:
                    why = judge.member(member)
                    if why is not None:
                        raise archive_policy.not_unpackable(why)
                if not flow.configured and len(self.dumps) == 2:
                    flow.update(configured=True)
                flow.update(safe=max(flow.safe, end))
            why = judge.finish()
            if why is not None:
                raise archive_policy.not_unpackable(why)
            while reader.read(STREAM_READ):
                pass  # what follows the tar's end (its padding) is the tail
        except CorruptArchive as e:
            raise Failure(Reason.ARCHIVE_CORRUPT, f"{e}; nothing was restored") from None
        finally:
            reader.close()
        flow.update(judged=True, configured=True)

    def _verify(self) -> None:
        """The tail goes to podman only once the checkpoint Succeeded and the whole is the signed archive."""
        from checkpointer.services.restore import trust_of

        flow = self.flow
        flow.wait(lambda: flow.ended and flow.judged)
        began = time.monotonic()
        while self.checkpoint.phase() != Phase.SUCCEEDED:
            flow.check()
            time.sleep(FOLLOW_SECONDS)
        body = self.checkpoint.read(fresh_within=0)
        archive = next((a for a in (body.get("status") or {}).get("archives") or [] if a.get("key") == self.key), None)
        if archive is None or archive.get("sha256") != flow.digest or int(archive.get("size") or -1) != flow.size:
            raise Failure(
                Reason.ARCHIVE_CORRUPT,
                f"the bytes read of {self.store.uri(self.key)} (sha256 {flow.digest}, {flow.size} bytes) are not the "
                "archive its checkpoint stored; nothing was restored",
            )
        trust = trust_of(self.node, self.store, NameRef(name=self.storage), self.key)
        if trust.signed and trust.sha256 != flow.digest:
            raise Failure(
                Reason.ARCHIVE_UNTRUSTED,
                f"the bytes of {self.store.uri(self.key)} are not those its signed manifest records; "
                "nothing was restored",
            )
        flow.update(released=True)
        # Waiting for the checkpoint's Succeeded (its signing) and checking the whole, once all was read.
        self.status.steps.took("verify", began)

    def _feed(self, fd: int) -> None:
        """Into podman's FIFO: the judged bytes as they come, the rest once released."""
        flow = self.flow
        sent = 0
        began = time.monotonic()
        with self.path.open("rb") as src:
            while True:
                flow.wait(lambda sent=sent: flow.released or min(flow.safe, flow.written) > sent)
                with flow.cond:
                    limit = flow.written if flow.released else min(flow.safe, flow.written)
                    done = flow.released
                while sent < limit:
                    sent += os.sendfile(fd, src.fileno(), sent, limit - sent)
                if done:
                    # Podman had every byte: what it does after (its unpacking's end, CRIU) is the rest of `restore`.
                    self.status.steps.took("import", began, bytes=sent)
                    return


class _Stopped(Exception):
    """The restore ended: the stages still running stop."""
