"""The agent's side of a ContainerCheckpoint: checkpoint each container, spool, upload, report.

Restart safety: the resolved containers are written to the spool before the first checkpoint, and a
marker before each one. A restarted agent never checkpoints a container whose marker exists: with a
finished spool it uploads again; without one the checkpoint was cut short and the object fails with
CheckpointInterrupted, saying what state the container is in.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from checkpointer import layout
from checkpointer.adapters import storage as s3
from checkpointer.adapters.kube import CHECKPOINTS
from checkpointer.adapters.podman import Container, PodmanError, criu_supports
from checkpointer.conditions import now
from checkpointer.errors import Failure, Retry
from checkpointer.models import Archive, CheckpointSpec, Compression, ContainerCheckpoint
from checkpointer.reasons import Phase, Reason
from checkpointer.services.agent import EXCLUDE_LABEL, Agent, StatusWriter, classify
from checkpointer.spool import GrowingFile, SpoolRecord, write_spool

log = logging.getLogger(__name__)


def spool_dir(agent: Agent, ccp: ContainerCheckpoint) -> Path:
    meta = ccp.metadata
    return agent.settings.spool_dir / f"checkpoint_{meta.namespace}_{meta.name}_{meta.uid}"


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


def _targets(agent: Agent, ccp: ContainerCheckpoint, workdir: Path) -> list[dict[str, str]]:
    path = workdir / "targets.json"
    if path.exists():
        return list(json.loads(path.read_text()))
    try:
        # Each podman call costs a few hundred milliseconds through the CLI: ask only what the spec needs.
        latest = ccp.spec.latest
        runtime = agent.runtime
        chosen = select_targets(ccp.spec, [] if latest else runtime.containers(), runtime.latest() if latest else None)
    except PodmanError as e:
        raise Failure(classify(e, Reason.CHECKPOINT_FAILED), e.message) from None
    targets = [{"name": c.name, "id": c.id} for c in chosen]
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(targets))
    tmp.replace(path)
    return targets


def run(agent: Agent, body: dict[str, Any]) -> None:
    ccp = ContainerCheckpoint.model_validate(body)
    if ccp.status.phase not in (Phase.SCHEDULED, Phase.CHECKPOINTING, Phase.UPLOADING):
        return
    status = StatusWriter(agent.kube, CHECKPOINTS, body)
    workdir = spool_dir(agent, ccp)
    log.info("checkpoint %s/%s: %s", ccp.metadata.namespace, ccp.metadata.name, ccp.status.phase)
    try:
        _run(agent, ccp, status, workdir)
    except Failure as e:
        log.warning("checkpoint %s/%s failed: %s: %s", ccp.metadata.namespace, ccp.metadata.name, e.reason, e.message)
        status.phase(Phase.FAILED, e.reason, e.message)
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _run(agent: Agent, ccp: ContainerCheckpoint, status: StatusWriter, workdir: Path) -> None:
    spec = ccp.spec
    targets = _targets(agent, ccp, workdir)
    names = ", ".join(t["name"] for t in targets)
    if ccp.status.phase == Phase.SCHEDULED:
        status.phase(Phase.CHECKPOINTING, Reason.CHECKPOINTING, f"checkpointing {names}")
    storage = agent.bucket(ccp.status.storage_ref) if spec.export and ccp.status.storage_ref else None
    directory = layout.archive_dir(storage.prefix, ccp) if storage else ""
    archives = {a.container: a for a in ccp.status.archives}
    for i, target in enumerate(targets):
        if target["name"] in archives:
            continue  # uploaded before a restart
        archive = _one(agent, ccp, status, workdir, target, storage, directory)
        archives[archive.container] = archive
        if i < len(targets) - 1:  # the last one goes out with the final phase, in one write
            status.patch({"archives": _dump(archives.values())})
    if storage is not None:
        entries = _dump(archives.values())
        manifest = layout.manifest(
            ccp, entries, agent.host(), str(status.status.get("startTime") or now(precise=True)), now(precise=True)
        )
        storage.client.put_object(
            Bucket=storage.name,
            Key=f"{directory}/{layout.MANIFEST}",
            Body=json.dumps(manifest, indent=2).encode(),
            ContentType="application/json",
        )
    where = f" to {layout.uri(storage.name, directory)}/" if storage else " (kept on the node)"
    status.phase(Phase.SUCCEEDED, Reason.SUCCEEDED, f"checkpointed {names}{where}", archives=_dump(archives.values()))
    log.info("checkpoint %s/%s: checkpointed %s%s", ccp.metadata.namespace, ccp.metadata.name, names, where)
    shutil.rmtree(workdir, ignore_errors=True)


def _dump(archives: Iterable[Archive]) -> list[dict[str, Any]]:
    return [a.model_dump(by_alias=True, exclude_none=True) for a in archives]


def _one(
    agent: Agent,
    ccp: ContainerCheckpoint,
    status: StatusWriter,
    workdir: Path,
    target: dict[str, str],
    storage: s3.Bucket | None,
    directory: str,
) -> Archive:
    name = target["name"]
    started = workdir / f"{name}.started"
    record_path = workdir / f"{name}.json"
    record = SpoolRecord.load(record_path)
    if record is None and started.exists():
        state = agent.runtime.inspect(name)
        raise Failure(
            Reason.CHECKPOINT_INTERRUPTED,
            f"the agent restarted while checkpointing {name}; it is not checkpointed twice "
            f"(container state now: {state.state if state else 'gone'})",
        )
    if storage is None:
        started.touch()
        stats = _checkpoint(agent, ccp, target, None, workdir, storage, directory)
        return Archive(container=name, containerID=target["id"], stats=stats)
    client, bucket = storage.client, storage.name
    compression = ccp.spec.compress
    key = layout.archive_key(directory, name, compression)
    spool_path = workdir / f"{name}{compression.suffix}"
    # Podman compresses the export itself where it can (the CLI): then half the bytes cross the
    # pipe, and the agent only hashes, spools and uploads them.
    spooled = Compression.NONE if agent.runtime.compresses(compression) else compression
    if record is not None:
        status.phase(Phase.UPLOADING, Reason.UPLOAD_RETRYING, f"uploading the spooled archive of {name} again")
        spool = GrowingFile.finished(spool_path)
    else:
        started.touch()
        spool = GrowingFile(spool_path)
    s3.abort_stale_uploads(client, bucket, key)
    upload: dict[str, Any] = {}

    def uploader() -> None:
        try:
            upload["size"] = s3.upload_spool(
                client,
                bucket,
                key,
                spool,
                part_size=agent.settings.part_size,
                concurrency=agent.settings.upload_concurrency,
                limiter=agent.limiter,
                on_progress=lambda done: status.progress(done, record.size if record else None),
            )
        except BaseException as e:  # reported by the caller once podman is done
            upload["error"] = e

    thread = threading.Thread(target=uploader, name=f"upload-{name}", daemon=True)
    thread.start()
    if record is None:
        log.info("checkpoint %s/%s: podman checkpoints %s", ccp.metadata.namespace, ccp.metadata.name, name)
        result: dict[str, Any] = {}

        def export(chunks: Any) -> None:
            result["size"], result["sha256"], result["raw"] = write_spool(
                chunks, spool, spooled, agent.settings.zstd_level
            )

        try:
            stats = _checkpoint(agent, ccp, target, export, workdir, storage, directory)
            if "sha256" not in result:
                raise Failure(Reason.CHECKPOINT_FAILED, f"podman produced no archive for {name}")
        except BaseException as e:
            spool.finish(e)
            thread.join()
            raise
        spool.finish()
        log.info(
            "checkpoint %s/%s: podman exported %s, %d bytes",
            ccp.metadata.namespace,
            ccp.metadata.name,
            name,
            result["size"],
        )
        record = SpoolRecord(
            container=name,
            container_id=target["id"],
            compression=str(compression),
            size=result["size"],
            sha256=result["sha256"],
            raw_size=result["raw"],
            stats=stats,
        )
        record.save(record_path)
        status.phase(Phase.UPLOADING, Reason.UPLOADING, f"checkpointed {name}; uploading {record.size} bytes")
    thread.join()
    if "error" in upload:
        error = upload["error"]
        log.warning("upload of %s failed, will retry: %s", key, error)
        raise Retry(
            Reason.UPLOAD_RETRYING,
            f"upload of {name} failed, retrying from the node's spool: {error}",
            delay=agent.settings.upload_retry_seconds,
        )
    status.progress(record.size, record.size, force=True)
    return Archive(
        container=name,
        containerID=record.container_id,
        uri=layout.uri(bucket, key),
        key=key,
        size=record.size,
        sha256=record.sha256,
        compression=compression,
        stats=record.stats,
    )


def _checkpoint(
    agent: Agent,
    ccp: ContainerCheckpoint,
    target: dict[str, str],
    export: Any,
    workdir: Path,
    storage: s3.Bucket | None,
    directory: str,
) -> dict[str, Any]:
    try:
        return agent.runtime.checkpoint(ccp.spec, target["name"], export, workdir)
    except PodmanError as e:
        reason = classify(e, Reason.CHECKPOINT_FAILED)
        message = f"podman could not checkpoint {target['name']}: {e.message}"
        spec = ccp.spec
        needs_tracking = reason == Reason.CHECKPOINT_FAILED and (spec.pre_checkpoint or spec.with_previous)
        # Through the REST API podman reports only runc's exit status; CRIU's own check says why.
        if needs_tracking and not criu_supports(agent.settings, "mem_dirty_track"):
            reason = Reason.CRIU_FEATURE_MISSING
            message += "; CRIU is missing features: this kernel has no memory dirty tracking (mem_dirty_track)"
        if spec.keep:
            message += _upload_criu_log(agent, target["name"], storage, directory)
        raise Failure(reason, message) from None


def _upload_criu_log(agent: Agent, name: str, storage: s3.Bucket | None, directory: str) -> str:
    # Only inspect names the container's own folder, where CRIU leaves dump.log with --keep.
    container = agent.runtime.inspect(name)
    if container is None or not container.static_dir:
        return "; CRIU's log could not be located: the container is gone"
    path = f"{container.static_dir}/dump.log"
    if storage is None:
        return f"; CRIU's log is kept on the node at {path}"
    content = agent.runtime.read_file(path)
    if content is None:
        return f"; CRIU's log was not found at {path}"
    key = layout.log_key(directory, name)
    storage.client.put_object(Bucket=storage.name, Key=key, Body=content, ContentType="text/plain")
    return f"; CRIU's log: {layout.uri(storage.name, key)}"
