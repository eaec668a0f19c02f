"""S3-compatible storage: a client from a CheckpointStorage and its credentials (see archive.store for its use)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from checkpointer.models import CheckpointStorage

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

StorageError = (BotoCoreError, ClientError)


@dataclass(frozen=True)
class Credentials:
    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:  # never let a secret reach a log line
        return "Credentials(<redacted>)"


def client(storage: CheckpointStorage, credentials: Credentials | None, max_connections: int = 10) -> S3Client:
    spec = storage.spec
    verify: str | bool = True
    if spec.ca_bundle:
        # botocore wants a file path for a custom CA; the file lives as long as the process.
        ca = tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False)  # noqa: SIM115
        ca.write(spec.ca_bundle)
        ca.close()
        verify = ca.name
    config = Config(
        s3={
            "addressing_style": "path" if spec.force_path_style else "auto",
            # Over plain HTTP botocore would sha256 every part to sign it, and the server hash it
            # again; each part's CRC32 (see archive.store) and the archive's sha256 guard it.
            "payload_signing_enabled": False,
        },
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=max_connections,
        # Only the CRC32 that archive.store computes from the spool itself: botocore's own would be of
        # the bytes read back, and is not implemented by every S3-compatible server.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        connect_timeout=10,
        read_timeout=120,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=spec.endpoint or None,
        region_name=spec.region or "us-east-1",
        aws_access_key_id=credentials.access_key_id if credentials else None,
        aws_secret_access_key=credentials.secret_access_key if credentials else None,
        config=config,
        verify=verify,
    )
