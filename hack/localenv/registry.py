"""A real OCI registry for the nodes with a kubelet: the CNCF distribution registry (Apache-2.0).

Built from the Go module proxy by hack/build/tools.sh, as the S3 server is, and served over plain
HTTP on 127.0.0.1, which every node reaches: the nodes share the machine's network namespace. Each
node's containerd is told by a hosts.toml that this registry speaks HTTP (hack/localenv/kubelet.py).

The environment pushes its images here (`Registry.push`) and the kubelets pull them, so a Pod's
`status.containerStatuses[].imageID` is a repository digest, `<host>/<repository>@sha256:...`, as on
a real cluster. An image is pushed as the OCI manifest of the same config and layer that its
docker-archive holds (hack/localenv/images.py), the layer uncompressed: the config's digest, the
image ID, is then the same in podman and in containerd, and every byte of the manifest follows from
the archive, so its digest is the same in every run.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from localenv.images import Image
from localenv.procs import BIN, LocalEnvError, Process, ProcessExited, Supervisor, free_port, wait_until

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"

CONFIG_YML = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  # Tests push and pull; they never delete.
  delete:
    enabled: false
http:
  addr: 127.0.0.1:{port}
"""


def registry_binary() -> Path:
    return BIN / "registry"


@dataclass
class Registry:
    host: str  # 127.0.0.1:<port>, the first component of every image reference it serves
    data_dir: Path
    process: Process
    supervisor: Supervisor

    @classmethod
    def start(cls, data_dir: Path, supervisor: Supervisor, timeout: float = 30) -> Registry:
        binary = registry_binary()
        if not binary.exists():
            raise LocalEnvError(f"{binary} is missing: run CHECKPOINTER_KUBELET_NODES=1 hack/build/tools.sh")
        data_dir = data_dir.resolve()
        (data_dir / "storage").mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = data_dir / "config.yml"
        config.write_text(CONFIG_YML.format(root=data_dir / "storage", port=port))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            # One registry, so no upload crosses instances: the secret that would sign their state
            # may be random (and saying so keeps the log free of the warning).
            "REGISTRY_HTTP_SECRET": os.urandom(16).hex(),
            # The registry traces with OpenTelemetry; there is no collector to send spans to.
            "OTEL_TRACES_EXPORTER": "none",
        }
        process = supervisor.start("registry", [binary, "serve", config], env=env, cwd=data_dir)
        registry = cls(f"127.0.0.1:{port}", data_dir, process, supervisor)
        try:
            wait_until("registry answering /v2/", registry._ready, timeout=timeout, interval=0.1, log=process.log)
        except BaseException:
            registry.stop()
            raise
        return registry

    def stop(self) -> None:
        self.process.stop(grace=3)
        self.supervisor.stop(self.process.name)

    def reference(self, local: str) -> str:
        """Where the image of local name `local` (localhost/checkpointer/<name>:<tag>) is in this registry."""
        return f"{self.host}/{local.removeprefix('localhost/')}"

    def push(self, image: Image) -> str:
        """Push the image of a docker-archive under `reference(image.ref)`; returns its reference by digest.

        Blobs the registry has are not sent again; the layer streams from the archive.
        """
        repository, tag = self.reference(image.ref).removeprefix(f"{self.host}/").rsplit(":", 1)
        with tarfile.open(image.archive) as archive:
            (entry,) = json.loads(_member(archive, "manifest.json").read())
            config = _member(archive, entry["Config"]).read()
            (layer_name,) = entry["Layers"]
            layer = archive.getmember(layer_name)
            layer_digest = "sha256:" + layer_name.removesuffix(".tar")
            config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
            if config_digest != f"sha256:{image.image_id}":
                raise LocalEnvError(f"{image.archive}: config digest {config_digest}, image ID {image.image_id}")
            self._put_blob(repository, config_digest, config, len(config))
            self._put_blob(repository, layer_digest, _member(archive, layer_name), layer.size)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
                "layers": [{"mediaType": LAYER, "digest": layer_digest, "size": layer.size}],
            },
            sort_keys=True,
        ).encode()
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        status, headers, body = self._request(
            "PUT", f"/v2/{repository}/manifests/{tag}", manifest, {"Content-Type": MANIFEST}
        )
        if status != 201 or headers.get("Docker-Content-Digest") != digest:
            raise LocalEnvError(f"manifest of {image.ref}: HTTP {status} {headers} {body[:500]!r}")
        return f"{self.host}/{repository}@{digest}"

    def manifest_digest(self, reference: str) -> str:
        """The digest of the manifest `reference` (<host>/<repository>:<tag>) names in the registry."""
        repository, tag = reference.removeprefix(f"{self.host}/").rsplit(":", 1)
        status, headers, body = self._request("HEAD", f"/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST})
        if status != 200:
            raise LocalEnvError(f"{reference}: HTTP {status} {body[:500]!r}")
        return headers["Docker-Content-Digest"]

    def _put_blob(self, repository: str, digest: str, data: bytes | IO[bytes], size: int) -> None:
        """A monolithic blob upload: POST opens the upload, PUT with the digest sends and closes it."""
        status, _, _ = self._request("HEAD", f"/v2/{repository}/blobs/{digest}")
        if status == 200:
            return
        status, headers, body = self._request("POST", f"/v2/{repository}/blobs/uploads/")
        if status != 202:
            raise LocalEnvError(f"starting the upload of {digest} to {repository}: HTTP {status} {body[:500]!r}")
        location = urllib.parse.urlsplit(headers["Location"])
        query = f"{location.query}&" if location.query else ""
        target = f"{location.path}?{query}digest={urllib.parse.quote(digest)}"
        status, _, body = self._request(
            "PUT", target, data, {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        )
        if status != 201:
            raise LocalEnvError(f"uploading {digest} to {repository}: HTTP {status} {body[:500]!r}")

    def _request(
        self, method: str, path: str, body: bytes | IO[bytes] | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        # Large blocks: a layer of hundreds of MiB streams in seconds, not in 8 KiB writes.
        conn = http.client.HTTPConnection(self.host, timeout=120, blocksize=1 << 20)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.headers), response.read()
        finally:
            conn.close()

    def _ready(self) -> bool:
        if not self.process.alive():
            raise ProcessExited(f"the registry exited with {self.process.popen.returncode}, see {self.process.log}")
        status, _, _ = self._request("GET", "/v2/")
        return status == 200


def _member(archive: tarfile.TarFile, name: str) -> IO[bytes]:
    extracted = archive.extractfile(name)
    if extracted is None:
        raise LocalEnvError(f"{archive.name!r}: {name} is not a file")
    return extracted
