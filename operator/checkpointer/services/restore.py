"""The agent's side of a ContainerRestore: fetch, verify, check the node, restore, report.

Nothing runs before the archive is verified: its sha256 must match the one the checkpoint recorded
(status or manifest), or, when none was recorded, it must read as a whole checkpoint archive. A
restarted agent never restores twice: a marker is written before podman is called, and an
interrupted restore fails with RestoreInterrupted instead of trying again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import shutil
import tarfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import zstandard
from botocore.exceptions import ClientError

from checkpointer import layout
from checkpointer.adapters import storage as s3
from checkpointer.adapters.kube import RESTORES
from checkpointer.adapters.podman import PodmanError
from checkpointer.errors import Failure
from checkpointer.models import ArchiveRef, ContainerRestore, NameRef
from checkpointer.reasons import Phase, Reason
from checkpointer.services.agent import Agent, StatusWriter, classify
from checkpointer.services.scheduling import choose_storage

log = logging.getLogger(__name__)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
WINDOW = 4  # parts downloading at once, and held in memory at most


def run(agent: Agent, body: dict[str, Any]) -> None:
    crst = ContainerRestore.model_validate(body)
    if crst.status.phase not in (Phase.SCHEDULED, Phase.DOWNLOADING, Phase.RESTORING):
        return
    status = StatusWriter(agent.kube, RESTORES, body)
    meta = crst.metadata
    workdir = agent.settings.spool_dir / f"restore_{meta.namespace}_{meta.name}_{meta.uid}"
    try:
        _run(agent, crst, status, workdir)
    except Failure as e:
        log.warning("restore %s/%s failed: %s: %s", meta.namespace, meta.name, e.reason, e.message)
        status.phase(Phase.FAILED, e.reason, e.message)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    # Any other error keeps the workdir: its marker is what stops a retry from restoring twice.
    shutil.rmtree(workdir, ignore_errors=True)


def _run(agent: Agent, crst: ContainerRestore, status: StatusWriter, workdir: Path) -> None:
    marker = workdir / "restoring"
    if marker.exists():
        raise Failure(
            Reason.RESTORE_INTERRUPTED,
            "the agent restarted while podman was restoring; it does not restore twice. Check the node "
            "for the container and delete it before retrying with a new ContainerRestore",
        )
    archive = crst.status.archive
    if archive is None:
        raise Failure(Reason.ARCHIVE_NOT_FOUND, "the controller resolved no archive for this restore")
    workdir.mkdir(parents=True, exist_ok=True)
    bucket = agent.bucket(archive.storage_ref)
    status.phase(Phase.DOWNLOADING, Reason.DOWNLOADING, f"downloading {layout.uri(bucket.name, archive.key)}")
    expected = archive.sha256 or _manifest_sha256(bucket, archive.key)
    path = workdir / _local_name(archive.key)
    digest = _fetch(bucket, archive.key, path, status, agent.settings.part_size, agent.download_limiter)
    log.info("restore %s/%s: downloaded %s to the node", crst.metadata.namespace, crst.metadata.name, archive.key)
    if expected and digest != expected:
        raise Failure(
            Reason.ARCHIVE_CORRUPT, f"sha256 of {archive.key} is {digest}, expected {expected}; nothing was restored"
        )
    # A matching sha256 proves the bytes are those podman exported: reading up to config.dump is
    # enough. Without one, the whole archive is read, so that a damaged one never reaches podman.
    config, unreadable = _read_tar(path, whole=not expected)
    if unreadable:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"the archive cannot be read: {unreadable}; nothing was restored")
    if config is None:
        raise Failure(Reason.ARCHIVE_CORRUPT, "the archive holds no config.dump: it is not a podman checkpoint")
    previous = _previous(agent, crst.spec.previous, workdir, status) if crst.spec.previous else None

    image = str(config.get("rootfsImageName") or config.get("rootfsImageID") or "")
    name = crst.spec.name or str(config.get("name") or "")
    # Two independent questions to podman, each a few hundred milliseconds through the CLI: asked together.
    with ThreadPoolExecutor(2) as pool:
        image_found = pool.submit(lambda: not image or agent.runtime.image_exists(image))
        name_taken = pool.submit(lambda: bool(name) and agent.runtime.inspect(name) is not None)
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

    marker.touch()
    status.phase(Phase.RESTORING, Reason.RESTORING, f"restoring {name or 'container'} with podman")
    log.info("restore %s/%s: podman restores %s", crst.metadata.namespace, crst.metadata.name, name or "the container")
    try:
        stats = agent.runtime.restore(crst.spec, path, previous)
    except PodmanError as e:
        _remove_half_restored(agent, name)
        raise Failure(classify(e, Reason.RESTORE_FAILED), f"podman could not restore: {e.message}") from None
    restored = agent.runtime.inspect(name) if name else None
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
    """The node-side file name: a zstd archive is stored decompressed (see _fetch)."""
    return posixpath.basename(key).removesuffix(".zst")


def _fetch(
    bucket: s3.Bucket, key: str, path: Path, status: StatusWriter, part_size: int, limiter: s3.RateLimiter
) -> str:
    """Download `key` into `path` with concurrent ranged GETs; returns the sha256 of the stored bytes.

    Parts are fetched `WINDOW` at a time and consumed in order, so memory stays at WINDOW parts.
    A zstd archive is decompressed on the way: podman reads its import twice (config first, then
    everything), and a plain tar spares it two decompressions, the larger part of its restore time.
    """
    try:
        total = bucket.client.head_object(Bucket=bucket.name, Key=key)["ContentLength"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise Failure(Reason.ARCHIVE_NOT_FOUND, f"{layout.uri(bucket.name, key)} does not exist") from None
        raise

    def part(start: int) -> bytearray:
        end = min(start + part_size, total) - 1
        body = bucket.client.get_object(Bucket=bucket.name, Key=key, Range=f"bytes={start}-{end}")["Body"]
        data = bytearray()
        for chunk in body.iter_chunks(1024 * 1024):
            limiter.take(len(chunk))  # a capped downlink slows every part alike
            data += chunk
        if len(data) != end - start + 1:
            raise RuntimeError(f"{key}: got {len(data)} bytes of range {start}-{end}")
        return data

    digest = hashlib.sha256()
    done = 0
    starts = iter(range(0, total, part_size))
    with (
        path.open("wb") as out,
        ThreadPoolExecutor(WINDOW, thread_name_prefix="download") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher,
    ):
        pending: deque[Future[bytearray]] = deque(pool.submit(part, start) for start in islice(starts, WINDOW))
        sink: Any = out
        try:
            while pending:
                data = pending.popleft().result()
                pending.extend(pool.submit(part, start) for start in islice(starts, 1))
                if done == 0 and data.startswith(ZSTD_MAGIC):
                    sink = zstandard.ZstdDecompressor().stream_writer(out, closefd=False)
                # Both let go of the GIL: the part is hashed while it is decompressed and written.
                hashed = hasher.submit(digest.update, data)
                sink.write(data)
                hashed.result()
                done += len(data)
                status.progress(done, total)
            sink.flush()
        except zstandard.ZstdError as e:
            raise Failure(Reason.ARCHIVE_CORRUPT, f"the archive cannot be read: {e}; nothing was restored") from None
        finally:
            for future in pending:  # on any failure, parts not yet started are not fetched
                future.cancel()
    status.progress(total, total, force=True)
    return digest.hexdigest()


def _manifest_sha256(bucket: s3.Bucket, key: str) -> str | None:
    """The sha256 recorded for `key` in the manifest beside it, when there is one."""
    try:
        body = bucket.client.get_object(Bucket=bucket.name, Key=f"{posixpath.dirname(key)}/{layout.MANIFEST}")
    except ClientError:
        return None
    manifest = json.loads(body["Body"].read())
    for entry in manifest.get("archives", []):
        if entry.get("key") == key:
            return str(entry.get("sha256") or "") or None
    return None


def _read_tar(path: Path, whole: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The archive's config.dump, and why the archive cannot be read; `whole` reads every member."""
    config: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                extracted = tar.extractfile(member) if member.isfile() else None
                if extracted is None:
                    continue
                if member.name.lstrip("./") == "config.dump":
                    config = json.loads(extracted.read())
                    if not whole:
                        break
                else:
                    while extracted.read(1024 * 1024):
                        pass
    except (tarfile.TarError, OSError, EOFError, json.JSONDecodeError) as e:
        return config, str(e)
    return config, None


def _previous(agent: Agent, ref: ArchiveRef, workdir: Path, status: StatusWriter) -> Path:
    storage = choose_storage(ref.storage_ref, agent.kube.storages())
    bucket = agent.bucket(NameRef(name=storage.metadata.name))
    path = workdir / ("previous-" + _local_name(ref.key))
    digest = _fetch(bucket, ref.key, path, status, agent.settings.part_size, agent.download_limiter)
    if ref.sha256 and digest != ref.sha256:
        raise Failure(
            Reason.ARCHIVE_CORRUPT, f"sha256 of previous archive {ref.key} is {digest}, expected {ref.sha256}"
        )
    return path


def _remove_half_restored(agent: Agent, name: str) -> None:
    if not name:
        return
    try:
        if agent.runtime.inspect(name) is not None:
            agent.runtime.remove(name)
    except PodmanError as e:
        log.warning("could not remove half-restored container %s: %s", name, e)
