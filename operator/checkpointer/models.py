"""Typed views of the custom resources. Parsing happens once, at the edge, in the handlers."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


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


class CheckpointSpec(Model):
    node_name: str
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
    # A Go duration: how long the object stays once finished (services/expiry.py).
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


class CheckpointStatus(Model):
    phase: str | None = None
    node_name: str | None = None
    storage_ref: NameRef | None = None
    archives: list[Archive] = Field(default_factory=list)
    # The sha256 of the unsigned manifest the agent wrote for the controller to sign.
    manifest_sha256: str | None = Field(default=None, alias="manifestSHA256")


class Metadata(Model):
    name: str
    namespace: str = ""
    uid: str = ""
    generation: int = 0
    deletion_timestamp: str | None = None
    # RFC 3339, whole seconds: strings of it sort as the times do.
    creation_timestamp: str | None = None


class ContainerCheckpoint(Model):
    metadata: Metadata
    spec: CheckpointSpec
    status: CheckpointStatus = Field(default_factory=CheckpointStatus)


class CheckpointRef(Model):
    name: str
    container: str | None = None


class ArchiveRef(Model):
    storage_ref: NameRef | None = None
    key: str
    # Whose folder `key` is in; absent: the restore's own namespace. Another only for admin namespaces.
    namespace: str | None = None
    sha256: str | None = None


class RestoreSource(Model):
    checkpoint_ref: CheckpointRef | None = None
    archive: ArchiveRef | None = None


class RestoreSpec(Model):
    node_name: str
    source: RestoreSource
    previous: ArchiveRef | None = None
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


class RestoreStatus(Model):
    phase: str | None = None
    node_name: str | None = None
    archive: ResolvedArchive | None = None
    container_id: str | None = Field(default=None, alias="containerID")


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


class CheckpointStorage(Model):
    metadata: Metadata
    spec: StorageSpec
    status: dict[str, Any] = Field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.status.get("phase") == "Available"


class ConcurrencyPolicy(StrEnum):
    FORBID = "Forbid"
    ALLOW = "Allow"


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

    @property
    def node_name(self) -> str:
        return str(self.template.get("nodeName") or "")


class ScheduleMetadata(Metadata):
    creation_timestamp: str | None = None


class CheckpointSchedule(Model):
    metadata: ScheduleMetadata
    spec: ScheduleSpec
    status: dict[str, Any] = Field(default_factory=dict)
