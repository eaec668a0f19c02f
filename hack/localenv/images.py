"""Workload images made locally (there is no registry) and loaded into every node.

Each image is a single-layer rootfs tar wrapped in a docker-archive and loaded with `podman load`.
Not `podman import`: import stamps the image config with the current time, so every node would get
a different image ID for the same rootfs, and `podman container restore --import` on another node
then fails with `creating container storage: reading image "<id>": ... image not known`. Here every
byte is fixed (tar mtimes, owners, the config's `created`), so the image ID is the same on every
node and in every run, and the archives are cached under CACHE/images keyed by their inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from localenv.cluster import Node
from localenv.nodes import NodeSandbox
from localenv.procs import CACHE, REPO_ROOT, LocalEnvError, run

COUNTER = "localhost/checkpointer/counter:latest"
MEMORY = "localhost/checkpointer/memory:latest"
TCP = "localhost/checkpointer/tcp:latest"
# Whose a container is: only ContainerCheckpoints of that namespace may take it (docs/api.md).
NAMESPACE_LABEL = "checkpointer.dev/namespace"


def owned_by(namespace: str) -> tuple[str, str]:
    """`podman run` arguments that give a container to `namespace`."""
    return ("--label", f"{NAMESPACE_LABEL}={namespace}")


# Bump when the archive layout below changes, so that cached archives are rebuilt.
FORMAT = "docker-archive-v1"
EPOCH = "1970-01-01T00:00:00Z"

# The count lives in this shell's memory, so after a restore it continues and after a restart it
# begins at 1 again. /tmp/count lets `podman exec` read it; stdout carries it into the logs.
COUNTER_SH = """\
#!/bin/sh
trap 'exit 0' TERM INT
i=0
while :; do
  i=$((i + 1))
  echo "$i"
  echo "$i" >/tmp/count
  sleep 0.2
done
"""


@dataclass(frozen=True)
class Image:
    ref: str
    archive: Path  # docker-archive, for `podman load`
    image_id: str  # sha256 hex of the config, the ID podman reports


@dataclass(frozen=True)
class ImageFile:
    path: str  # inside the image, no leading slash
    mode: int
    data: bytes = b""
    link: str = ""  # symlink target when set
    is_dir: bool = False


def counter_image(rootfs: Path) -> Image:
    """busybox-static from the node rootfs plus the counter script; CMD prints 1, 2, 3, ..."""
    busybox = (rootfs / "bin/busybox").read_bytes()
    files = [
        *image_dirs("bin", "dev", "etc", "proc", "sys"),
        ImageFile("tmp", 0o1777, is_dir=True),
        ImageFile("bin/busybox", 0o755, busybox),
        *(ImageFile(f"bin/{applet}", 0o777, link="busybox") for applet in ("sh", "cat", "echo", "sleep", "ls", "ps")),
        ImageFile("bin/counter", 0o755, COUNTER_SH.encode()),
    ]
    return build_image(COUNTER, {"Cmd": ["/bin/counter"], "Env": ["PATH=/bin"]}, files_key(files), lambda: files)


def memory_image() -> Image:
    """hack/images/memory.c, static; `podman run IMAGE 256` holds 256 MiB (default 64)."""
    return _static_c_image(MEMORY, "memory", {"Entrypoint": ["/memory"], "Cmd": ["64"], "Env": ["PATH=/"]})


def tcp_image(rootfs: Path) -> Image:
    """hack/images/tcp.c, static: a busy established TCP connection to itself on 127.0.0.1.

    busybox's `cat` comes along so that `read_count` can `podman exec` it.
    """
    busybox = (rootfs / "bin/busybox").read_bytes()
    extra = [*image_dirs("bin"), ImageFile("bin/busybox", 0o755, busybox), ImageFile("bin/cat", 0o777, link="busybox")]
    return _static_c_image(TCP, "tcp", {"Entrypoint": ["/tcp"], "Env": ["PATH=/bin:/"]}, extra)


def _static_c_image(ref: str, program: str, config: dict[str, object], extra: Sequence[ImageFile] = ()) -> Image:
    """hack/images/<program>.c built with `gcc -static` as /<program>, plus `extra` files."""
    source = REPO_ROOT / f"hack/images/{program}.c"
    gcc = ["gcc", "-static", "-O2", "-Wall", "-Werror"]

    def files() -> list[ImageFile]:
        with tempfile.TemporaryDirectory() as tmp:
            binary = Path(tmp) / program
            run([*gcc, "-o", binary, source])
            return [
                *image_dirs("dev", "etc", "proc", "sys"),
                ImageFile("tmp", 0o1777, is_dir=True),
                ImageFile(program, 0o755, binary.read_bytes()),
                *extra,
            ]

    # Keyed by the source, not the compiled bytes, so that a cached archive needs no compiler.
    key = source.read_bytes() + repr(gcc).encode() + (files_key(list(extra)) if extra else b"")
    return build_image(ref, config, key, files)


def workload_images(rootfs: Path) -> list[Image]:
    return [counter_image(rootfs), memory_image(), tcp_image(rootfs)]


def load_images(nodes: Iterable[NodeSandbox], images: Sequence[Image]) -> None:
    for node in nodes:
        for image in images:
            node.load_image(image.archive)
            got = node.podman("image", "inspect", "--format", "{{.Id}}", image.ref).stdout.decode().strip()
            if got != image.image_id:
                raise LocalEnvError(f"{node.name}: {image.ref} has ID {got}, expected {image.image_id}")


def read_count(node: Node, container: str, timeout: float = 10) -> int:
    """The current count of a running counter container."""
    deadline = time.monotonic() + timeout
    while True:
        out = node.podman("exec", container, "cat", "/tmp/count", check=False, timeout=timeout)
        text = out.stdout.decode().strip()
        # The file is empty for an instant while the shell rewrites it.
        if out.returncode == 0 and text.isdigit():
            return int(text)
        if time.monotonic() > deadline:
            raise LocalEnvError(f"{node.name}: no count from {container}: {out.stderr.decode(errors='replace')}")
        time.sleep(0.05)


def wait_for_log(node: Node, container: str, text: str, timeout: float = 60) -> str:
    """Wait until `text` appears in the container's output; returns the output."""
    deadline = time.monotonic() + timeout
    while True:
        out = node.podman("logs", container, check=False)
        logs = (out.stdout + out.stderr).decode(errors="replace")
        if text in logs:
            return logs
        if time.monotonic() > deadline:
            raise LocalEnvError(f"{node.name}: {container} did not print {text!r} in {timeout}s; output:\n{logs}")
        time.sleep(0.1)


def image_dirs(*paths: str) -> list[ImageFile]:
    return [ImageFile(p, 0o755, is_dir=True) for p in paths]


def files_key(files: list[ImageFile]) -> bytes:
    h = hashlib.sha256()
    for f in files:
        h.update(repr((f.path, f.mode, f.link, f.is_dir)).encode() + hashlib.sha256(f.data).digest())
    return h.digest()


def build_image(
    ref: str, config: dict[str, object], key_inputs: bytes, make_files: Callable[[], list[ImageFile]]
) -> Image:
    """The cached archive for these inputs; `make_files` runs only when there is none yet."""
    describe = {"format": FORMAT, "ref": ref, "config": config, "arch": _arch()}
    h = hashlib.sha256(json.dumps(describe, sort_keys=True).encode() + key_inputs)
    key = h.hexdigest()[:16]
    name = ref.split("/")[-1].replace(":", "-")
    archive = CACHE / "images" / f"{name}-{key}.tar"
    id_file = archive.with_suffix(".id")
    if archive.exists() and id_file.exists():
        return Image(ref, archive, id_file.read_text().strip())

    layer = _tar([(f, f.data) for f in make_files()])
    return Image(ref, archive, write_docker_archive(archive, ref, config, layer))


def write_docker_archive(
    archive: Path,
    ref: str,
    config: dict[str, object],
    layer: bytes | Path,
    created_by: str = "hack/localenv/images.py",
) -> str:
    """Wrap one layer tar into a docker-archive at `archive`; returns the image ID.

    `layer` is the tar itself or a file holding it (streamed, never read into memory whole). The
    archive is written atomically, then its ID to `<archive>.id`, the cache's mark of a finished
    archive. Every byte follows from the inputs.
    """
    if isinstance(layer, bytes):
        diff_id = hashlib.sha256(layer).hexdigest()
    else:
        with layer.open("rb") as f:
            diff_id = hashlib.file_digest(f, "sha256").hexdigest()
    image_config = json.dumps(
        {
            "architecture": _arch(),
            "os": "linux",
            "created": EPOCH,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [{"created": EPOCH, "created_by": created_by}],
        },
        sort_keys=True,
    ).encode()
    image_id = hashlib.sha256(image_config).hexdigest()
    manifest = json.dumps([{"Config": f"{image_id}.json", "RepoTags": [ref], "Layers": [f"{diff_id}.tar"]}]).encode()
    entries: list[tuple[str, bytes | Path]] = [
        (f"{image_id}.json", image_config),
        (f"{diff_id}.tar", layer),
        ("manifest.json", manifest),
    ]
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_suffix(".tmp")
    # The same member headers as _tar, so archives of in-memory layers keep their bytes.
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if isinstance(data, bytes):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                info.size = data.stat().st_size
                with data.open("rb") as f:
                    tar.addfile(info, f)
    tmp.replace(archive)
    archive.with_suffix(".id").write_text(image_id + "\n")
    return image_id


def _tar(entries: list[tuple[ImageFile, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f, data in sorted(entries, key=lambda e: e[0].path):
            info = tarfile.TarInfo(f.path)
            info.mode = f.mode
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if f.is_dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif f.link:
                info.type = tarfile.SYMTYPE
                info.linkname = f.link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
