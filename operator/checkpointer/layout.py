"""Where archives and their manifests live in the bucket; what a manifest holds is archive/manifest.py's."""

from __future__ import annotations

import posixpath

from checkpointer.errors import Failure
from checkpointer.models import ArchiveRef, Compression, ContainerCheckpoint
from checkpointer.reasons import Reason

MANIFEST = "manifest.json"
# An archive encrypted in the age format (docs/api.md): `<container>.tar.zst.age`.
ENCRYPTED_SUFFIX = ".age"


def _join(*parts: str) -> str:
    return posixpath.join(*[p.strip("/") for p in parts if p.strip("/")])


def namespace_dir(prefix: str, namespace: str) -> str:
    """`<prefix>/<namespace>`: the folder that holds every archive of a namespace."""
    return _join(prefix, namespace)


def archive_dir(prefix: str, checkpoint: ContainerCheckpoint) -> str:
    """`<prefix>/<namespace>/<export.key>-<uid first 8>`, or `<prefix>/<namespace>/<name>-<uid first 8>`
    without export.key.

    export.key is relative to the namespace's folder, so that no checkpoint writes into another
    namespace's folder; the uid makes the folder the checkpoint's own, so that no two checkpoints
    given the same key (every run of a schedule, say) write, or delete, each other's archives
    (docs/api.md).
    """
    meta = checkpoint.metadata
    export = checkpoint.spec.export
    own = export.key if export and export.key else meta.name
    return _join(namespace_dir(prefix, meta.namespace), f"{own}-{meta.uid[:8]}")


def resolve_archive_key(prefix: str, namespace: str, ref: ArchiveRef, admins: frozenset[str]) -> str:
    """The full object key of a restore's archive: `<prefix>/<folder namespace>/<ref.key>`.

    The folder is the restore's own namespace's, or `ref.namespace` when the restore's namespace is
    an admin namespace; naming another namespace from any other fails with ArchiveNotPermitted.
    """
    owner = ref.namespace or namespace
    if owner != namespace and namespace not in admins:
        raise Failure(
            Reason.ARCHIVE_NOT_PERMITTED,
            f"a ContainerRestore in namespace {namespace} may read only its own namespace's archives; "
            f"remove archive.namespace (only an admin namespace may name another)",
        )
    return _join(namespace_dir(prefix, owner), ref.key)


def archive_key(directory: str, container: str, compression: Compression, encrypted: bool = False) -> str:
    """`<directory>/<container>.tar.zst`, and `.age` after it when the archive is encrypted."""
    return f"{directory}/{container}{compression.suffix}{ENCRYPTED_SUFFIX if encrypted else ''}"


# A streamed checkpoint's parts, each an object of its own while the archive is written, so that a
# restore may read them as they land (services/pipeline.py); composed into the archive and removed.
PART_INFIX = ".part-"


def part_key(key: str, number: int) -> str:
    """The object holding part `number` (from 1) of the archive `key` while it streams."""
    return f"{key}{PART_INFIX}{number:05d}"


def log_key(directory: str, container: str) -> str:
    return f"{directory}/{container}.criu-dump.log"


def uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def compression_of(key: str) -> Compression:
    key = key.removesuffix(ENCRYPTED_SUFFIX)
    for compression in (Compression.ZSTD, Compression.GZIP, Compression.NONE):
        if key.endswith(compression.suffix):
            return compression
    return Compression.NONE


def namespace_of_key(prefix: str, key: str) -> str | None:
    """The namespace whose folder holds `key` (`<prefix>/<namespace>/…`); None when none does. Pure."""
    base = prefix.strip("/")
    rest = key.removeprefix(base + "/") if base else key
    if base and rest == key:
        return None
    folder, sep, _ = rest.partition("/")
    return folder if sep and folder else None
