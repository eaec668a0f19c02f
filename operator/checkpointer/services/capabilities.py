"""What a node's CRIU, podman and CRI runtime can do, as its agent recorded it, and what the controller refuses.

At start each agent asks its node for the versions of CRIU, podman, runc and the kernel, for
CRIU's own feature checks (`criu check --feature`) and, when it has the node's CRI socket, for the CRI
runtime's name, version and whether it would checkpoint a container, and writes them as annotations on its Lease,
the one object it may write beside the objects of its node. The controller reads them when it
schedules a checkpoint that needs a feature, and fails it up front with CRIUFeatureMissing rather
than letting CRIU stop the container and fail. A node whose agent recorded nothing (yet) is not
refused: its agent's own check still names the missing feature after podman failed. Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from checkpointer import GROUP
from checkpointer.models import CheckpointSpec

# `criu check --feature NAME` for each name CRIU 4.2 knows; an older CRIU calls a newer name unknown
# and lands it among the missing ones.
CRIU_FEATURES = (
    "mem_dirty_track",
    "aio_remap",
    "timerfd",
    "tun_ns",
    "userns",
    "fdinfo_lock",
    "seccomp_suspend",
    "cgroupns",
    "tcp_half_closed",
    "compat_cr",
    "uffd",
    "uffd-noncoop",
    "can_map_vdso",
    "sk_ns",
    "sk_unix_file",
    "net_diag_raw",
    "link_nsid",
    "kcmp_epoll",
    "timens",
    "external_net_ns",
    "clone3_set_tid",
    "newifindex",
    "ns_pid",
    "apparmor_stacking",
    "network_lock_nftables",
    "sockopt_buf_lock",
    "memfd_hugetlb",
    "openat2",
    "get_rseq_conf",
    "ipv6_freebind",
    "pagemap_scan",
    "timer_cr_ids",
    "overlayfs_maps",
    "breakpoints",
)
# Pre-dumps, and dumps on top of one, need the kernel to track the pages written since.
DIRTY_TRACKING = "mem_dirty_track"
# CRIU before 4.2 reads SO_PASSCRED and SO_PASSSEC of every socket it dumps; since Linux 6.16 only
# AF_UNIX, AF_NETLINK and AF_BLUETOOTH sockets have them, so it cannot dump an inet socket there.
INET_SOCKETS_CRIU = (4, 2)
INET_SOCKETS_KERNEL = (6, 16)
# Podman before 5.8.2 copies a running container's root file system changes (leaveRunning with
# export) through the container's mount from the node's side, following the symlinks the container
# keeps swapping in meanwhile: the archive may then carry the node's files (CVE-2018-15664's class).
LIVE_EXPORT_PODMAN = (5, 8, 2)

PREFIX = f"{GROUP}/"
ANNOTATIONS = {
    "criu": PREFIX + "criu-version",
    "podman": PREFIX + "podman-version",
    "runc": PREFIX + "runc-version",
    "kernel": PREFIX + "kernel-version",
    "supported": PREFIX + "criu-features",
    "missing": PREFIX + "criu-features-missing",
}
# The node's CRI runtime, on the Lease of an agent that has its socket; an agent without one writes none.
CRI_ANNOTATIONS = {
    "runtime": PREFIX + "cri-runtime",
    "version": PREFIX + "cri-version",
    "api_version": PREFIX + "cri-api-version",
    "checkpoint": PREFIX + "cri-checkpoint",
    "refusal": PREFIX + "cri-checkpoint-refusal",
}


@dataclass(frozen=True)
class CriFacts:
    """The node's CRI runtime as its agent found it: what CRI Version answered, and whether the runtime
    would checkpoint a container (`refusal`: its own words when it would not)."""

    runtime: str
    version: str = ""
    api_version: str = ""
    checkpoint: bool = False
    refusal: str = ""

    def annotations(self) -> dict[str, str]:
        return {
            CRI_ANNOTATIONS["runtime"]: self.runtime,
            CRI_ANNOTATIONS["version"]: self.version,
            CRI_ANNOTATIONS["api_version"]: self.api_version,
            CRI_ANNOTATIONS["checkpoint"]: "true" if self.checkpoint else "false",
            CRI_ANNOTATIONS["refusal"]: "" if self.checkpoint else self.refusal,
        }

    @classmethod
    def from_annotations(cls, annotations: dict[str, str]) -> CriFacts | None:
        runtime = annotations.get(CRI_ANNOTATIONS["runtime"])
        if not runtime:
            return None
        return cls(
            runtime=runtime,
            version=annotations.get(CRI_ANNOTATIONS["version"], ""),
            api_version=annotations.get(CRI_ANNOTATIONS["api_version"], ""),
            checkpoint=annotations.get(CRI_ANNOTATIONS["checkpoint"]) == "true",
            refusal=annotations.get(CRI_ANNOTATIONS["refusal"], ""),
        )

    def describe(self) -> str:
        return f"{self.runtime} {self.version or '(unknown)'} (CRI {self.api_version or '(unknown)'})"


@dataclass(frozen=True)
class NodeFacts:
    """A node's versions ("" when unknown) and CRIU's verdict on each feature it was asked about."""

    criu: str = ""
    podman: str = ""
    runc: str = ""
    kernel: str = ""
    supported: frozenset[str] = frozenset()
    missing: frozenset[str] = frozenset()
    # None: the agent has no CRI socket, or its runtime did not answer.
    cri: CriFacts | None = None

    def annotations(self) -> dict[str, str]:
        return {
            **(self.cri.annotations() if self.cri is not None else {}),
            ANNOTATIONS["criu"]: self.criu,
            ANNOTATIONS["podman"]: self.podman,
            ANNOTATIONS["runc"]: self.runc,
            ANNOTATIONS["kernel"]: self.kernel,
            ANNOTATIONS["supported"]: ",".join(sorted(self.supported)),
            ANNOTATIONS["missing"]: ",".join(sorted(self.missing)),
        }

    @classmethod
    def from_annotations(cls, annotations: dict[str, str] | None) -> NodeFacts | None:
        """The facts an agent recorded; None when it recorded none."""
        found = {field: (annotations or {}).get(key) for field, key in ANNOTATIONS.items()}
        cri = CriFacts.from_annotations(annotations or {})
        if all(value is None for value in found.values()) and cri is None:
            return None

        def names(value: str | None) -> frozenset[str]:
            return frozenset(name for name in (value or "").split(",") if name)

        return cls(
            criu=found["criu"] or "",
            podman=found["podman"] or "",
            runc=found["runc"] or "",
            kernel=found["kernel"] or "",
            supported=names(found["supported"]),
            missing=names(found["missing"]),
            cri=cri,
        )

    def describe(self) -> str:
        def say(name: str, version: str) -> str:
            return f"{name} {version or '(unknown)'}"

        said = [say("CRIU", self.criu), say("podman", self.podman), say("runc", self.runc), say("Linux", self.kernel)]
        return ", ".join(said + ([self.cri.describe()] if self.cri is not None else []))


def version_of(text: str) -> tuple[int, ...] | None:
    """The leading numbers of a version ("4.2.1" -> (4, 2, 1), "6.18.0-1-amd64" -> (6, 18, 0))."""
    found = re.match(r"\s*v?(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in found.group(1).split(".")) if found else None


def dumps_inet_sockets(facts: NodeFacts) -> bool | None:
    """Whether the node's CRIU can dump TCP sockets on its kernel; None when the versions are unknown."""
    criu, kernel = version_of(facts.criu), version_of(facts.kernel)
    if criu is None or kernel is None:
        return None
    return not (criu[:2] < INET_SOCKETS_CRIU and kernel[:2] >= INET_SOCKETS_KERNEL)


def missing_for_checkpoint(spec: CheckpointSpec, node: str, facts: NodeFacts | None) -> str | None:
    """Why the node cannot take this checkpoint, for a CRIUFeatureMissing message; None: no known reason."""
    if facts is None:
        return None
    if spec.tcp_established and dumps_inet_sockets(facts) is False:
        return (
            f"node {node} cannot checkpoint established TCP connections (tcpEstablished): its CRIU "
            f"{facts.criu} cannot dump inet sockets on Linux {facts.kernel} (CRIU "
            f"{'.'.join(map(str, INET_SOCKETS_CRIU))} or newer can on Linux "
            f"{'.'.join(map(str, INET_SOCKETS_KERNEL))} and newer); the node runs {facts.describe()}"
        )
    if (spec.pre_checkpoint or spec.with_previous) and DIRTY_TRACKING in facts.missing:
        what = "preCheckpoint" if spec.pre_checkpoint else "withPrevious"
        return (
            f"node {node} cannot take a {what} checkpoint: CRIU's check reports no memory dirty "
            f"tracking ({DIRTY_TRACKING}) on its kernel; the node runs {facts.describe()}"
        )
    return None


def live_export_refusal(spec: CheckpointSpec, node: str, podman: str, *, admin: bool) -> str | None:
    """Why the node may not export this checkpoint of a running container, for a LiveExportNotPermitted
    message; None: it may. `podman` is the node's podman version; an unknown one ("") is refused, so
    the controller asks only when the agent recorded it, and the agent always asks with its own."""
    if admin or not (spec.leave_running and spec.export is not None) or spec.ignore_rootfs:
        return None
    version = version_of(podman)
    if version is not None and version >= LIVE_EXPORT_PODMAN:
        return None
    least = ".".join(map(str, LIVE_EXPORT_PODMAN))
    return (
        f"node {node} runs podman {podman or '(unknown)'}: before {least}, podman copies a running "
        "container's root file system changes (leaveRunning with export) from the node's side and "
        "follows symlinks the container swaps in meanwhile, so the archive could carry the node's files; "
        f"only an admin namespace may export a running container there. Drop leaveRunning, set ignoreRootfs, "
        f"or run podman {least} or later on the node; nothing was checkpointed and the container keeps running"
    )


def missing_for_pod_checkpoint(facts: NodeFacts | None, node: str) -> str | None:
    """Why the node cannot checkpoint a Pod's container, for a RuntimeCannotCheckpoint message; None: no
    known reason. A node whose agent recorded no CRI runtime (none yet, one that did not answer, or an
    agent without the socket) is not refused here: the agent's own call then says why."""
    if facts is None or facts.cri is None or facts.cri.checkpoint:
        return None
    cri = facts.cri
    return (
        f"node {node} cannot checkpoint a Pod's container: its container runtime, {cri.describe()}, "
        f"{'said: ' + cri.refusal if cri.refusal else 'does not checkpoint containers'}; "
        f"the node runs {facts.describe()}. Nothing was checkpointed and the container keeps running"
    )
