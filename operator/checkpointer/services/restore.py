"""The agent's side of a ContainerRestore: fetch, verify, check the node, restore, report.

Nothing runs before the archive is verified: its sha256 must match the one the checkpoint recorded
(status or manifest), and it must read as a whole checkpoint archive. A restarted agent never
restores twice: a marker is written before podman is called, and an interrupted restore fails with
RestoreInterrupted instead of trying again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import shutil
import tarfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, cast

import zstandard
from boto3.s3.transfer import TransferConfig
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
    path = workdir / posixpath.basename(archive.key)
    expected = archive.sha256 or _manifest_sha256(bucket, archive.key)
    _download(bucket, archive.key, path, status, agent.settings.part_size, agent.download_limiter)
    digest, config, unreadable = _read_archive(path)
    if expected and digest != expected:
        raise Failure(
            Reason.ARCHIVE_CORRUPT, f"sha256 of {archive.key} is {digest}, expected {expected}; nothing was restored"
        )
    if unreadable:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"the archive cannot be read: {unreadable}; nothing was restored")
    if config is None:
        raise Failure(Reason.ARCHIVE_CORRUPT, "the archive holds no config.dump: it is not a podman checkpoint")
    previous = _previous(agent, crst.spec.previous, workdir, status) if crst.spec.previous else None

    image = str(config.get("rootfsImageName") or config.get("rootfsImageID") or "")
    if image and not agent.runtime.image_exists(image):
        raise Failure(
            Reason.IMAGE_NOT_FOUND,
            f"image {image!r} of the checkpointed container is not on node {crst.spec.node_name}; "
            "load or pull it there first",
        )
    name = crst.spec.name or str(config.get("name") or "")
    if name and agent.runtime.inspect(name) is not None:
        raise Failure(
            Reason.NAME_IN_USE,
            f"a container named {name!r} already exists on node {crst.spec.node_name}; set spec.name "
            "to restore under another name",
        )

    marker.touch()
    status.phase(Phase.RESTORING, Reason.RESTORING, f"restoring {name or 'container'} with podman")
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


def _download(
    bucket: s3.Bucket, key: str, path: Path, status: StatusWriter, part_size: int, limiter: s3.RateLimiter
) -> None:
    """Fetch the object with concurrent ranged GETs, reporting progress, at most at the limiter's rate."""
    try:
        total = bucket.client.head_object(Bucket=bucket.name, Key=key)["ContentLength"]
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise Failure(Reason.ARCHIVE_NOT_FOUND, f"{layout.uri(bucket.name, key)} does not exist") from None
        raise
    done = 0
    lock = threading.Lock()

    def progress(nbytes: int) -> None:
        nonlocal done
        # Called by the download threads as they read, so waiting here slows them all down.
        limiter.take(nbytes)
        with lock:
            done += nbytes
            status.progress(done, total)

    config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=4)
    bucket.client.download_file(bucket.name, key, str(path), Config=config, Callback=progress)
    status.progress(total, total, force=True)


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


class _Hashing:
    """A reader that hashes every byte read through it."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        while self.read(1024 * 1024):
            pass
        return self.digest.hexdigest()


def _read_archive(path: Path) -> tuple[str, dict[str, Any] | None, str | None]:
    """One pass over the archive: the sha256 of its bytes, its config.dump, and why it cannot be read.

    Every zstd frame and tar header is checked on the way, so a damaged archive is caught before
    podman sees it.
    """
    config: dict[str, Any] | None = None
    unreadable: str | None = None
    with path.open("rb") as f:
        compressed = f.read(4) == ZSTD_MAGIC
        f.seek(0)
        hashing = _Hashing(f)
        # The decompressor and tarfile need only read(); the cast says so to the type checker.
        source = cast(BinaryIO, hashing)
        raw = zstandard.ZstdDecompressor().stream_reader(source, closefd=False) if compressed else source
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    extracted = tar.extractfile(member) if member.isfile() else None
                    if extracted is None:
                        continue
                    if member.name.lstrip("./") == "config.dump":
                        config = json.loads(extracted.read())
                    else:
                        while extracted.read(1024 * 1024):
                            pass
        except (tarfile.TarError, zstandard.ZstdError, OSError, EOFError, json.JSONDecodeError) as e:
            unreadable = str(e)
        return hashing.drain(), config, unreadable


def _previous(agent: Agent, ref: ArchiveRef, workdir: Path, status: StatusWriter) -> Path:
    storage = choose_storage(ref.storage_ref, agent.kube.storages())
    bucket = agent.bucket(NameRef(name=storage.metadata.name))
    path = workdir / ("previous-" + posixpath.basename(ref.key))
    _download(bucket, ref.key, path, status, agent.settings.part_size, agent.download_limiter)
    digest = _read_archive(path)[0]
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
