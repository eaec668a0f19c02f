"""Podman on the node, two ways: the libpod REST API over the host socket, and the CLI through nsenter.

Both stream podman's checkpoint export to a consumer while podman runs (the REST API as a plain
tar, the CLI compressed where podman's own compressor serves), and both feed an archive to
`podman container restore --import`. Errors become PodmanError with podman's own message, which
the services classify into reasons; a podman that does not answer in time is `unavailable`.

Every export asks podman to keep its local checkpoint (`--keep`): until the archive is confirmed
in the bucket, that is the way back for a container that CRIU stopped (see docs/failure-semantics.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import posixpath
import re
import shutil
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from checkpointer import flags
from checkpointer.adapters import process
from checkpointer.archive.codec import Chunk, read_chunks
from checkpointer.errors import CommandError
from checkpointer.models import CheckpointSpec, Compression, RestoreSpec
from checkpointer.settings import Settings

API = "/v5.0.0/libpod"
PIPE_SIZE = 1024 * 1024
Consumer = Callable[[Iterable[Chunk]], None]


class PodmanError(Exception):
    def __init__(self, message: str, status: int = 0, unavailable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        # Podman did not answer (no socket, no reply in time): nothing podman said, no container state.
        self.unavailable = unavailable


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    state: str
    static_dir: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    # Seconds since the epoch: what `latest` compares (the CLI's list gives whole seconds).
    created: float = 0.0
    # When it began to run, as podman's inspection says (RFC 3339; a restored container's restore).
    started_at: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


@dataclass(frozen=True)
class Labelled:
    """A podman pod, volume or network as a restore judges it: what podman knows it by, and its labels."""

    id: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    def label(self, name: str) -> str | None:
        return dict(self.labels).get(name)


def _labelled(data: dict[str, Any] | list[Any] | None) -> Labelled | None:
    """A pod's, volume's or network's inspection; podman 5's CLI answers with a list, the REST API and
    podman 4 with one; a network's keys are in lower case (netavark's own)."""
    if isinstance(data, list):
        data = data[0] if data else None
    if not isinstance(data, dict):
        return None
    labels = data.get("Labels") or data.get("labels") or {}
    name = str(data.get("Name") or data.get("name") or "")
    return Labelled(
        id=str(data.get("Id") or data.get("id") or name),
        name=name,
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )


@dataclass(frozen=True)
class Footprint:
    """What a checkpoint of a container writes at most, in bytes: the memory its cgroup charges it
    (CRIU dumps those pages) and its root file system's changes (podman's SizeRw)."""

    memory: int
    rootfs_diff: int


class Runtime(Protocol):
    def containers(self) -> list[Container]: ...
    def latest(self) -> Container | None: ...
    def inspect(self, name: str) -> Container | None: ...
    def image_exists(self, image: str) -> bool: ...
    def versions(self) -> dict[str, str]: ...
    def compresses(self, compression: Compression) -> bool:
        """Whether its export arrives already compressed as `compression` asks."""
        ...

    def checkpoint(
        self, spec: CheckpointSpec, container: str, export: Consumer | None, fifo_dir: Path
    ) -> dict[str, Any]: ...
    def restore(self, spec: RestoreSpec, archive: Path, previous: Path | None) -> dict[str, Any]: ...
    def restore_in_place(self, name: str) -> None:
        """Restore a stopped container from its local checkpoint, under its own name."""
        ...

    def remove_local_checkpoint(self, container: Container) -> None:
        """Remove what `--keep` kept of a checkpoint in the container's folder."""
        ...

    def footprint(self, name: str) -> Footprint:
        """The container's memory usage and root file system changes, for the spool's estimate."""
        ...

    def read_file(self, path: str) -> bytes | None: ...
    def pod(self, name: str) -> Labelled | None:
        """The podman pod of that name or ID, None when there is none."""
        ...

    def volume(self, name: str) -> Labelled | None:
        """The named volume, None when there is none."""
        ...

    def network(self, name: str) -> Labelled | None:
        """The podman network of that name, None when there is none."""
        ...

    def remove(self, container: Container) -> None:
        """Remove this container, by its ID: whatever holds its name now is not touched."""
        ...


def _container(data: dict[str, Any]) -> Container:
    names = data.get("Names") or [data.get("Name", "")]
    state = data.get("State")
    started = ""
    if isinstance(state, dict):
        # Podman writes the zero time (year 1) for what never happened.
        times = [str(state.get(k) or "") for k in ("RestoredAt", "StartedAt")]
        started = next((t for t in times if t and not t.startswith("0001-")), "") if state.get("Running") else ""
        state = state.get("Status", "")
    labels = data.get("Labels") or (data.get("Config") or {}).get("Labels") or {}
    return Container(
        id=data.get("Id", ""),
        name=str(names[0]).lstrip("/"),
        state=str(state or ""),
        static_dir=str(data.get("StaticDir", "")),
        labels=tuple(sorted(labels.items())),
        created=_created(data.get("Created")),
        started_at=started,
    )


def _created(value: Any) -> float:
    """The CLI's list says whole seconds since the epoch, the REST API and inspect an RFC 3339 time."""
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0


def cgroup_memory_files(cgroups: str) -> list[str]:
    """Where the node may show the memory a process's cgroup is charged, from its /proc/<pid>/cgroup. Pure.

    cgroup v2 (`0::<path>`) keeps it in memory.current, v1 (`<n>:memory:<path>`) in memory.usage_in_bytes.
    A node that runs in a container of its own (a cgroup namespace, or a hierarchy mounted at its own
    cgroup) shows only the end of the path: every shorter suffix is a candidate, the longest first.
    """
    candidates: list[str] = []
    for line in cgroups.splitlines():
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if "memory" in controllers.split(","):
            base, leaf = "/sys/fs/cgroup/memory", "memory.usage_in_bytes"
        elif controllers == "":
            base, leaf = "/sys/fs/cgroup", "memory.current"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        candidates += [posixpath.join(base, *parts[i:], leaf) for i in range(len(parts))]
    return candidates


def _footprint(inspected: dict[str, Any], read_file: Callable[[str], bytes | None]) -> Footprint:
    """A container's footprint from its inspection (SizeRw, its pid) and its cgroup's memory counter.

    The cgroup is read on the node rather than through podman's stats, which fail where podman cannot
    load the cgroup (nodes nested in containers); 0 when the container has no process.
    """
    rootfs_diff = int(inspected.get("SizeRw") or 0)
    pid = int((inspected.get("State") or {}).get("Pid") or 0)
    cgroups = read_file(f"/proc/{pid}/cgroup") if pid else None
    for path in cgroup_memory_files(cgroups.decode(errors="replace")) if cgroups else []:
        content = read_file(path)
        if content is not None and content.strip().isdigit():
            return Footprint(memory=int(content.strip()), rootfs_diff=rootfs_diff)
    return Footprint(memory=0, rootfs_diff=rootfs_diff)


class _Beside:
    """A podman command run on a thread of its own while the caller's thread feeds or drains `fifo`.

    Once podman ends, the FIFO is opened from the other side (`unblock`: os.O_RDONLY or os.O_WRONLY),
    so that an open or read of the caller's that podman never answered returns.
    """

    def __init__(self, argv: list[str], timeout: float, fifo: Path, unblock: int, name: str) -> None:
        self.proc = process.spawn(argv, die_with_parent=True)
        self._argv = argv
        self._timeout = timeout
        self._fifo = fifo
        self._unblock = unblock
        self._stdout = ""
        self._error: CommandError | None = None
        self.thread = threading.Thread(target=self._wait, name=name, daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        try:
            self._stdout = process.finish(self.proc, self._argv, self._timeout)
        except CommandError as e:
            self._error = e
        with contextlib.suppress(OSError):
            os.close(os.open(self._fifo, self._unblock | os.O_NONBLOCK))

    def stats(self) -> dict[str, Any]:
        """Podman's statistics once it ended; PodmanError when it failed."""
        if self._error is not None:
            raise PodmanError(self._error.stderr.strip() or str(self._error), self._error.returncode)
        return _stats(self._stdout)


def _stats(text: str) -> dict[str, Any]:
    """podman --print-stats writes one JSON document; anything else on stdout is ignored."""
    start = text.find("{")
    if start < 0:
        return {}
    try:
        value = json.loads(text[start:])
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


# What podman's `--keep` leaves in the container's folder, and podman removes without it.
LOCAL_CHECKPOINT = (
    "checkpoint",
    "dump.log",
    "stats-dump",
    "config.dump",
    "spec.dump",
    "devshm-checkpoint.tar",
    "restore.log",
    "stats-restore",
)


class ApiRuntime:
    """The libpod REST API on the node's podman socket."""

    def __init__(self, settings: Settings) -> None:
        self.socket = settings.podman_socket
        self.timeout = settings.podman_timeout_seconds
        self.query_timeout = settings.podman_query_timeout_seconds
        # With hostPID, /proc/<target>/root is the host's file system as podman sees it.
        self.host_root = Path(f"/proc/{settings.nsenter_target}/root")

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Iterable[Chunk] | None = None,
        long: bool = False,
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        """`long` for a checkpoint or restore; any other call is a question with a short timeout."""
        url = API + path + ("?" + urllib.parse.urlencode(query) if query else "")
        conn = _UnixConnection(self.socket, self.timeout if long else self.query_timeout)
        headers = {"Content-Type": "application/x-tar"} if body is not None else {}
        try:
            conn.request(method, url, body=body, headers=headers, encode_chunked=body is not None)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise PodmanError(f"podman's API at {self.socket} does not answer: {e}", unavailable=True) from None
        if resp.status >= 400:
            raw = resp.read().decode(errors="replace")
            conn.close()
            try:
                data = json.loads(raw)
                message = data.get("message") or data.get("cause") or raw
            except (json.JSONDecodeError, AttributeError):
                message = raw
            raise PodmanError(str(message), resp.status)
        return conn, resp

    def _json(self, method: str, path: str, query: dict[str, str] | None = None) -> Any:
        conn, resp = self._request(method, path, query)
        with contextlib.closing(conn):
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def containers(self) -> list[Container]:
        return [_container(c) for c in self._json("GET", "/containers/json", {"all": "true"}) or []]

    def latest(self) -> Container | None:
        found = self._json("GET", "/containers/json", {"all": "true", "last": "1"}) or []
        return _container(found[0]) if found else None

    def inspect(self, name: str) -> Container | None:
        try:
            return _container(self._json("GET", f"/containers/{urllib.parse.quote(name)}/json"))
        except PodmanError as e:
            if e.status == 404:
                return None
            raise

    def footprint(self, name: str) -> Footprint:
        inspected = self._json("GET", f"/containers/{urllib.parse.quote(name)}/json", {"size": "true"}) or {}
        return _footprint(inspected, self.read_file)

    def image_exists(self, image: str) -> bool:
        try:
            conn, _ = self._request("GET", f"/images/{urllib.parse.quote(image, safe='')}/exists")
        except PodmanError as e:
            if e.status == 404:
                return False
            raise
        conn.close()
        return True

    def compresses(self, compression: Compression) -> bool:
        # The REST API exports only plain tar.
        return compression is Compression.NONE

    def versions(self) -> dict[str, str]:
        info = self._json("GET", "/info") or {}
        host = info.get("host", {})
        runtime_version = str(host.get("ociRuntime", {}).get("version", "")).splitlines()
        return {
            "podman": str(info.get("version", {}).get("Version", "")),
            "kernel": str(host.get("kernel", "")),
            "ociRuntime": runtime_version[0] if runtime_version else "",
        }

    def checkpoint(
        self, spec: CheckpointSpec, container: str, export: Consumer | None, fifo_dir: Path
    ) -> dict[str, Any]:
        query = flags.checkpoint_query(spec, export is not None)
        conn, resp = self._request("POST", f"/containers/{urllib.parse.quote(container)}/checkpoint", query, long=True)
        with contextlib.closing(conn):
            if export is None:
                return _stats(resp.read().decode(errors="replace"))
            export(read_chunks(resp))
        # The REST export sends the archive as the response body, so podman's stats have no place to go.
        return {}

    def restore(self, spec: RestoreSpec, archive: Path, previous: Path | None) -> dict[str, Any]:
        if previous is not None:
            raise PodmanError("podman's REST API cannot import a previous checkpoint; use the CLI runtime")
        with archive.open("rb") as f:
            conn, resp = self._request(
                "POST", "/containers/import/restore", flags.restore_query(spec), body=read_chunks(f), long=True
            )
            with contextlib.closing(conn):
                return _stats(resp.read().decode(errors="replace"))

    def restore_in_place(self, name: str) -> None:
        conn, resp = self._request("POST", f"/containers/{urllib.parse.quote(name)}/restore", long=True)
        with contextlib.closing(conn):
            resp.read()

    def remove_local_checkpoint(self, container: Container) -> None:
        folder = self.host_root / container.static_dir.lstrip("/")
        for name in LOCAL_CHECKPOINT:
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def read_file(self, path: str) -> bytes | None:
        try:
            return (self.host_root / path.lstrip("/")).read_bytes()
        except OSError:
            return None

    def _labelled(self, kind: str, name: str) -> Labelled | None:
        try:
            return _labelled(self._json("GET", f"/{kind}/{urllib.parse.quote(name, safe='')}/json"))
        except PodmanError as e:
            if e.status == 404:
                return None
            raise

    def pod(self, name: str) -> Labelled | None:
        return self._labelled("pods", name)

    def volume(self, name: str) -> Labelled | None:
        return self._labelled("volumes", name)

    def network(self, name: str) -> Labelled | None:
        return self._labelled("networks", name)

    def remove(self, container: Container) -> None:
        self._json("DELETE", f"/containers/{urllib.parse.quote(container.id, safe='')}", {"force": "true"})


PODMAN_ZSTD_LEVEL = 3
# How often podman 5's CLI opens an import (CliRuntime.restore_streamed).
IMPORT_READINGS = 3


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class CliRuntime:
    """The podman CLI, run in the host's mount and PID namespaces through nsenter."""

    def __init__(self, settings: Settings) -> None:
        self.prefix = nsenter(settings)
        self.podman = [*self.prefix, *settings.podman_command]
        # The export's podman dies with its nsenter, and nsenter with the agent (see commands.spawn):
        # killed mid-export, podman would otherwise wait on the pipe for ever, holding its lock.
        self.exporting_podman = [*self.prefix, "setpriv", "--pdeathsig", "KILL", *settings.podman_command]
        self.timeout = settings.podman_timeout_seconds
        self.query_timeout = settings.podman_query_timeout_seconds
        self.zstd_level = settings.zstd_level

    def _run(self, *args: str, timeout: float | None = None) -> str:
        try:
            return process.run([*self.podman, *args], timeout=timeout or self.query_timeout)
        except CommandError as e:
            raise PodmanError(e.stderr.strip() or str(e), e.returncode, unavailable=e.timed_out) from e

    def containers(self) -> list[Container]:
        return [_container(c) for c in json.loads(self._run("ps", "--all", "--format=json") or "[]")]

    def latest(self) -> Container | None:
        found = json.loads(self._run("ps", "--all", "--latest", "--format=json") or "[]")
        return _container(found[0]) if found else None

    def inspect(self, name: str) -> Container | None:
        try:
            found = json.loads(self._run("container", "inspect", "--format=json", "--", name))
        except PodmanError as e:
            if "no such" in e.message.lower():
                return None
            raise
        return _container(found[0]) if found else None

    def footprint(self, name: str) -> Footprint:
        found = json.loads(self._run("container", "inspect", "--size", "--format=json", name) or "[]")
        return _footprint(found[0] if found else {}, self.read_file)

    def image_exists(self, image: str) -> bool:
        try:
            self._run("image", "exists", image)
        except PodmanError as e:
            if e.status == 1:
                return False
            raise
        return True

    def compresses(self, compression: Compression) -> bool:
        # Podman's zstd runs at its own default level, which is zstd's 3.
        return compression is not Compression.ZSTD or self.zstd_level == PODMAN_ZSTD_LEVEL

    def versions(self) -> dict[str, str]:
        version = json.loads(self._run("version", "--format=json"))
        criu = process.run([*self.prefix, "criu", "--version"], timeout=30).splitlines()
        kernel = process.run([*self.prefix, "uname", "-r"], timeout=30).strip()
        return {
            "podman": str(version.get("Client", {}).get("Version", "")),
            "criu": criu[0].removeprefix("Version: ").strip() if criu else "",
            "kernel": kernel,
        }

    def checkpoint(
        self, spec: CheckpointSpec, container: str, export: Consumer | None, fifo_dir: Path
    ) -> dict[str, Any]:
        if export is None:
            return _stats(self._run(*flags.checkpoint_argv(spec, container, None), timeout=self.timeout))
        fifo = fifo_dir / f".{container}.fifo"
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        compress = spec.compress if self.compresses(spec.compress) else Compression.NONE
        argv = [*self.exporting_podman, *flags.checkpoint_argv(spec, container, fifo, compress)]
        # Podman may fail before it opens the FIFO: a writer of our own then lets our reader see EOF.
        podman = _Beside(argv, self.timeout, fifo, os.O_WRONLY, f"podman-{container}")
        try:
            with fifo.open("rb") as stream:
                # A 1 MiB pipe instead of 64 KiB: podman blocks less often and reads come in large chunks.
                with contextlib.suppress(OSError):
                    fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                export(read_chunks(stream))
        except BaseException:
            # The reader is gone (a full spool, a failed hash): podman would block on the pipe.
            podman.proc.kill()
            raise
        finally:
            podman.thread.join()
            fifo.unlink(missing_ok=True)
        return podman.stats()

    def restore(self, spec: RestoreSpec, archive: Path, previous: Path | None) -> dict[str, Any]:
        return _stats(self._run(*flags.restore_argv(spec, archive, previous), timeout=self.timeout))

    def restore_streamed(
        self, spec: RestoreSpec, fifo_dir: Path, head: bytes, feed: Callable[[int], None]
    ) -> dict[str, Any]:
        """`podman container restore --import` from a FIFO, while the archive is still arriving.

        Podman 5's CLI opens an import three times: for the OCI runtime the archive names (root.go),
        for config.dump and spec.dump (CRImportCheckpointConfigOnly), then for everything else
        (CRImportCheckpointWithoutConfig), reading each to the tar's end. The first two get `head`, a
        tar of the two configuration files the agent judged; the third gets the archive itself,
        written by `feed` into the FIFO's descriptor as its bytes are judged. Between readings the
        path is swapped for a fresh FIFO while the reader still holds the old one, so no reading
        ever sees bytes meant for another. A `feed` that raises stops podman: nothing half-fed
        is restored.
        """
        fifo = fifo_dir / ".import.fifo"
        fresh = fifo_dir / ".import.fifo.next"
        for path in (fifo, fresh):
            path.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        argv = [*self.exporting_podman, *flags.restore_argv(spec, fifo, None)]
        # Podman may end before it opens the FIFO again: a reader of our own then unblocks our open.
        podman = _Beside(argv, self.timeout, fifo, os.O_RDONLY, "podman-import")
        try:
            for reading in range(IMPORT_READINGS):
                fd = os.open(fifo, os.O_WRONLY)
                try:
                    if not podman.thread.is_alive():
                        break
                    if reading < IMPORT_READINGS - 1:
                        os.mkfifo(fresh, 0o600)
                        os.replace(fresh, fifo)
                        _write_all(fd, head)
                    else:
                        with contextlib.suppress(OSError):
                            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                        feed(fd)
                except BrokenPipeError:
                    break  # podman stopped reading: its own error says why
                finally:
                    os.close(fd)
        except BaseException:
            podman.proc.kill()
            raise
        finally:
            podman.thread.join()
            for path in (fifo, fresh):
                path.unlink(missing_ok=True)
        return podman.stats()

    def restore_in_place(self, name: str) -> None:
        self._run("container", "restore", name, timeout=self.timeout)

    def remove_local_checkpoint(self, container: Container) -> None:
        paths = [f"{container.static_dir}/{name}" for name in LOCAL_CHECKPOINT]
        process.run([*self.prefix, "rm", "-rf", "--", *paths], timeout=self.query_timeout)

    def read_file(self, path: str) -> bytes | None:
        try:
            return process.run([*self.prefix, "cat", path], timeout=60).encode()
        except CommandError:
            return None

    def _labelled(self, kind: str, name: str) -> Labelled | None:
        try:
            # `--`: a name from an archive is never taken for a flag.
            return _labelled(json.loads(self._run(kind, "inspect", "--format=json", "--", name) or "null"))
        except PodmanError as e:
            if f"no such {kind}" in e.message.lower() or f"{kind} not found" in e.message.lower():
                return None
            raise

    def pod(self, name: str) -> Labelled | None:
        return self._labelled("pod", name)

    def volume(self, name: str) -> Labelled | None:
        return self._labelled("volume", name)

    def network(self, name: str) -> Labelled | None:
        return self._labelled("network", name)

    def remove(self, container: Container) -> None:
        self._run("rm", "--force", "--", container.id)


def nsenter(settings: Settings) -> list[str]:
    """The prefix that runs a program in the mount and PID namespaces of the node's podman."""
    return ["nsenter", f"--target={settings.nsenter_target}", "--mount", "--pid", "--"]


def criu_supports(settings: Settings, feature: str) -> bool:
    """CRIU's own feature check on the node (hostPID and privileges let the agent enter it either way)."""
    try:
        process.run([*nsenter(settings), "criu", "check", "--feature", feature], timeout=60)
    except CommandError:
        return False
    return True


# One shell on the node for all of it: a CRIU check costs milliseconds, an nsenter more.
_CRIU_CHECK = """
echo "criu $(criu --version 2>/dev/null | head -n 1)"
echo "runc $(runc --version 2>/dev/null | head -n 1)"
echo "kernel $(uname -r)"
for feature; do
  if criu check --feature "$feature" >/dev/null 2>&1; then echo "+ $feature"; else echo "- $feature"; fi
done
"""


@dataclass(frozen=True)
class CriuCheck:
    criu: str
    runc: str
    kernel: str
    supported: frozenset[str]
    missing: frozenset[str]


def criu_check(settings: Settings, features: Iterable[str]) -> CriuCheck:
    """The node's CRIU, runc and kernel versions and CRIU's own check of each feature.

    Without a CRIU on the node no feature counts as supported or missing: nothing is known.
    """
    out = process.run([*nsenter(settings), "sh", "-c", _CRIU_CHECK, "sh", *features], timeout=60)
    versions: dict[str, str] = {}
    supported: set[str] = set()
    missing: set[str] = set()
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word == "+":
            supported.add(rest.strip())
        elif word == "-":
            missing.add(rest.strip())
        else:
            versions[word] = rest.strip()
    criu = versions.get("criu", "").removeprefix("Version:").strip()
    if not criu:
        supported.clear()
        missing.clear()
    return CriuCheck(
        criu=criu,
        runc=versions.get("runc", "").removeprefix("runc version").strip(),
        kernel=versions.get("kernel", ""),
        supported=frozenset(supported),
        missing=frozenset(missing),
    )


def runtime(settings: Settings) -> Runtime:
    return ApiRuntime(settings) if settings.podman_mode == "api" else CliRuntime(settings)


def checkpoint_in_progress(container_id: str) -> bool:
    """Whether an OCI runtime is still checkpointing the container on this node.

    A podman killed mid-checkpoint leaves its runc (and runc's CRIU) running: until they are done,
    the container's state says nothing yet. runc names the container's full id on its command line;
    with the host's PID namespace, /proc shows every process of the node.
    """
    return _running_process(rb"\0checkpoint\0.*\0" + re.escape(container_id.encode()) + rb"\0")


def restore_in_progress(import_dir: str, container_id: str = "") -> bool:
    """Whether podman (or its OCI runtime) still restores on this node what an agent gave it to import.

    A podman CLI started by an agent that was killed may go on: its command line names the import,
    a file or FIFO in `import_dir`. Once it made the container, runc restores it under its full id.
    """
    folder = re.escape(import_dir.rstrip("/").encode() + b"/")
    patterns = [rb"\0container\0restore\0.*" + folder]
    if container_id:
        patterns.append(rb"\0restore\0.*\0" + re.escape(container_id.encode()) + rb"\0")
    return _running_process(b"|".join(b"(?:" + p + b")" for p in patterns))


def _running_process(command_line: bytes) -> bool:
    """Whether a process of the node has a command line (its arguments, NUL-separated and -ended,
    with a NUL before the first) that the pattern finds."""
    pattern = re.compile(command_line, re.DOTALL)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = b"\0" + (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if pattern.search(cmdline):
            return True
    return False
