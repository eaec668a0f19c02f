"""What an archive asks for that only a restore in an admin namespace may get, and what no restore may.

Podman builds a restored container from the archive itself: its container configuration
(`config.dump`) and the OCI runtime spec it runs (`spec.dump`, which replaces the one inside
config.dump; both are judged). An archive that podman made from an ordinary container asks for
nothing here. One made from a privileged container, or written by hand, may ask for the host:
privileged mode, capabilities beyond podman's default set, the host's PID, IPC, network or mount
namespace, host paths mounted in, or host paths podman itself writes to or runs (docs/security.md).

What podman unpacks on the node (the archive, and the tars inside it: rootfs-diff.tar into the
container's root file system) may carry nothing that writes or reads outside the tree it is unpacked
into, whoever restores it: podman before 5.8.2 follows symlinks while it unpacks (the class of
CVE-2018-15664), so one member swapped for a symlink to / would let the next write the node.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Iterator, Set
from pathlib import Path
from typing import Any

from checkpointer.archive.codec import ContainerConfiguration, CorruptArchive, Member, unpacked_members
from checkpointer.errors import Failure
from checkpointer.reasons import Reason
from checkpointer.services.node import NAMESPACE_LABEL

# Podman's default_capabilities (containers.conf of containers-common, podman 4 and 5): what a
# container gets without --cap-add or --privileged.
DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT",
    }
)
# A container missing one of these namespaces in its spec runs in the host's.
HOST_NAMESPACES = {"pid": "PID", "ipc": "IPC", "network": "network", "mount": "mount"}
# Where podman keeps the network namespaces it creates; a restore makes a new one.
PODMAN_NETNS_DIRS = ("/run/netns/", "/var/run/netns/")
# Podman's rootful storage (graphroot and runroot) and the per-container files it bind-mounts itself.
PODMAN_STORAGE = ("/var/lib/containers/storage", "/run/containers/storage")
PODMAN_MOUNTS = {
    "/etc/hosts": "hosts",
    "/etc/resolv.conf": "resolv.conf",
    "/etc/hostname": "hostname",
    "/run/.containerenv": ".containerenv",
    "/dev/shm": "shm",
}
# Host paths in config.dump that podman writes to on the restoring node, with the file podman itself
# would use there. conmon writes the container's output to logPath and PIDs to the pid files; podman
# mounts a tmpfs at ShmDir.
PODMAN_FILES = {
    "logPath": "ctr.log",
    "conmonPidFile": "conmon.pid",
    "pid_file": "pidfile",
    "ShmDir": "shm",
    "secretsPath": "secrets",
}
# The symlink members held while an archive's members are judged, each a path of at most 4 KiB (a
# longer one needs a pax header, and those are bounded): the one set the judgement keeps in memory.
SYMLINKS_LIMIT = 65536
# The paths of deleted.files held until every symlink member of rootfs-diff.tar is known.
DELETED_LIMIT = 65536
ROOTFS_DIFF = "rootfs-diff.tar"
_VOLUME_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*")
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


def not_permitted(archive: ContainerConfiguration) -> list[str]:
    """What the archive asks for that a restore outside an admin namespace may not get, each once,
    in a stable order; empty when nothing."""
    config = archive.config
    container_id = _str(config.get("id"))
    volumes = {
        _str(v.get("dest")): _str(v.get("volumeName")) for v in _list(config.get("namedVolumes")) if isinstance(v, dict)
    }
    found: list[str] = []
    for item in _from_config(config, container_id):
        if item not in found:
            found.append(item)
    for spec in (archive.spec, config.get("spec")):
        if not isinstance(spec, dict):
            continue
        for item in _from_spec(spec, container_id, volumes):
            if item not in found:
                found.append(item)
    return found


def foreign_owner(archive: ContainerConfiguration, namespace: str) -> list[str]:
    """The restored container keeps the labels in its archive: one labelled for another namespace
    would become that namespace's container, which its checkpoints could then take."""
    labels = _dict(archive.config.get("labels"))
    owner = _str(labels.get(NAMESPACE_LABEL))
    if owner and owner != namespace:
        return [f"a container of namespace {owner} (label {NAMESPACE_LABEL}={owner})"]
    return []


def _from_config(config: dict[str, Any], container_id: str) -> Iterator[str]:
    if config.get("privileged") is True:
        yield "privileged mode"
    if config.get("mountAllDevices") is True:
        yield "all host devices"
    if _list(config.get("exitCommand")):
        yield "a command run on the host when it exits (exitCommand)"
    if _str(config.get("rootfs")):
        yield f"the host path {_str(config.get('rootfs'))} as its root filesystem"
    runtime = _str(config.get("runtime"))
    if "/" in runtime:
        yield f"the runtime binary {runtime}"
    for key, name in PODMAN_FILES.items():
        path = _str(config.get(key))
        if path and not _podman_file(path, container_id, name):
            yield f"host path {path} as its {key}"
    for key, value in config.items():
        if key.endswith("NsCtr") and _str(value):
            yield f"the {key.removesuffix('NsCtr')} namespace of container {_str(value)}"


def _from_spec(spec: dict[str, Any], container_id: str, volumes: dict[str, str]) -> Iterator[str]:
    process = _dict(spec.get("process"))
    linux = _dict(spec.get("linux"))
    capabilities = _dict(process.get("capabilities"))
    asked = {_capability(c) for kind in capabilities.values() for c in _list(kind)}
    extra = sorted(asked - DEFAULT_CAPABILITIES)
    if extra:
        yield "capabilities " + ", ".join(extra)

    namespaces = {
        _str(n.get("type")): _str(n.get("path")) for n in _list(linux.get("namespaces")) if isinstance(n, dict)
    }
    for kind, label in HOST_NAMESPACES.items():
        if kind not in namespaces:
            yield f"the host's {label} namespace"
        elif namespaces[kind] and not (kind == "network" and namespaces[kind].startswith(PODMAN_NETNS_DIRS)):
            yield f"the {label} namespace at {namespaces[kind]}"

    for mount in _list(spec.get("mounts")):
        if not isinstance(mount, dict):
            continue
        source = _str(mount.get("source"))
        destination = _str(mount.get("destination"))
        options = {_str(o) for o in _list(mount.get("options"))}
        bind = _str(mount.get("type")) == "bind" or bool(options & {"bind", "rbind"})
        if (bind or source.startswith("/")) and not _podman_mount(source, destination, container_id, volumes):
            yield f"host path {source or '(none)'} mounted at {destination}"
        if _str(mount.get("type")) in ("sysfs", "cgroup", "cgroup2") and "ro" not in options:
            yield f"a writable {destination}"

    if not _list(linux.get("maskedPaths")) or not _list(linux.get("readonlyPaths")):
        yield "unmasked /proc and /sys paths"
    if "seccomp" not in linux:
        yield "no seccomp filter"
    devices = [_str(d.get("path")) for d in _list(linux.get("devices")) if isinstance(d, dict)]
    if devices:
        shown = ", ".join(devices[:5]) + (f" and {len(devices) - 5} more" if len(devices) > 5 else "")
        yield f"host devices {shown}"
    for rule in _list(_dict(linux.get("resources")).get("devices")):
        if isinstance(rule, dict) and rule.get("allow") is True:
            yield "access to host devices"
            break
    if any(_list(hooks) for hooks in _dict(spec.get("hooks")).values()):
        yield "OCI hooks, which run on the host"


def _podman_file(path: str, container_id: str, name: str) -> bool:
    """Whether `path` is the file podman keeps for this container in its own storage."""
    return bool(_CONTAINER_ID.fullmatch(container_id)) and any(
        path == f"{root}/overlay-containers/{container_id}/userdata/{name}" for root in PODMAN_STORAGE
    )


def _podman_mount(source: str, destination: str, container_id: str, volumes: dict[str, str]) -> bool:
    destination = posixpath.normpath(destination) if destination else destination
    name = PODMAN_MOUNTS.get(destination)
    if name and _podman_file(source, container_id, name):
        return True
    volume = volumes.get(destination, "")
    return bool(_VOLUME_NAME.fullmatch(volume)) and source == f"{PODMAN_STORAGE[0]}/volumes/{volume}/_data"


def _capability(name: Any) -> str:
    upper = _str(name).upper()
    return upper if upper.startswith("CAP_") else "CAP_" + upper


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def require_safe_unpacking(path: Path) -> None:
    """Refuses, for every restore, an archive whose unpacking could reach outside the container:
    ArchiveNotPermitted naming the member, or ArchiveCorrupt when it cannot be read within bounds."""
    try:
        why = unpacking_refusal(unpacked_members(path))
    except CorruptArchive as e:
        raise Failure(Reason.ARCHIVE_CORRUPT, f"{e}; nothing was restored") from None
    if why is not None:
        raise not_unpackable(why)


def unpacking_refusal(members: Iterable[Member]) -> str | None:
    """The first member podman's unpacking could write or read the node through; None when none.

    Refused: absolute paths, `..` components, device files, hard links to an absolute path, out of
    the tree or below a symlink, and any member below a symlink member of the same tar; in the
    archive itself, a tar podman unpacks that is not a regular file; in deleted.files (whose paths
    are absolute, under the container's root), `..` or a path below a symlink member of
    rootfs-diff.tar. Raises CorruptArchive past SYMLINKS_LIMIT symlink members or DELETED_LIMIT paths.
    """
    judge = UnpackingJudge()
    for member in members:
        why = judge.member(member)
        if why is not None:
            return why
    return judge.finish()


class UnpackingJudge:
    """unpacking_refusal one member at a time, for an archive judged while it streams: each member
    is judged before its bytes go on to podman, and `finish` judges what only the whole can tell
    (deleted.files against the symlinks of rootfs-diff.tar, which podman applies after unpacking)."""

    def __init__(self) -> None:
        self.symlinks: set[tuple[str, str]] = set()
        self.deleted: list[str] = []

    def member(self, member: Member) -> str | None:
        if member.kind == "deleted":
            if ".." in member.name.split("/"):
                return f"{member.tar} path {member.name!r}, a path with '..'"
            if len(self.deleted) >= DELETED_LIMIT:
                raise CorruptArchive(f"the archive's {member.tar} lists more than {DELETED_LIMIT} paths")
            self.deleted.append(member.name)
            return None
        why = member_refusal(member, self.symlinks)
        if why is not None:
            return why
        if member.kind == "symlink":
            if len(self.symlinks) >= SYMLINKS_LIMIT:
                raise CorruptArchive(f"the archive holds more than {SYMLINKS_LIMIT} symlinks")
            self.symlinks.add((member.tar, _tree_path(member.name)))
        return None

    def finish(self) -> str | None:
        # Podman removes them after it unpacked rootfs-diff.tar, whose symlinks then stand above them.
        for path in self.deleted:
            link = _symlink_above(ROOTFS_DIFF, _tree_path(path), self.symlinks)
            if link is not None:
                return f"deleted.files path {path!r}, below {ROOTFS_DIFF} symlink member {link!r}"
        return None


def not_unpackable(why: str) -> Failure:
    return Failure(
        Reason.ARCHIVE_NOT_PERMITTED,
        f"the archive holds {why}: podman would unpack it outside the container on the node; no "
        "restore may restore it, in any namespace; nothing was restored",
    )


def member_refusal(member: Member, symlinks: Set[tuple[str, str]]) -> str | None:
    """Why podman may not unpack this member, given the symlink members (tar, path) before it; None: it may."""
    where = f"{member.tar} member {member.name!r}" if member.tar else f"member {member.name!r}"
    if member.name.startswith("/"):
        return f"{where}, an absolute path"
    if ".." in member.name.split("/"):
        return f"{where}, a path with '..'"
    if member.kind in ("char", "block"):
        return f"{where}, a {member.kind} device"
    path = _tree_path(member.name)
    if not member.tar and path.endswith(".tar") and member.kind != "file":
        return f"{where}, a tar podman unpacks that is a {member.kind}, not a file"
    link = _symlink_above(member.tar, path, symlinks)
    if link is not None:
        return f"{where}, below symlink member {link!r}"
    if member.kind == "hardlink":
        if member.link.startswith("/") or ".." in member.link.split("/"):
            return f"{where}, a hard link to {member.link!r} outside the tree"
        link = _symlink_above(member.tar, _tree_path(member.link), symlinks)
        if link is not None:
            return f"{where}, a hard link to {member.link!r} below symlink member {link!r}"
    return None


def _tree_path(name: str) -> str:
    """A member's path in the tree it is unpacked into: "./a//b/" is "a/b", "." is ""."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _symlink_above(tar: str, path: str, symlinks: Set[tuple[str, str]]) -> str | None:
    """The symlink member of `tar` that `path` lies below, if any. A hard link to the symlink itself
    links the symlink, not what it points to."""
    parts = path.split("/")
    for end in range(1, len(parts)):
        above = "/".join(parts[:end])
        if (tar, above) in symlinks:
            return above
    return None
