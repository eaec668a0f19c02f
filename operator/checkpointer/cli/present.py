"""What the plugin shows people: sizes, rates, ages, progress and manifests. Pure functions: no I/O.

Names, keys, messages and manifests come from what tenants wrote (or a bucket holds): every such
text goes out through `printable`, so it neither starts a line nor moves the terminal's cursor. The
consoles print no rich markup (commands.py), so a '[' in a name is printed as it is.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from checkpointer.archive.manifest import ALGORITHM, SIGNATURE, Untrusted, verify
from checkpointer.conditions import parse_time
from checkpointer.logs import escaped
from checkpointer.models import ObjectStatus
from checkpointer.reasons import FINISHED, ConditionType

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
# The rate is over the last few seconds: the agent writes progress at most once a second.
RATE_WINDOW = 5.0


def printable(value: object) -> str:
    """`value` as text on one line: control characters and line separators as escapes (`\\n`, `\\x1b`)."""
    return escaped(str(value))


def size(n: int | float | None) -> str:
    """Bytes for people, in powers of 1024: `512 B`, `1.5 KiB`, `1.0 GiB`."""
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def rate(bytes_per_second: float | None) -> str:
    return "-" if bytes_per_second is None else f"{size(bytes_per_second)}/s"


def duration(seconds: float | None) -> str:
    """`45s`, `3m20s`, `2h05m`, `3d4h`: as kubectl shows ages."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def age(text: str | None, now: datetime.datetime) -> str:
    when = parse_time(text)
    return "-" if when is None else duration((now - when).total_seconds())


def without_managed_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The object as `kubectl get -o yaml` prints it: without metadata.managedFields."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
    return {**obj, "metadata": meta} if "metadata" in obj else dict(obj)


# --- an object's state -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """Where an object stands: its phase, and the reason and message of its Ready condition."""

    phase: str
    reason: str
    message: str

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    @property
    def failed(self) -> bool:
        return self.phase == "Failed"

    def line(self, kind: str, name: str) -> str:
        text = f"{kind} {name}: {self.phase or 'Pending'}"
        if self.reason and self.reason != self.phase:
            text += f" ({self.reason})"
        return printable(f"{text}: {self.message}" if self.message else text)


def outcome(obj: Mapping[str, Any]) -> Outcome:
    status = ObjectStatus.of(obj)
    ready = status.condition(ConditionType.READY)
    return Outcome(status.phase or "", ready.reason if ready else "", ready.message if ready else "")


@dataclass
class Meter:
    """Bytes done over time: the rate over the last RATE_WINDOW seconds, and the time left."""

    samples: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, now: float, done: int) -> None:
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # a retried upload starts over
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW:
            self.samples.popleft()

    def rate(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 and d1 > d0 else None

    def eta(self, total: int | None) -> float | None:
        speed = self.rate()
        if total is None or not speed or not self.samples:
            return None
        return max(0.0, (total - self.samples[-1][1]) / speed)


@dataclass(frozen=True)
class Progress:
    """One line of `watch`: the phase, bytes done of the total when known, the rate and the time left."""

    phase: str
    done: int
    total: int | None
    rate: float | None
    eta: float | None

    def bytes_text(self) -> str:
        return f"{size(self.done)} of {size(self.total)}" if self.total else size(self.done)

    def text(self) -> str:
        parts = [self.phase or "Pending", self.bytes_text(), rate(self.rate), f"ETA {duration(self.eta)}"]
        return printable("  ".join(parts))


def progress(obj: Mapping[str, Any], meter: Meter, now: float) -> Progress:
    """The progress an object's status shows at `now`; feeds `meter`."""
    status = ObjectStatus.of(obj)
    done = status.progress.bytes_done if status.progress else 0
    total = (status.progress.bytes_total or None) if status.progress else None
    phase = status.phase or "Pending"
    if phase == "Succeeded" and total is None and done:
        total = done
    meter.add(now, done)
    return Progress(phase, done, total, meter.rate(), 0.0 if phase == "Succeeded" else meter.eta(total))


def migration_lines(obj: Mapping[str, Any]) -> list[str]:
    """What a finished ContainerMigration adds to its result line: the objects it made and the downtime."""
    if obj.get("kind") != "ContainerMigration":
        return []
    status = obj.get("status") or {}
    lines = []
    made = [
        f"{kind} {(status.get(ref) or {}).get('name')}"
        for kind, ref in (
            ("ContainerCheckpoint", "checkpointRef"),
            ("ContainerRestore", "restoreRef"),
            ("ContainerRestore", "fallbackRestoreRef"),
        )
        if status.get(ref)
    ]
    if made:
        lines.append(f"  made {', '.join(made)}")
    if status.get("downtimeSeconds") is not None:
        lines.append(
            f"  downtime {float(status['downtimeSeconds']):.2f}s: stopped on {status.get('sourceNodeName')} at "
            f"{status.get('frozenTime')}, running on {status.get('targetNodeName')} at {status.get('runningTime')}"
        )
    return [printable(line) for line in lines]


# --- manifests -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchiveRow:
    """One archive of one manifest, as `archives` lists it."""

    namespace: str
    checkpoint: str
    container: str
    node: str
    size: int | None
    completed: str
    key: str  # relative to the namespace's folder, as a ContainerRestore and `inspect` name it

    def cells(self, now: datetime.datetime) -> list[str]:
        cells = [self.namespace, self.checkpoint, self.container, self.node, size(self.size), age(self.completed, now)]
        return [printable(c) for c in cells]


def relative_key(key: str, prefix: str, namespace: str) -> str:
    """`key` relative to `<prefix>/<namespace>/`, as a restore names it (docs/api.md)."""
    folder = "/".join(p.strip("/") for p in (prefix, namespace) if p.strip("/"))
    return key.removeprefix(f"{folder}/")


def archive_rows(manifests: Iterable[Mapping[str, Any]], prefix: str) -> list[ArchiveRow]:
    """Every archive of every manifest, newest first."""
    rows = []
    for manifest in manifests:
        namespace = str(manifest.get("namespace") or "")
        for entry in manifest.get("archives") or []:
            rows.append(
                ArchiveRow(
                    namespace=namespace,
                    checkpoint=str(manifest.get("name") or ""),
                    container=str(entry.get("container") or ""),
                    node=str(manifest.get("nodeName") or ""),
                    size=entry.get("size"),
                    completed=str(manifest.get("completionTime") or ""),
                    key=relative_key(str(entry.get("key") or ""), prefix, namespace),
                )
            )
    oldest = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    return sorted(rows, key=lambda r: (parse_time(r.completed) or oldest, r.container), reverse=True)


def flags_text(flags: Mapping[str, Any]) -> str:
    """The checkpoint's spec as podman's flags read: `containers=web,db leaveRunning export=local`."""
    words = []
    for name, value in flags.items():
        if name == "nodeName":
            continue
        if value is True:
            words.append(name)
        elif isinstance(value, list):
            words.append(f"{name}={','.join(map(str, value))}")
        elif name == "export" and isinstance(value, Mapping):
            storage = (value.get("storageRef") or {}).get("name") or "default storage"
            words.append(f"export={storage}" + (f" key={value['key']}" if value.get("key") else ""))
        elif isinstance(value, Mapping):
            words.append(f"{name}={value.get('name', dict(value))}")
        else:
            words.append(f"{name}={value}")
    return " ".join(words) or "-"


def took(manifest: Mapping[str, Any]) -> str:
    start, end = parse_time(manifest.get("startTime")), parse_time(manifest.get("completionTime"))
    return "-" if start is None or end is None else f"{(end - start).total_seconds():.1f}s"


def manifest_fields(manifest: Mapping[str, Any], location: str, signature: str) -> list[tuple[str, str]]:
    """The manifest's facts, one (label, value) per line of `inspect`."""
    host = manifest.get("host") or {}
    versions = ", ".join(f"{k} {v}" for k, v in host.items() if k != "node") or "-"
    fields = [
        ("Manifest", location),
        ("Checkpoint", f"{manifest.get('namespace')}/{manifest.get('name')} (uid {manifest.get('uid')})"),
        ("Node", str(manifest.get("nodeName") or host.get("node") or "-")),
        ("Flags", flags_text(manifest.get("flags") or {})),
        ("Versions", versions),
        ("Started", str(manifest.get("startTime") or "-")),
        ("Completed", f"{manifest.get('completionTime') or '-'} (took {took(manifest)})"),
        ("Signature", signature),
    ]
    return [(label, printable(value)) for label, value in fields]


def archive_cells(entry: Mapping[str, Any]) -> list[str]:
    """CONTAINER, SIZE, UNCOMPRESSED, COMPRESSION, ENCRYPTED, SHA256, KEY of one archive of a manifest."""
    encryption = entry.get("encryption") or {}
    recipients = len(encryption.get("recipients") or [])
    cells = [
        str(entry.get("container") or "-"),
        size(entry.get("size")),
        size(entry.get("uncompressedSize")),
        str(entry.get("compression") or "-"),
        f"{encryption.get('format')}, {recipients} recipient{'s' if recipients != 1 else ''}" if encryption else "no",
        str(entry.get("sha256") or "-"),
        str(entry.get("key") or "-"),
    ]
    return [printable(c) for c in cells]


def signature_state(manifest: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey] | None, unchecked: str) -> str:
    """Whether this cluster's controller signed the manifest; `keys` None when they could not be read."""
    signed = manifest.get(SIGNATURE)
    if signed is None:
        return "unsigned (a restore needs a storage with acceptUnsignedArchives)"
    kid = str(signed.get("keyID") or "")[:16] if isinstance(signed, Mapping) else ""
    if keys is None:
        return f"signed by key {kid}, not verified: {unchecked}"
    try:
        verify(manifest, keys)
    except Untrusted as e:
        return f"INVALID: {e}"
    return f"valid, {ALGORITHM} key {kid}"
