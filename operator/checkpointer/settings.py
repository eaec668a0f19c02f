"""One settings object, read from CHECKPOINTER_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHECKPOINTER_", frozen=True)

    # Where agent Leases live; the chart sets it to the release namespace.
    namespace: str = "checkpointer-system"
    # Namespaces whose objects may checkpoint any container and read any namespace's archives
    # (docs/security.md). Empty: the release namespace alone.
    admin_namespaces: list[str] = []
    # The host ports a ContainerRestore outside an admin namespace may publish (`publish`), as
    # comma-separated ports and ranges, e.g. "30000-32767"; empty: none (services/scheduling.py).
    publish_host_ports: str = ""
    # In `namespace`: the Secret that holds the controller's manifest signing key (it creates it on
    # first start), and the ConfigMap where it publishes the public key for the agents.
    signing_key_secret: str = "checkpointer-signing-key"
    signing_public_key_config_map: str = "checkpointer-signing-public-key"
    # The agent's own node (downward API spec.nodeName in the chart).
    node_name: str = ""

    # How the agent reaches podman: the libpod REST API on the host socket, or the CLI run through
    # nsenter into the mount and PID namespaces of nsenter_target (PID 1 of the host with hostPID).
    podman_mode: Literal["api", "cli"] = "api"
    podman_socket: Path = Path("/run/podman/podman.sock")
    nsenter_target: int = 1
    podman_command: list[str] = ["podman"]
    # A checkpoint or restore may take long; a question (inspect, list, version) must not.
    podman_timeout_seconds: float = 3600.0
    podman_query_timeout_seconds: float = 30.0

    # The node's CRI runtime (containerd, CRI-O), through which the agent checkpoints a Pod's
    # containers (adapters/cri.py); its directory is mounted into the agent's Pod. Unset or empty: the
    # agent has none, records no runtime on its Lease, and checkpoints podman's containers only.
    cri_socket: Path | None = None
    # How long the runtime may take for one container's checkpoint (CRI CheckpointContainer's timeout).
    cri_checkpoint_timeout_seconds: int = 3600

    # Archives are spooled here (on the node) so that an upload can be retried after a restart.
    spool_dir: Path = Path("/var/lib/checkpointer/spool")
    part_size: int = 16 * MiB
    upload_concurrency: int = 4
    # 0 means unlimited; a cap keeps a checkpoint from saturating the node's uplink.
    upload_bytes_per_second: int = 0
    # 0 means unlimited; a cap keeps a restore's download from saturating the node's downlink.
    download_bytes_per_second: int = 0
    zstd_level: int = 3
    # A failed upload is retried after upload_retry_seconds, doubling up to upload_retry_max_seconds;
    # past upload_deadline_seconds from the first failure the object fails and the spool stays.
    upload_retry_seconds: float = 5.0
    upload_retry_max_seconds: float = 300.0
    upload_deadline_seconds: float = 86400.0
    # A checkpoint is refused (InsufficientSpace) when the spool has less free space than this.
    spool_min_free_bytes: int = 256 * MiB
    # A restore's archive may not inflate past this many bytes on the node (0: no cap but the
    # spool's free space less spool_min_free_bytes, and the size its manifest states).
    max_archive_bytes: int = 0
    # How often the agent clears what faults left in the spool (see services/sweep.py).
    sweep_seconds: float = 60.0
    # The agent refuses a checkpoint (InsufficientSpace) whose estimated archive would take the spool's
    # usage past this many bytes; 0: no cap but the file system's free space less spool_min_free_bytes.
    spool_max_bytes: int = 0
    # How long the local checkpoint podman keeps for `keep: true` (CRIU's dump.log and images in the
    # container's folder) stays on the node once its object finished; it goes at once with the object.
    local_checkpoint_retention_seconds: float = 86400.0

    # kopf's liveness endpoint (GET /healthz) for the chart's probes; 0 turns it off.
    health_port: int = 8080
    # The address it listens on. Pods on the host's network share its ports with every other such
    # pod on the machine: the chart then gives each one its Pod IP (docs/local-environment.md).
    health_host: str = "0.0.0.0"
    # Prometheus metrics (GET /metrics, docs/metrics.md); 0 turns them off, and nothing is recorded.
    # The address follows health_host's rule on the host's network.
    metrics_port: int = 9090
    metrics_host: str = "0.0.0.0"
    # Log lines as text, or one JSON object per line (`--log-format`, which takes precedence).
    log_format: Literal["text", "json"] = "text"

    lease_duration_seconds: int = 20
    lease_renew_seconds: float = 5.0
    storage_validation_seconds: float = 60.0
    # A Scheduled object whose node's agent has been silent this long fails with AgentUnavailable.
    agent_pickup_timeout_seconds: float = 60.0
    # The ttl (Go duration) of ContainerCheckpoints and ContainerRestores whose spec names none;
    # empty: they stay until deleted.
    default_ttl: str = ""

    # The controller's leader election: replicas stand by until the Lease is theirs.
    pod_name: str = ""
    leader_lease_duration_seconds: float = 10.0
    leader_renew_seconds: float = 2.0

    @field_validator("cri_socket", mode="before")
    @classmethod
    def _no_socket_when_empty(cls, value: object) -> object:
        # The chart sets CHECKPOINTER_CRI_SOCKET="" for "none", which would otherwise be Path(".").
        return None if value == "" else value

    @property
    def admins(self) -> frozenset[str]:
        return frozenset(self.admin_namespaces or [self.namespace])
