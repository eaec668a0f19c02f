"""Typed views of the custom resources. Parsing happens once, at the edge, in the handlers."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


def node_of(body: Mapping[str, Any]) -> str:
    """The node of a ContainerCheckpoint or ContainerRestore as a body has it: spec.nodeName, or for a
    Pod's checkpoint that names none, the Pod's node the controller recorded in status.nodeName (which
    tenants cannot write); "" before it has. Pure."""
    spec = body.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    if spec.get("podRef"):
        return str((body.get("status") or {}).get("nodeName") or "")
    return ""


class Model(BaseModel):
    # Unknown fields are ignored, not refused: an object written by an older or newer release still
    # reads. What the CRDs declare and the models hold is kept equal by tests/unit/test_crd_models.py.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class Status(Model):
    """A kind's status. As a patch (status.StatusWriter), only the fields set are written; one set to
    None is removed."""

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Self:
        """The status of a whole object as the API server sends it; empty before anyone wrote one."""
        return cls.model_validate(obj.get("status") or {})

    def patch(self) -> dict[str, Any]:
        """The JSON merge patch of the fields set: None removes a field, absent ones stay as they are."""
        dumped = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        aliases = {name: field.alias or name for name, field in type(self).model_fields.items()}
        return {aliases[name]: dumped.get(aliases[name]) for name in self.model_fields_set}

    def changed_since(self, written: Status) -> Self:
        """The patch of the fields this one sets whose values `written` does not hold (a field it lacks
        holds None)."""
        changed = {
            name: value
            for name in self.model_fields_set
            if (value := getattr(self, name)) != (getattr(written, name) if name in written.model_fields_set else None)
        }
        return type(self).model_validate(changed)


class Condition(Model):
    """One aspect of an object's state, in the metav1.Condition shape."""

    type: str
    status: str = ""
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Progress(Model):
    bytes_done: int = 0
    bytes_total: int | None = None


class PhasedStatus(Status):
    """A status with a phase, its conditions and times: a ContainerCheckpoint's, a ContainerRestore's
    and a ContainerMigration's. Its writers guard the phase (status.StatusWriter)."""

    phase: str | None = None
    observed_generation: int | None = None
    start_time: str | None = None
    completion_time: str | None = None
    expiration: str | None = None
    progress: Progress | None = None
    conditions: list[Condition] = Field(default_factory=list)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class ObjectStatus(PhasedStatus):
    """What a ContainerCheckpoint's and a ContainerRestore's status have in common: a phase on a node."""

    node_name: str | None = None


class Compression(StrEnum):
    ZSTD = "zstd"
    GZIP = "gzip"
    NONE = "none"

    @property
    def suffix(self) -> str:
        return {"zstd": ".tar.zst", "gzip": ".tar.gz", "none": ".tar"}[self.value]


class NameRef(Model):
    name: str


class Export(Model):
    storage_ref: NameRef | None = None
    key: str | None = None


class PodRef(Model):
    """A Pod of the checkpoint's own namespace, and which of its containers (none: every one)."""

    name: str
    containers: list[str] = Field(default_factory=list)


class CheckpointSpec(Model):
    # None only with pod_ref: the controller takes the Pod's node and records it in status.nodeName.
    node_name: str | None = None
    containers: list[str] = Field(default_factory=list)
    all: bool = False
    latest: bool = False
    leave_running: bool = False
    tcp_established: bool = False
    keep: bool = False
    pre_checkpoint: bool = False
    with_previous: bool = False
    previous_checkpoint_ref: NameRef | None = None
    export: Export | None = None
    compress: Compression = Compression.ZSTD
    ignore_rootfs: bool = False
    ignore_volumes: bool = False
    pod_ref: PodRef | None = None
    # A Go duration: how long the object stays once finished (ttl.py).
    ttl: str | None = None


class Archive(Model):
    container: str
    container_id: str = Field(default="", alias="containerID")
    uri: str | None = None
    key: str | None = None
    size: int | None = None
    sha256: str | None = None
    compression: Compression | None = None
    stats: dict[str, Any] | None = None


class ArchiveStream(Model):
    """One archive whose parts are readable while it is written (status.streams; services/pipeline.py)."""

    container: str = ""
    key: str = ""
    part_size: int = 0
    # For each part that landed, in order: the sha256 of the archive up to that part's end.
    digests: list[str] = Field(default_factory=list)
    # Known once the last part landed.
    size: int | None = None


class CheckpointStatus(ObjectStatus):
    storage_ref: NameRef | None = None
    archives: list[Archive] = Field(default_factory=list)
    streams: list[ArchiveStream] = Field(default_factory=list)
    # The sha256 of the unsigned manifest the agent wrote for the controller to sign.
    manifest_sha256: str | None = Field(default=None, alias="manifestSHA256")
    # When podman was asked to checkpoint the first container: from then on it serves nothing.
    frozen_time: str | None = None


class Metadata(Model):
    name: str
    namespace: str = ""
    uid: str = ""
    generation: int = 0
    # The object's revision this copy is of: a status write carries it (status.StatusWriter).
    resource_version: str = ""
    deletion_timestamp: str | None = None
    # RFC 3339, whole seconds: strings of it sort as the times do.
    creation_timestamp: str | None = None


class ContainerCheckpoint(Model):
    metadata: Metadata
    spec: CheckpointSpec
    status: CheckpointStatus = Field(default_factory=CheckpointStatus)

    @property
    def node_name(self) -> str:
        """The node whose agent acts: spec.nodeName, or for a Pod's checkpoint without one the Pod's
        node as the controller recorded it (status.nodeName); "" before it has."""
        return self.spec.node_name or self.status.node_name or ""


class CheckpointRef(Model):
    name: str
    container: str | None = None


class PreviousArchive(Model):
    """The pre-checkpoint archive a restore builds on: a key in the restore's own namespace's folder."""

    storage_ref: NameRef | None = None
    key: str
    sha256: str | None = None


class ArchiveRef(PreviousArchive):
    # Whose folder `key` is in; absent: the restore's own namespace. Another only for admin namespaces.
    namespace: str | None = None


class RestoreSource(Model):
    checkpoint_ref: CheckpointRef | None = None
    archive: ArchiveRef | None = None


class RestoreSpec(Model):
    node_name: str
    source: RestoreSource
    previous: PreviousArchive | None = None
    name: str | None = None
    tcp_established: bool = False
    tcp_close: bool = False
    ignore_rootfs: bool = False
    ignore_volumes: bool = False
    ignore_static_ip: bool = Field(default=False, alias="ignoreStaticIP")
    ignore_static_mac: bool = Field(default=False, alias="ignoreStaticMAC")
    keep: bool = False
    file_locks: bool = False
    pod: str | None = None
    publish: list[str] = Field(default_factory=list)
    ttl: str | None = None


class ResolvedArchive(Model):
    """The archive a restore reads, as the controller resolved it."""

    storage_ref: NameRef
    # Empty while the checkpoint that writes it still runs: the agent follows it (services/pipeline.py).
    key: str = ""
    sha256: str | None = None
    compression: Compression | None = None


class RestoreStatus(ObjectStatus):
    archive: ResolvedArchive | None = None
    container_id: str | None = Field(default=None, alias="containerID")
    container_name: str | None = None
    # podman's --print-stats figures of the restore, as podman reports them.
    stats: dict[str, Any] | None = None
    # When podman's restore returned: the container runs from then on.
    running_time: str | None = None


class ContainerRestore(Model):
    metadata: Metadata
    spec: RestoreSpec
    status: RestoreStatus = Field(default_factory=RestoreStatus)


class SecretRef(Model):
    namespace: str
    name: str


class Encryption(Model):
    secret_ref: SecretRef


class StorageSpec(Model):
    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    force_path_style: bool = False
    ca_bundle: str | None = None
    credentials_secret_ref: SecretRef | None = None
    default: bool = False
    deletion_policy: str = "Delete"
    # None: every namespace may use the storage.
    allowed_namespaces: list[str] | None = None
    accept_unsigned_archives: bool = False
    encryption: Encryption | None = None


class StorageStatus(Status):
    phase: str | None = None
    last_validated_time: str | None = None
    message: str | None = None


class CheckpointStorage(Model):
    metadata: Metadata
    spec: StorageSpec
    status: StorageStatus = Field(default_factory=StorageStatus)

    @property
    def available(self) -> bool:
        return self.status.phase == "Available"


class ConcurrencyPolicy(StrEnum):
    FORBID = "Forbid"
    ALLOW = "Allow"


class CordonAction(StrEnum):
    """What a schedule's onNodeCordon does: checkpoint the template, or move its containers away."""

    CHECKPOINT = "Checkpoint"
    MIGRATE = "Migrate"


class Retention(Model):
    keep_last: int | None = None
    max_age: str | None = None  # a Go duration, checked at admission


class ScheduleSpec(Model):
    schedule: str
    time_zone: str | None = None
    suspend: bool = False
    concurrency_policy: ConcurrencyPolicy = ConcurrencyPolicy.FORBID
    starting_deadline_seconds: int | None = None
    # A ContainerCheckpoint spec, passed on as written: the CRD validated it as one.
    template: dict[str, Any]
    retention: Retention | None = None
    on_node_cordon: bool = False
    cordon_action: CordonAction = CordonAction.CHECKPOINT

    @property
    def node_name(self) -> str:
        return str(self.template.get("nodeName") or "")


class ScheduleMetadata(Metadata):
    creation_timestamp: str | None = None


class ObjectReference(Model):
    api_version: str = ""
    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


class ScheduleStatus(Status):
    last_schedule_time: str | None = None
    last_successful_time: str | None = None
    last_cordon_time: str | None = None
    active_count: int | None = None
    active: list[ObjectReference] = Field(default_factory=list)
    observed_generation: int | None = None
    conditions: list[Condition] = Field(default_factory=list)


class CheckpointSchedule(Model):
    metadata: ScheduleMetadata
    spec: ScheduleSpec
    status: ScheduleStatus = Field(default_factory=ScheduleStatus)


class MigrationSource(Model):
    node_name: str
    container: str


class MigrationSpec(Model):
    source: MigrationSource
    # Absent: the controller chooses a Ready node with a live agent, not the source, not cordoned.
    target_node_name: str | None = None
    storage_ref: NameRef | None = None
    compress: Compression = Compression.ZSTD
    tcp_established: bool = False
    # The restored container's name (the restore's spec.name); absent: the one it had.
    name: str | None = None
    ttl: str | None = None


class MigrationStatus(PhasedStatus):
    checkpoint_ref: NameRef | None = None
    restore_ref: NameRef | None = None
    # The restore back on the source node, made once the restore on the target failed for good.
    fallback_restore_ref: NameRef | None = None
    source_node_name: str | None = None
    target_node_name: str | None = None
    frozen_time: str | None = None
    running_time: str | None = None
    downtime_seconds: float | None = None


class ContainerMigration(Model):
    metadata: Metadata
    spec: MigrationSpec
    status: MigrationStatus = Field(default_factory=MigrationStatus)
