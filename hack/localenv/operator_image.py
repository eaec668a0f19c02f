"""The operator image, built locally because there is no registry: `localhost/checkpointer/operator:dev`.

It holds what the Containerfile puts in its image, made without a container engine on the host: a
Debian bookworm rootfs (debootstrap from the machine's own Debian mirror, apt_mirror.py; python3
3.11, python3-venv, util-linux for nsenter; neither podman nor CRIU, since the agent uses the
node's), with the project in a venv at /opt/checkpointer, packed as a one-layer docker-archive for
`podman load` (images.write_docker_archive).

Two cached stages:
- the base rootfs, CACHE/rootfs/operator-bookworm-<key>: debootstrap, a few minutes once, keyed by
  the suite and the packages; hack/install.sh prepares it (`python -m localenv.operator_image --base`);
- the image, CACHE/images/operator-dev-<key>.tar: under a minute, keyed by pyproject.toml, the
  files under operator/, this file and the dependency versions of .venv; built on first use by the
  test that runs it, so that editing the operator does not slow down every hack/install.sh.

The dependencies are the versions installed in the venv that runs this (`pip freeze` as pip
constraints), so the image runs what the tests run on the host. `pip wheel` runs on the host, where
PyPI is reachable; the host (Debian 12, CPython 3.11) and bookworm share glibc and the wheel tags,
so the venv in the rootfs is made in a chroot by `pip install --no-index` from those wheels, without
network access.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from localenv.apt_mirror import debian_mirror
from localenv.images import Image, write_docker_archive
from localenv.nodes import NODE_PATH
from localenv.procs import CACHE, REPO_ROOT, LocalEnvError, run

IMAGE = "localhost/checkpointer/operator:dev"
SUITE = "bookworm"
# util-linux: nsenter (the CLI adapter). ca-certificates: https S3 endpoints, as in python:3.11-slim.
PACKAGES = ("python3", "python3-venv", "util-linux", "ca-certificates")
VENV = "/opt/checkpointer"
# The Containerfile's ENV, USER and ENTRYPOINT. The agent's pod runs it as root (the chart's
# securityContext), the controller as this user.
CONFIG: dict[str, object] = {
    "Entrypoint": ["checkpointer"],
    "Cmd": ["--help"],
    "Env": [f"PATH={VENV}/bin:{NODE_PATH}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"],
    "User": "65532:65532",
}
# Directories whose contents never belong in an image (the runtime mounts them); kept empty.
EMPTY_DIRS = frozenset({"dev", "proc", "sys", "run", "tmp"})
# Removed from the base rootfs to keep the image small (as Debian's -slim images do).
TRIM = ("usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt", "var/lib/apt/lists", "var/log")
# Environment of the commands run in the chroot: nothing of the host's (PIP_*, proxies, venvs).
CHROOT_ENV = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def base_rootfs() -> Path:
    """The cached bookworm rootfs with python3 (debootstrap on first use, a few minutes)."""
    rootfs = _base_path()
    if (rootfs / ".complete").exists():
        return rootfs
    with _lock():
        if (rootfs / ".complete").exists():
            return rootfs
        debootstrap = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
        if debootstrap is None:
            raise LocalEnvError("debootstrap is not installed: run hack/install.sh")
        shutil.rmtree(rootfs, ignore_errors=True)
        partial = rootfs.with_name(rootfs.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        include = ",".join(PACKAGES)
        mirror = debian_mirror()
        run([debootstrap, "--variant=minbase", f"--include={include}", SUITE, partial, mirror], timeout=1800)
        for rel in TRIM:
            for entry in (partial / rel).glob("*"):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        # Documentation goes too, except the licences.
        for path in sorted((partial / "usr/share/doc").rglob("*"), reverse=True):
            if path.name != "copyright" and not path.is_dir():
                path.unlink()
            elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()
        # debootstrap copies the host's resolv.conf and hostname; the runtime provides both.
        for name in ("etc/resolv.conf", "etc/hostname"):
            (partial / name).unlink(missing_ok=True)
        (partial / ".complete").touch()
        partial.rename(rootfs)
    return rootfs


def operator_image() -> Image:
    """The cached image archive for the current sources; builds it (under a minute) when missing."""
    base = base_rootfs()
    constraints = _constraints()
    # Read once: the key and the wheel come from the same bytes even while the tree is being edited.
    sources = {str(path.relative_to(REPO_ROOT)): path.read_bytes() for path in _source_files()}
    key_hash = hashlib.sha256()
    key_hash.update(json.dumps({"image": IMAGE, "config": CONFIG, "base": base.name}).encode())
    key_hash.update(Path(__file__).read_bytes())
    key_hash.update(constraints.encode())
    for rel, data in sources.items():
        key_hash.update(rel.encode() + b"\0" + data + b"\0")
    key = key_hash.hexdigest()[:16]
    archive = CACHE / "images" / f"operator-dev-{key}.tar"
    id_file = archive.with_suffix(".id")
    if archive.exists() and id_file.exists():
        return Image(IMAGE, archive, id_file.read_text().strip())
    with _lock():
        if not (archive.exists() and id_file.exists()):
            archive.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=archive.parent, prefix="operator-build-") as tmp:
                _build(Path(tmp), base, sources, constraints, archive)
            # Every edit of the operator makes a new archive (~360 MiB): keep this one and the one before.
            older = sorted(archive.parent.glob("operator-dev-*.tar"), key=lambda p: p.stat().st_mtime)[:-2]
            for old in older:
                old.with_suffix(".id").unlink(missing_ok=True)
                old.unlink(missing_ok=True)
    return Image(IMAGE, archive, id_file.read_text().strip())


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks (nothing once the base rootfs is cached)."""
    if (_base_path() / ".complete").exists():
        return []
    return [t for t in ("debootstrap",) if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None]


def _build(work: Path, base: Path, sources: dict[str, bytes], constraints: str, archive: Path) -> None:
    # The wheel is built from a copy of exactly the hashed files: pip builds in the source tree and
    # would leave build/ behind in the repository.
    src = work / "src"
    for rel, data in sources.items():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (work / "constraints.txt").write_text(constraints)
    rootfs = work / "rootfs"
    run(["cp", "-a", "--reflink=auto", base, rootfs], timeout=300)
    (rootfs / ".complete").unlink()
    wheels = rootfs / "tmp" / "wheels"
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "--quiet", "--wheel-dir", wheels, "--constraint", work / "constraints.txt", src], timeout=900)
    script = (
        f"python3 -m venv {VENV}"
        f" && {VENV}/bin/pip install --quiet --no-cache-dir --no-index --find-links /tmp/wheels checkpointer"
        f" && {VENV}/bin/checkpointer --help >/dev/null"
    )
    run(["chroot", rootfs, "/bin/sh", "-c", script], timeout=600, env=CHROOT_ENV)
    shutil.rmtree(wheels)
    shutil.rmtree(rootfs / "root" / ".cache", ignore_errors=True)
    layer = work / "layer.tar"
    _pack(rootfs, layer)
    write_docker_archive(archive, IMAGE, CONFIG, layer, created_by="hack/localenv/operator_image.py")


def _pack(rootfs: Path, layer: Path) -> None:
    """The rootfs as a layer tar: owners by number, hard links kept, runtime directories empty."""

    def member(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        top, _, rest = info.name.partition("/")
        if rest and top in EMPTY_DIRS:
            return None
        info.uname = info.gname = ""
        info.mtime = int(info.mtime)
        return info

    with tarfile.open(layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(os.listdir(rootfs)):
            if entry != ".complete":
                tar.add(rootfs / entry, arcname=entry, filter=member)


def _base_path() -> Path:
    describe = {"suite": SUITE, "packages": PACKAGES, "trim": TRIM}
    key = hashlib.sha256(json.dumps(describe).encode()).hexdigest()[:12]
    return CACHE / "rootfs" / f"operator-{SUITE}-{key}"


def _source_files() -> list[Path]:
    files = [REPO_ROOT / "pyproject.toml"]
    for path in sorted((REPO_ROOT / "operator").rglob("*")):
        rel = path.relative_to(REPO_ROOT / "operator")
        if path.is_file() and not any(p == "__pycache__" or p.endswith(".egg-info") for p in rel.parts):
            files.append(path)
    return files


def _constraints() -> str:
    """`pip freeze` of the running venv, minus checkpointer itself (installed editable or not)."""
    out = run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], timeout=120).stdout.decode()
    keep = []
    for line in out.splitlines():
        name = re.split(r"[=<>@ ;\[]", line.strip(), maxsplit=1)[0]
        if name and not line.startswith(("-", "#")) and name.lower() != "checkpointer":
            keep.append(line.strip())
    return "\n".join(sorted(keep)) + "\n"


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    """One build at a time on this machine (two test sessions may start together)."""
    path = CACHE / "operator-image.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localenv.operator_image", description=__doc__.split("\n")[0])
    parser.add_argument("--base", action="store_true", help="only the base rootfs (what hack/install.sh prepares)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.base:
        print(base_rootfs())
    else:
        image = operator_image()
        size = image.archive.stat().st_size / 2**20
        print(f"{image.ref} {image.archive} ({size:.0f} MiB, ID {image.image_id[:12]})")
    print(f"in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
