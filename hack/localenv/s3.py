"""A real S3-compatible server for tests: the Versity S3 Gateway (Apache-2.0) on 127.0.0.1.

`versitygw posix` serves a directory: each bucket is a folder, each object a file, with its metadata
in extended attributes. It streams every request straight to or from the file, and a completed
multipart upload is assembled with copy_file_range, so it takes on the order of 1 CPU-second per GiB:
on a 2-core machine the S3 server shares with podman and the agent, that is what lets the benchmark
measure checkpointer rather than the server. Access is by one root key pair, random per start.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config

from localenv.procs import BIN, LocalEnvError, Process, ProcessExited, Supervisor, free_port, wait_until

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def s3_binary() -> Path:
    return BIN / "versitygw"


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
        binary = s3_binary()
        if not binary.exists():
            raise LocalEnvError(f"{binary} is missing: run hack/build/tools.sh")
        data_dir = data_dir.resolve()
        root = data_dir / "buckets"
        root.mkdir(parents=True, exist_ok=True)
        supervisor = supervisor or Supervisor(data_dir / "logs")
        access_key = "AK" + secrets.token_hex(9).upper()
        secret_key = secrets.token_urlsafe(30)
        port = free_port()
        process = _spawn(supervisor, binary, port, region, data_dir, access_key, secret_key)
        server = cls(
            endpoint=f"http://127.0.0.1:{port}",
            access_key=access_key,
            secret_key=secret_key,
            bucket=bucket,
            region=region,
            data_dir=data_dir,
            process=process,
            supervisor=supervisor,
        )
        try:
            wait_until("S3 server accepting writes", server._ready, timeout=timeout, log=process.log)
        except BaseException:
            server.stop()
            raise
        return server

    def client(self) -> S3Client:
        return client(self.endpoint, self.access_key, self.secret_key, self.region)

    def stop(self) -> None:
        self.process.stop(grace=3)
        self.supervisor.stop(self.process.name)

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def stop_process(self, kill: bool = False) -> None:
        """End the server process only; its data and the endpoint stay for `start_again`."""
        if kill and self.process.alive():
            os.killpg(self.process.popen.pid, signal.SIGKILL)
        self.stop()

    def start_again(self, timeout: float = 60) -> None:
        """Serve the same data on the same port with the same credentials after `stop_process`.

        Open multipart uploads live in the data directory too, so they survive the restart.
        """
        if self.process.alive():
            return
        self.process = _spawn(
            self.supervisor, s3_binary(), self.port, self.region, self.data_dir, self.access_key, self.secret_key
        )
        wait_until("S3 server accepting writes", self._ready, timeout=timeout, log=self.process.log)

    def _ready(self) -> bool:
        if not self.process.alive():
            raise ProcessExited(f"the S3 server exited with {self.process.popen.returncode}, see {self.process.log}")
        s3 = self.client()
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            s3.create_bucket(Bucket=self.bucket)
        key = f".localenv-ready-{time.time_ns()}"
        s3.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
        s3.delete_object(Bucket=self.bucket, Key=key)
        return True


def _spawn(
    supervisor: Supervisor, binary: Path, port: int, region: str, data_dir: Path, access_key: str, secret_key: str
) -> Process:
    argv: list[str | Path] = [
        binary,
        "--port",
        f"127.0.0.1:{port}",
        "--region",
        region,
        "posix",
        # ETags from a CRC checksum instead of MD5: S3 promises no MD5 for multipart objects,
        # and MD5 alone would be half the server's CPU.
        "--data-integrity-etag",
        data_dir / "buckets",
    ]
    # The root credentials go by environment, not argv, so they never show in a process list.
    env = {**os.environ, "ROOT_ACCESS_KEY": access_key, "ROOT_SECRET_KEY": secret_key}
    return supervisor.start("s3", argv, cwd=data_dir, env=env)


def client(endpoint: str, access_key: str, secret_key: str, region: str) -> S3Client:
    """A boto3 client for a test's own checks of the bucket, path-style as the local server wants."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"}),
    )
