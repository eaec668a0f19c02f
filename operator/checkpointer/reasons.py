"""Phases, condition types and reasons: stable CamelCase words that users and tests match on."""

from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    SCHEDULED = "Scheduled"
    CHECKPOINTING = "Checkpointing"
    UPLOADING = "Uploading"
    # a ContainerMigration's: the archive goes from the source node through the bucket to the target
    TRANSFERRING = "Transferring"
    DOWNLOADING = "Downloading"
    RESTORING = "Restoring"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in FINISHED


# The final phases, to match a phase read from an object (a plain string, perhaps none) against.
FINISHED = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionType(StrEnum):
    SCHEDULED = "Scheduled"
    READY = "Ready"


class Reason(StrEnum):
    # scheduling (controller)
    SCHEDULED = "Scheduled"
    NODE_NOT_FOUND = "NodeNotFound"
    AGENT_UNAVAILABLE = "AgentUnavailable"
    STORAGE_NOT_FOUND = "StorageNotFound"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    PREVIOUS_CHECKPOINT_NOT_READY = "PreviousCheckpointNotReady"
    CHECKPOINT_NOT_FOUND = "CheckpointNotFound"
    CHECKPOINT_NOT_READY = "CheckpointNotReady"
    CHECKPOINT_NOT_EXPORTED = "CheckpointNotExported"
    CONTAINER_AMBIGUOUS = "ContainerAmbiguous"
    STORAGE_NOT_PERMITTED = "StorageNotPermitted"
    PUBLISH_NOT_PERMITTED = "PublishNotPermitted"
    # an Event of the controller: it put back the node label someone changed on a scheduled object
    NODE_LABEL_RESTORED = "NodeLabelRestored"
    # checkpoint (controller): the agent stored the archives, the controller signs their manifest
    SIGNING = "Signing"
    # checkpoint (agent)
    CHECKPOINTING = "Checkpointing"
    UPLOADING = "Uploading"
    UPLOAD_RETRYING = "UploadRetrying"
    CONTAINER_NOT_FOUND = "ContainerNotFound"
    CONTAINER_NOT_PERMITTED = "ContainerNotPermitted"
    CONTAINER_NOT_RUNNING = "ContainerNotRunning"
    CRIU_FEATURE_MISSING = "CRIUFeatureMissing"
    # refused by the controller from the Lease's podman version, or by the agent from its own
    LIVE_EXPORT_NOT_PERMITTED = "LiveExportNotPermitted"
    CHECKPOINT_FAILED = "CheckpointFailed"
    CHECKPOINT_INTERRUPTED = "CheckpointInterrupted"
    UPLOAD_FAILED = "UploadFailed"
    INSUFFICIENT_SPACE = "InsufficientSpace"
    CANCELLED = "Cancelled"
    # a Pod's checkpoint (podRef; controller and agent). PodNotFound (below) also names a missing Pod.
    POD_NOT_RUNNING = "PodNotRunning"
    CONTAINER_NOT_IN_POD = "ContainerNotInPod"
    # spec.nodeName names another node than the Pod's
    POD_ON_ANOTHER_NODE = "PodOnAnotherNode"
    # restore (agent)
    DOWNLOADING = "Downloading"
    RESTORING = "Restoring"
    ARCHIVE_NOT_FOUND = "ArchiveNotFound"
    ARCHIVE_CORRUPT = "ArchiveCorrupt"
    ARCHIVE_UNTRUSTED = "ArchiveUntrusted"
    ARCHIVE_NOT_PERMITTED = "ArchiveNotPermitted"
    POD_NOT_FOUND = "PodNotFound"
    POD_NOT_PERMITTED = "PodNotPermitted"
    VOLUME_NOT_PERMITTED = "VolumeNotPermitted"
    NETWORK_NOT_PERMITTED = "NetworkNotPermitted"
    IMAGE_NOT_FOUND = "ImageNotFound"
    NAME_IN_USE = "NameInUse"
    RESTORE_FAILED = "RestoreFailed"
    RESTORE_INTERRUPTED = "RestoreInterrupted"
    RESTORE_UNDONE = "RestoreUndone"
    # migration (controller)
    TRANSFERRING = "Transferring"
    # targetNodeName names the source node: the container would go nowhere
    TARGET_IS_SOURCE = "TargetIsSource"
    # no Ready node with a live agent, other than the source and not cordoned, to move the container to
    NO_TARGET_NODE = "NoTargetNode"
    # an Event: the controller chose the target node
    TARGET_CHOSEN = "TargetChosen"
    # an object of the name the migration gives its checkpoint or restore exists and is not its own
    NAME_TAKEN = "NameTaken"
    # the restore on the target failed for good: the container was restored on the source node
    RESTORED_ON_SOURCE = "RestoredOnSource"
    # and the restore back on the source failed too: the archive stays in the bucket
    RETURN_FAILED = "ReturnFailed"
    # a restore of a checkpoint still running: waiting for its first part, reading its parts as they land
    WAITING_FOR_CHECKPOINT = "WaitingForCheckpoint"
    STREAMING = "Streaming"
    # either
    RUNTIME_UNAVAILABLE = "RuntimeUnavailable"
    # the node's CRI runtime (containerd, CRI-O) cannot checkpoint: no CheckpointContainer, or no CRIU
    RUNTIME_CANNOT_CHECKPOINT = "RuntimeCannotCheckpoint"
    SUCCEEDED = "Succeeded"
    # storage
    AVAILABLE = "Available"
    UNAVAILABLE = "Unavailable"
    # schedule (controller): its Ready reasons and its Events
    ACTIVE = "Active"
    SUSPENDED = "Suspended"
    INVALID_SCHEDULE = "InvalidSchedule"
    CREATED = "Created"
    FAILED_CREATE = "FailedCreate"
    SKIPPED = "Skipped"
    MISSED = "Missed"
    DELETED = "Deleted"
