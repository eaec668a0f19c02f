"""S3-compatible storage: a client from a CheckpointStorage and its credentials (see archive.store for its use)."""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
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


class CaFiles:
    """The files botocore reads a custom CA bundle from: it takes only a path, and reads it again for
    every new connection, so the file lives as long as a client may connect. One file per distinct
    bundle, in one private folder that is removed when the process ends: a storage validated every
    minute never adds a file."""

    def __init__(self) -> None:
        self._folder: Path | None = None
        self._lock = threading.Lock()

    def path(self, bundle: str) -> str:
        with self._lock:
            if self._folder is None:
                self._folder = Path(tempfile.mkdtemp(prefix="checkpointer-ca-"))
                atexit.register(self.remove)
            path = self._folder / f"{hashlib.sha256(bundle.encode()).hexdigest()[:16]}.pem"
            if not path.exists():
                partial = path.with_suffix(".partial")
                partial.write_text(bundle)
                partial.replace(path)
            return str(path)

    def remove(self) -> None:
        with self._lock:
            if self._folder is not None:
                shutil.rmtree(self._folder, ignore_errors=True)
                self._folder = None


CA_FILES = CaFiles()


def client(storage: CheckpointStorage, credentials: Credentials | None, max_connections: int = 10) -> S3Client:
    spec = storage.spec
    verify: str | bool = CA_FILES.path(spec.ca_bundle) if spec.ca_bundle else True
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
