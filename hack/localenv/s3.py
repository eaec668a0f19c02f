"""A real S3-compatible server for tests: SeaweedFS (`weed server`, Apache-2.0) on 127.0.0.1.

One process runs master, volume server, filer and S3 gateway. Every port is chosen free and passed
explicitly: weed derives unset gRPC ports as HTTP port + 10000 and starts extra listeners (Iceberg
catalog on 8181, Lance on 9101) unless told not to, and two environments side by side would collide.
Access is by one identity with a random key pair, from the S3 identities file (-s3.config).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from localenv.procs import BIN, LocalEnvError, Process, Supervisor, free_port, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def weed_binary() -> Path:
    return BIN / "weed"


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str
    bucket: str
    region: str
    data_dir: Path
    process: Process
    supervisor: Supervisor
    ports: dict[str, int]

    @classmethod
    def start(
        cls,
        data_dir: Path,
        supervisor: Supervisor | None = None,
        *,
        bucket: str = "checkpoints",
        region: str = "us-east-1",
        timeout: float = 60,
    ) -> S3Server:
        weed = weed_binary()
        if not weed.exists():
            raise LocalEnvError(f"{weed} is missing: run hack/build/tools.sh")
        data_dir = data_dir.resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        supervisor = supervisor or Supervisor(data_dir / "logs")
        access_key = "AK" + secrets.token_hex(9).upper()
        secret_key = secrets.token_urlsafe(30)
        identities = {
            "identities": [
                {
                    "name": "checkpointer",
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        config = data_dir / "s3-identities.json"
        config.write_text(json.dumps(identities, indent=2))
        config.chmod(0o600)

        ports = {
            name: free_port()
            for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")
        }
        argv: list[str | Path] = [
            weed,
            "server",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master.grpc']}",
            "-master.telemetry=false",
            # Small volumes, many allowed: the default (30 GiB volumes, at most 8) runs out of
            # volumes as soon as a few buckets (collections) exist.
            "-master.volumeSizeLimitMB=256",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume.grpc']}",
            "-volume.max=100",
            # Otherwise a SIGTERM waits 10 s before the volume server stops.
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer.grpc']}",
            f"-filer.localSocket={data_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={data_dir / 's3.sock'}",
            f"-s3.config={config}",
        ]
        process = supervisor.start("s3", argv, cwd=data_dir)
        server = cls(
            endpoint=f"http://127.0.0.1:{ports['s3']}",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            region=region,
            data_dir=data_dir,
            process=process,
            supervisor=supervisor,
            ports=ports,
        )
        try:
            # Writable, not just listening: a put needs master, volume server and filer all up.
            wait_until("SeaweedFS S3 accepting writes", server._ready, timeout=timeout, log=process.log)
        except BaseException:
            server.stop()
            raise
        return server

    def client(self) -> S3Client:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
        )

    def stop(self) -> None:
        # weed's volume server and filer are down within a second of SIGTERM, but the process
        # lingers (its S3 gateway keeps retrying the gone filer), so it is killed after a short grace.
        self.process.stop(grace=3)
        self.supervisor.stop(self.process.name)
        # Every gRPC server also listens on /tmp/seaweedfs-<role>-grpc-<port>.sock, whatever -dir says.
        for role in ("master", "volume", "filer", "s3"):
            Path(f"/tmp/seaweedfs-{role}-grpc-{self.ports[role + '.grpc']}.sock").unlink(missing_ok=True)

    def _ready(self) -> bool:
        if not self.process.alive():
            raise LocalEnvError(f"weed exited with {self.process.popen.returncode}, see {self.process.log}")
        s3 = self.client()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            s3.create_bucket(Bucket=self.bucket)
        key = f".localenv-ready-{time.time_ns()}"
        s3.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
        s3.delete_object(Bucket=self.bucket, Key=key)
        return True
