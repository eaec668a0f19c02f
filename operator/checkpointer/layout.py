"""Where archives live in the bucket, and the manifest that makes one restorable on its own."""

from __future__ import annotations

import posixpath
from typing import Any

from checkpointer.models import Compression, ContainerCheckpoint

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def archive_dir(prefix: str, checkpoint: ContainerCheckpoint) -> str:
    """`<prefix>/<namespace>/<name>-<uid first 8>`, or `<prefix>/<export.key>` when the spec sets one."""
    meta = checkpoint.metadata
    export = checkpoint.spec.export
    own = export.key if export and export.key else f"{meta.namespace}/{meta.name}-{meta.uid[:8]}"
    return posixpath.join(prefix.strip("/"), own.strip("/")) if prefix.strip("/") else own.strip("/")


def archive_key(directory: str, container: str, compression: Compression) -> str:
    return f"{directory}/{container}{compression.suffix}"


def log_key(directory: str, container: str) -> str:
    return f"{directory}/{container}.criu-dump.log"


def uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def compression_of(key: str) -> Compression:
    for compression in (Compression.ZSTD, Compression.GZIP, Compression.NONE):
        if key.endswith(compression.suffix):
            return compression
    return Compression.NONE


def manifest(
    checkpoint: ContainerCheckpoint,
    archives: list[dict[str, Any]],
    host: dict[str, Any],
    started: str,
    finished: str,
) -> dict[str, Any]:
    """Everything needed to restore without the cluster that made the archives."""
    spec = checkpoint.spec
    return {
        "manifestVersion": MANIFEST_VERSION,
        "kind": "ContainerCheckpoint",
        "namespace": checkpoint.metadata.namespace,
        "name": checkpoint.metadata.name,
        "uid": checkpoint.metadata.uid,
        "nodeName": spec.node_name,
        "flags": spec.model_dump(by_alias=True, exclude_defaults=True, mode="json"),
        "host": host,
        "startTime": started,
        "completionTime": finished,
        "archives": archives,
    }
