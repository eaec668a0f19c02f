"""The agent's side of a ContainerRestore: fetch, verify, check the node, restore, report.

Nothing runs before the archive is verified: its sha256 must match the one the checkpoint recorded
(status or manifest), or, when none was recorded, it must read as a whole checkpoint archive. A
restarted agent never restores twice: a marker is written before podman is called, and an
interrupted restore fails with RestoreInterrupted instead of trying again. A restart before that
marker downloads again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpointer import layout, metrics
from checkpointer.adapters.kube import RESTORES
from checkpointer.adapters.podman import CliRuntime, Container, Labelled, PodmanError, Runtime, restore_in_progress
from checkpointer.archive import manifest
from checkpointer.archive.codec import ContainerConfiguration, CorruptArchive, read_configuration
from checkpointer.archive.encryption import Keys
from checkpointer.archive.ledger import KeptCheckpoint
from checkpointer.archive.store import ArchiveMissing, ArchiveStore, StorageError
from checkpointer.archive.workfolder import RESTORE, PodmanRestore, WorkFolder
from checkpointer.conditions import format_time, now, parse_time
from checkpointer.errors import Failure, Retry
from checkpointer.models import (
    ArchiveRef,
    Compression,
    ContainerRestore,
    NameRef,
    PreviousArchive,
    RestoreSpec,
    RestoreStatus,
)
from checkpointer.reasons import Phase, Reason
from checkpointer.services import archive_policy, signing
from checkpointer.services.node import NAMESPACE_LABEL, Node, classify
from checkpointer.services.scheduling import choose_storage
from checkpointer.settings import Settings
from checkpointer.status import Conflict, StatusWriter

log = logging.getLogger(__name__)
RESTORING = "restoring"
# How long a restarted agent waits for a REST-runtime podman to show the container it may still be restoring.
SETTLE_SECONDS = 10.0
# What podman accepts as a volume's or a network's name.
VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
# The network every container of a node joins unless told otherwise: shared by all, owned by none.
DEFAULT_NETWORK = "podman"


@dataclass
class _Claim:
    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: int = 0


class Claims:
    """In-process locks by name, for as long as someone holds or waits for them."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._claims: dict[str, _Claim] = {}

    @contextlib.contextmanager
    def hold(self, keys: Iterable[str]) -> Iterator[None]:
        ordered = sorted(set(keys))  # one order for every holder: two never wait for each other
        with self._guard:
            claims = [self._claims.setdefault(key, _Claim()) for key in ordered]
            for claim in claims:
                claim.holders += 1
        try:
            with contextlib.ExitStack() as stack:
                for claim in claims:
                    stack.enter_context(claim.lock)
                yield
        finally:
            with self._guard:
                for key, claim in zip(ordered, claims, strict=True):
                    claim.holders -= 1
                    if claim.holders == 0:
                        del self._claims[key]


# This agent's restores: the only ones on its node.
CLAIMS = Claims()


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
        interrupted(node, crst, status, folder)
        return
    archive = crst.status.archive
    if archive is None:
        raise Failure(Reason.ARCHIVE_NOT_FOUND, "the controller resolved no archive for this restore")
    folder.create()
    if not archive.key:  # its checkpoint still ran when the controller scheduled it
        from checkpointer.services import pipeline

        followed = pipeline.follow(node, crst, status, folder)
        if followed is None:
            return  # restored from the parts as they landed
        archive = followed
    store = node.store(archive.storage_ref)
    status.phase(Phase.DOWNLOADING, Reason.DOWNLOADING, f"downloading {store.uri(archive.key)}")
    began = time.monotonic()
    # Before a byte is fetched: is it an archive this cluster's controller signed?
    trust = trust_of(node, store, archive.storage_ref, archive.key)
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
    check_policy(node, crst, configuration)
    previous = _previous(node, crst.spec.previous, folder, status) if crst.spec.previous else None

    name = crst.spec.name or str(config.get("name") or "")
    volumes = named_volumes(config)
    # From "is the name free?" to the cleanup of a failure, one restore at a time holds the name (and
    # the volumes): a later restore of the same name sees the earlier one's container, never removes it.
    with CLAIMS.hold([f"container {name}", *(f"volume {v}" for v in volumes)]):
        spec, before, stale = check_node(node, crst, config, name, volumes)
        status.steps.took("verify", began)
        run_podman(node, crst, status, folder, spec, path, previous, name, before, config, stale=stale)


def run_podman(
    node: Node,
    crst: ContainerRestore,
    status: StatusWriter,
    folder: WorkFolder,
    spec: RestoreSpec,
    path: Path,
    previous: Path | None,
    name: str,
    before: set[str],
    config: dict[str, Any],
    podman: Callable[[RestoreSpec], dict[str, Any]] | None = None,
    stale: Container | None = None,
) -> None:
    """Podman restores; `podman` instead of the runtime's import of `path`, for an archive that
    streams (services/pipeline.py)."""
    runtime = node.runtime
    # Without a new name podman keeps the archive's container ID; with one it makes a new ID.
    expected = None if spec.name else str(config.get("id") or "") or None
    folder.save_podman_restore(PodmanRestore(name, expected or "", tuple(sorted(before))))
    folder.mark(RESTORING)
    if stale is not None:
        # The archive's own container, left stopped by its checkpoint, holds its name and ID: this
        # restore takes its place. Should podman fail now, the archive in the bucket is its copy.
        try:
            runtime.remove(stale)
        except PodmanError as e:
            raise Failure(classify(e, Reason.RESTORE_FAILED), f"podman could not remove {name}: {e.message}") from None
        log.info(
            "restore %s/%s: replaced the stopped %s (%s) it was checkpointed from",
            crst.metadata.namespace,
            crst.metadata.name,
            name,
            stale.id,
        )
        before = set()
        folder.save_podman_restore(PodmanRestore(name, expected or "", ()))
    status.phase(Phase.RESTORING, Reason.RESTORING, f"restoring {name or 'container'} with podman")
    log.info("restore %s/%s: podman restores %s", crst.metadata.namespace, crst.metadata.name, name or "the container")
    try:
        with status.steps.step("restore", container=name):
            stats = podman(spec) if podman is not None else runtime.restore(spec, path, previous)
        # Podman returns once the container runs: taken here, before the inspection and the write.
        running = now(precise=True)
    except Failure:
        # The stream stopped before podman had all of it: what podman made of it goes.
        _remove_half_restored(node, name, before, expected)
        raise
    except PodmanError as e:
        reason = classify(e, Reason.RESTORE_FAILED)
        if reason is not Reason.NAME_IN_USE:  # podman created nothing: the name was another's
            _remove_half_restored(node, name, before, expected)
        raise Failure(reason, f"podman could not restore: {e.message}") from None
    restored = _holder(runtime, name) if name else None
    _succeeded(node, crst, status, name, restored, running, f"restored {name} on {crst.spec.node_name}", stats)


def _succeeded(
    node: Node,
    crst: ContainerRestore,
    status: StatusWriter,
    name: str,
    restored: Container | None,
    running: str,
    message: str,
    stats: dict[str, Any] | None = None,
) -> None:
    if crst.spec.keep and restored is not None:  # what podman kept goes once nobody needs it (services/sweep.py)
        node.ledger.add_kept(KeptCheckpoint(crst.metadata.uid, RESTORE, restored.id))
    status.phase(
        Phase.SUCCEEDED,
        Reason.SUCCEEDED,
        message,
        patch=RestoreStatus(
            container_id=restored.id if restored else "", container_name=name, stats=stats or {}, running_time=running
        ),
    )
    log.info("restore %s/%s: restored %s", crst.metadata.namespace, crst.metadata.name, name or "the container")


def interrupted(node: Node, crst: ContainerRestore, status: StatusWriter, folder: WorkFolder) -> None:
    """The agent restarted after it called podman: what podman left on the node says how the restore
    ended, and nothing is restored twice. The container this restore made running: Succeeded. Made
    and not running (podman died with the agent, or failed): removed, and the restore fails
    RestoreUndone, nothing of it runs. None made: RestoreUndone too. Without the record of what
    podman was asked (a folder of an older agent): RestoreInterrupted, for the node to be checked.

    Podman may still be at it: a CLI podman that outlived the agent, or runc restoring the container,
    is waited for. A REST-runtime podman restores inside its service, where no process shows it: a
    container is waited for a little longer there (SETTLE_SECONDS)."""
    record = folder.podman_restore()
    where = crst.spec.node_name
    if record is None or not record.name:
        raise Failure(
            Reason.RESTORE_INTERRUPTED,
            "the agent restarted while podman was restoring; it does not restore twice. Check the node "
            "for the container and delete it before retrying with a new ContainerRestore",
        )
    runtime, name = node.runtime, record.name
    before, expected = set(record.before), record.expected_id or None
    began = time.monotonic()
    deadline = began + node.settings.podman_timeout_seconds
    settle = began + (0.0 if isinstance(runtime, CliRuntime) else SETTLE_SECONDS)
    try:
        while True:
            found = _holder(runtime, name)
            made = found if created_by_restore(found, before, expected) else None
            if made is not None and made.running:
                break
            busy = restore_in_progress(str(folder.path), made.id if made is not None else "")
            if time.monotonic() < (deadline if busy else settle):
                time.sleep(0.5)
                continue
            break
        if made is not None and made.running:
            running = parse_time(made.started_at)
            meta = crst.metadata
            log.info("restore %s/%s: podman restored %s while the agent restarted", meta.namespace, meta.name, name)
            _succeeded(
                node,
                crst,
                status,
                name,
                made,
                format_time(running, precise=True) if running else now(precise=True),
                f"restored {name} on {where}; podman finished the restore while the agent restarted",
            )
            return
        if made is not None:
            node.runtime.remove(made)
            left = f"podman left {name} {made.state or 'created'}, never started, and it was removed"
        else:
            left = f"podman made no container {name}"
    except PodmanError as e:
        # The container's fate is unknown until podman answers: asked again, the marker kept.
        raise Retry(Reason.RESTORING, f"podman could not be asked what it restored: {e.message}") from None
    raise Failure(
        Reason.RESTORE_UNDONE,
        f"the agent restarted while podman was restoring; {left}: nothing of this restore runs on {where}",
    )


def check_node(
    node: Node, crst: ContainerRestore, config: dict[str, Any], name: str, volumes: list[str]
) -> tuple[RestoreSpec, set[str], Container | None]:
    """Asks the node's podman what the restore needs, and judges the answers: the restore's pod, the
    archive's named volumes and networks (outside an admin namespace), the image, the name. Returns the spec podman
    gets (a judged pod by its ID, so that it is the pod judged) and the IDs that hold the name now."""
    runtime = node.runtime
    spec = crst.spec
    namespace = crst.metadata.namespace
    judged = namespace not in node.settings.admins
    image = str(config.get("rootfsImageName") or config.get("rootfsImageID") or "")
    asked = [v for v in volumes if VOLUME_NAME.fullmatch(v)] if judged else []
    networks = [n for n in joined_networks(config) if n != DEFAULT_NETWORK] if judged else []
    # Independent questions, each a few hundred milliseconds through the CLI: asked together.
    try:
        with ThreadPoolExecutor(2 + len(asked) + len(networks)) as pool:
            image_found = pool.submit(lambda: not image or runtime.image_exists(image))
            holder = pool.submit(lambda: runtime.inspect(name) if name else None)
            pod = pool.submit(lambda: runtime.pod(spec.pod) if judged and spec.pod else None)
            found = {v: pool.submit(runtime.volume, v) for v in asked}
            joined = {n: pool.submit(runtime.network, n) for n in networks if VOLUME_NAME.fullmatch(n)}
            if judged and spec.pod:
                refusal = pod_refusal(spec.pod, pod.result(), namespace, spec.node_name)
                if refusal is not None:
                    raise refusal
            if judged:
                refusal = volume_refusal(volumes, {v: f.result() for v, f in found.items()}, namespace, spec.node_name)
                if refusal is not None:
                    raise refusal
                refusal = network_refusal(
                    networks, {n: f.result() for n, f in joined.items()}, namespace, spec.node_name
                )
                if refusal is not None:
                    raise refusal
            if not image_found.result():
                raise Failure(
                    Reason.IMAGE_NOT_FOUND,
                    f"image {image!r} of the checkpointed container is not on node {spec.node_name}; "
                    "load or pull it there first",
                )
            taken = holder.result()
            stale = taken if taken is not None and stopped_self(taken, config, crst, node.settings.admins) else None
            if taken is not None and taken.name == name and stale is None:
                raise Failure(
                    Reason.NAME_IN_USE,
                    f"a container named {name!r} already exists on node {spec.node_name}; set spec.name "
                    "to restore under another name",
                )
    except PodmanError as e:
        raise Failure(
            classify(e, Reason.RESTORE_FAILED), f"podman could not be asked about the node: {e.message}"
        ) from None
    judged_pod = pod.result()
    if judged_pod is not None:
        spec = spec.model_copy(update={"pod": judged_pod.id})
    # The name is free; podman may still find a container by it (a prefix of its ID): not ours to remove.
    return spec, {taken.id} if taken is not None else set(), stale


# The states of a container that podman's checkpoint stopped (`exited`; `stopped` in older podman).
STOPPED = frozenset({"exited", "stopped"})


def stopped_self(holder: Container, config: dict[str, Any], crst: ContainerRestore, admins: frozenset[str]) -> bool:
    """Whether the container holding the restore's name is the very container the archive was made of,
    left stopped by its checkpoint: the restore then replaces it, a restore in place as `podman container
    restore` makes from a local checkpoint (a migration's restore back on its source node). Pure.

    Only without spec.name, where podman keeps the archive's container ID, which that container holds;
    only one that does not run; outside admin namespaces only one labelled for the restore's namespace.
    """
    namespace = crst.metadata.namespace
    return (
        not crst.spec.name
        and bool(holder.id)
        and holder.id == str(config.get("id") or "")
        and holder.state in STOPPED
        and (namespace in admins or holder.label(NAMESPACE_LABEL) == namespace)
    )


def check_policy(node: Node, crst: ContainerRestore, configuration: ContainerConfiguration) -> None:
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
    trust: manifest.Trust,
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


def _previous(node: Node, ref: PreviousArchive, folder: WorkFolder, status: StatusWriter) -> Path:
    # Like source.archive (services/scheduling.py): a storage the namespace may use, a key in its folder.
    namespace = status.namespace
    storage = choose_storage(ref.storage_ref, node.kube.storages(), namespace=namespace)
    store = node.store(NameRef(name=storage.metadata.name))
    key = layout.resolve_archive_key(store.prefix, namespace, ArchiveRef(key=ref.key), node.settings.admins)
    path = folder.file("previous-" + _local_name(key))
    trust = trust_of(node, store, NameRef(name=storage.metadata.name), key)
    keys = node.encryption(NameRef(name=storage.metadata.name))
    digest = _fetch(node.settings, store, keys, key, path, status, trust, storage.metadata.name)
    if trust.signed and digest != trust.sha256:
        raise Failure(
            Reason.ARCHIVE_UNTRUSTED, f"the bytes of previous archive {key} are not those its signed manifest records"
        )
    if ref.sha256 and digest != ref.sha256:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"sha256 of previous archive {key} is {digest}, expected {ref.sha256}")
    archive_policy.require_safe_unpacking(path)  # podman unpacks it on the node too
    return path


def trust_of(node: Node, store: ArchiveStore, ref: NameRef, key: str) -> manifest.Trust:
    storage = node.kube.storage(ref.name)
    accept_unsigned = bool(storage and storage.spec.accept_unsigned_archives)
    return signing.archive_trust(store, key, accept_unsigned, lambda: signing.published_keys(node.kube, node.settings))


def _holder(runtime: Runtime, name: str) -> Container | None:
    """The container that holds the name (podman also finds a container by a prefix of its ID)."""
    found = runtime.inspect(name)
    return found if found is not None and found.name == name else None


def created_by_restore(found: Container | None, before: set[str], expected_id: str | None) -> bool:
    """Whether the container holding the restore's name after podman failed is one podman made in this
    restore: not one that held it before, and with the archive's ID when podman keeps it. Pure."""
    if found is None or found.id in before:
        return False
    return expected_id is None or found.id == expected_id


def _remove_half_restored(node: Node, name: str, before: set[str], expected_id: str | None) -> None:
    """Removes what podman left of a failed restore: by ID, only the container this restore created."""
    if not name:
        return
    try:
        found = _holder(node.runtime, name)
        if created_by_restore(found, before, expected_id):
            assert found is not None
            log.info("removing half-restored container %s (%s)", name, found.id)
            node.runtime.remove(found)
        elif found is not None:
            log.info("not removing container %s (%s): this restore did not create it", name, found.id)
    except PodmanError as e:
        log.warning("could not remove half-restored container %s: %s", name, e)


def named_volumes(config: dict[str, Any]) -> list[str]:
    """The named volumes of the archive's container (config.dump's namedVolumes), each once. Pure."""
    found: list[str] = []
    for volume in config.get("namedVolumes") or []:
        name = volume.get("volumeName") if isinstance(volume, dict) else None
        if isinstance(name, str) and name not in found:
            found.append(name)
    return found


def joined_networks(config: dict[str, Any]) -> list[str]:
    """The podman networks the archive's container joins (config.dump's newNetworks), each once. Pure."""
    networks = config.get("newNetworks")
    return [str(n) for n in networks] if isinstance(networks, dict) else []


def network_refusal(
    networks: list[str], found: dict[str, Labelled | None], namespace: str, node: str
) -> Failure | None:
    """Outside an admin namespace the restored container joins only networks labelled for its namespace,
    besides podman's default one: a network of the same name on another node may be another team's,
    and joining it puts the container beside that team's containers. Pure.

    `found` holds podman's answer for each network it was asked about; a name podman would not accept
    was not asked."""
    refused = []
    for name in networks:
        network = found.get(name)
        if network is None:
            refused.append(f"{name!r} (absent)" if VOLUME_NAME.fullmatch(name) else f"{name!r} (not a network name)")
        elif network.label(NAMESPACE_LABEL) != namespace:
            refused.append(repr(name))
    if not refused:
        return None
    return Failure(
        Reason.NETWORK_NOT_PERMITTED,
        f"the archive's container joins the podman network(s) {', '.join(refused)} on node {node}, which are not "
        f"labelled {NAMESPACE_LABEL}={namespace}; outside an admin namespace a restore joins only podman's "
        f"default network ({DEFAULT_NETWORK}) and networks labelled for its namespace; nothing was restored",
    )


def pod_refusal(ref: str, pod: Labelled | None, namespace: str, node: str) -> Failure | None:
    """A restore outside an admin namespace joins only a podman pod labelled for its namespace. Pure."""
    if pod is None:
        return Failure(
            Reason.POD_NOT_FOUND,
            f"no podman pod {ref!r} on node {node}; create it there (labelled {NAMESPACE_LABEL}={namespace}) "
            "or leave spec.pod out; nothing was restored",
        )
    if pod.label(NAMESPACE_LABEL) != namespace:
        return Failure(
            Reason.POD_NOT_PERMITTED,
            f"podman pod {ref!r} on node {node} is not labelled {NAMESPACE_LABEL}={namespace}; outside an "
            "admin namespace a restore joins only a pod of its own namespace; nothing was restored",
        )
    return None


def volume_refusal(volumes: list[str], found: dict[str, Labelled | None], namespace: str, node: str) -> Failure | None:
    """Outside an admin namespace each named volume of the archive must be absent on the node (podman
    creates it) or labelled for the restore's namespace, whether or not the restore sets ignoreVolumes. Pure.

    `found` holds podman's answer for each volume it was asked about; a name podman would not accept
    was not asked.
    """
    refused = []
    for name in volumes:
        if not VOLUME_NAME.fullmatch(name):
            refused.append(f"{name!r} (not a podman volume name)")
        elif (volume := found.get(name)) is not None and volume.label(NAMESPACE_LABEL) != namespace:
            refused.append(repr(name))
    if not refused:
        return None
    return Failure(
        Reason.VOLUME_NOT_PERMITTED,
        f"the archive's container uses the named volume(s) {', '.join(refused)}, which exist on node {node} "
        f"without the label {NAMESPACE_LABEL}={namespace}; outside an admin namespace a restore uses only "
        "volumes that are absent from the node or labelled for its namespace; nothing was restored",
    )
