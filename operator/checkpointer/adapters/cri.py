"""The node's container runtime over its CRI socket: the runtime's version, and a container's checkpoint.

The kubelet runs a node's Pods through a runtime (containerd, CRI-O) that serves the Container Runtime
Interface, `runtime.v1.RuntimeService`, over a unix socket. Two of its calls are enough here:
`Version` (which runtime, which version, which CRI version) and `CheckpointContainer`, which has the
runtime checkpoint a running container with CRIU into a plain tar at a path on the node that the
caller chooses. The container keeps running (the runtime leaves it running, as the kubelet's own
checkpoint API does).

gRPC carries the calls (grpcio, generic unary calls); the three small messages are encoded here by
hand rather than generated from the CRI's .proto, which would bring protobuf and generated code
for the hundred messages not used. What a call fails with becomes the typed errors of errors.py:
a runtime that cannot checkpoint fails the object for good (RuntimeCannotCheckpoint), one that does
not answer is retried (RuntimeUnavailable).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from checkpointer.archive.codec import Chunk, read_chunks
from checkpointer.errors import Failure, Retry
from checkpointer.reasons import Reason

if TYPE_CHECKING:
    # Imported where a call is made: grpc adds about 23 MiB to every agent, most of which have no CRI socket.
    import grpc

SERVICE = "/runtime.v1.RuntimeService/"
# The CRI version this client speaks (VersionRequest.version).
CRI_API_VERSION = "v1"
# A question (Version) must not take long; a checkpoint gets this much beyond its own timeout, so that
# the runtime's own word on a timeout arrives before our deadline cuts it off.
QUERY_TIMEOUT_SECONDS = 10.0
CHECKPOINT_GRACE_SECONDS = 30.0
PIPE_SIZE = 1024 * 1024

# No container is named so: the runtime's search for it fails after its own checks (checkpoint_refusal).
PROBE_CONTAINER = "checkpointer-probe-no-such-container"
# How runtimes say they have no CRIU to checkpoint with: containerd ("CRIU binary not found or too old"),
# CRI-O without enable_criu_support ("checkpoint/restore support not available"), and
# runc without criu in containerd's PATH ('exec: "criu": executable file not found in $PATH').
WITHOUT_CRIU = (
    "criu binary not found",
    '"criu": executable file not found',
    "too old",
    "checkpoint/restore support not",
)

# Protocol buffers' wire types (https://protobuf.dev/programming-guides/encoding/).
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class CriVersion:
    """The runtime's answer to Version: e.g. containerd, v2.1.9, v1."""

    runtime_name: str
    runtime_version: str
    runtime_api_version: str


# -- the messages, by hand ---------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 on the wire: two's complement, ten bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _string(number: int, value: str) -> bytes:
    """A string field; proto3 leaves out a field at its default ("")."""
    if not value:
        return b""
    data = value.encode()
    return _key(number, LENGTH_DELIMITED) + _varint(len(data)) + data


def _int64(number: int, value: int) -> bytes:
    return _key(number, VARINT) + _varint(value) if value else b""


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of a message; unknown fields are read past."""
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        value: int | bytes
        if wire_type == VARINT:
            value, at = _read_varint(data, at)
        elif wire_type == LENGTH_DELIMITED:
            size, at = _read_varint(data, at)
            if at + size > len(data):
                raise ValueError(f"field {number} runs past the message's end")
            value, at = data[at : at + size], at + size
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if at + width > len(data):
                raise ValueError(f"field {number} runs past the message's end")
            value, at = int.from_bytes(data[at : at + width], "little"), at + width
        else:
            raise ValueError(f"field {number} has wire type {wire_type}, which proto3 does not use")
        yield number, wire_type, value


def version_request(api_version: str = CRI_API_VERSION) -> bytes:
    """VersionRequest { string version = 1; }"""
    return _string(1, api_version)


def version_response(data: bytes) -> CriVersion:
    """VersionResponse { string version = 1; runtime_name = 2; runtime_version = 3; runtime_api_version = 4; }"""
    strings = {n: v.decode() for n, t, v in fields(data) if t == LENGTH_DELIMITED and isinstance(v, bytes)}
    return CriVersion(strings.get(2, ""), strings.get(3, ""), strings.get(4, ""))


def checkpoint_request(container_id: str, location: str, timeout_seconds: int) -> bytes:
    """CheckpointContainerRequest { string container_id = 1; string location = 2; int64 timeout = 3; }"""
    return _string(1, container_id) + _string(2, location) + _int64(3, timeout_seconds)


def _raw(data: bytes) -> bytes:
    return data


# -- errors -----------------------------------------------------------------------------------------------


def failure(call: str, code: grpc.StatusCode, details: str, socket: Path) -> Failure | Retry:
    """What a failed call means for the object: its typed error, with the runtime's own words. Pure."""
    import grpc

    said = details.strip() or code.name
    text = said.lower()
    # A question unanswered in its few seconds is a runtime that does not answer; a checkpoint that
    # ran past its timeout is not (below).
    if code == grpc.StatusCode.UNAVAILABLE or (code == grpc.StatusCode.DEADLINE_EXCEEDED and call == "Version"):
        return Retry(Reason.RUNTIME_UNAVAILABLE, f"the container runtime at {socket} does not answer: {said}")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Failure(
            Reason.RUNTIME_CANNOT_CHECKPOINT,
            f"the container runtime at {socket} does not implement CRI {call} ({said}); containerd 1.7 "
            "and later and CRI-O 1.25 and later do",
        )
    if any(words in text for words in WITHOUT_CRIU):
        return Failure(
            Reason.RUNTIME_CANNOT_CHECKPOINT,
            f"the container runtime at {socket} cannot checkpoint: {said} (it needs CRIU on the node, and "
            "CRI-O needs enable_criu_support)",
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Failure(Reason.CHECKPOINT_FAILED, f"CRI {call} did not finish in time: {said}")
    if code == grpc.StatusCode.NOT_FOUND:
        return Failure(Reason.CONTAINER_NOT_FOUND, f"CRI {call}: {said}")
    if "only running containers" in text or "only container_running" in text or "is in container_" in text:
        return Failure(Reason.CONTAINER_NOT_RUNNING, f"CRI {call}: {said}")
    return Failure(Reason.CHECKPOINT_FAILED, f"CRI {call} failed ({code.name}): {said}")


# -- the runtime ------------------------------------------------------------------------------------------


class CriRuntime:
    """The runtime behind one CRI socket of this node. A channel per call: a restarted runtime (a new
    socket file) is reached by the next call, and nothing of gRPC's stays open between calls."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def version(self) -> CriVersion:
        """Version: which runtime this is. RuntimeUnavailable (Retry) when it does not answer."""
        return version_response(self._call("Version", version_request(), QUERY_TIMEOUT_SECONDS))

    def checkpoint(self, container_id: str, location: Path, timeout_seconds: int) -> None:
        """CheckpointContainer: the runtime checkpoints the running container into a plain tar at
        `location`, a path on the node (the same path in the agent's spool); the container keeps
        running. `timeout_seconds` > 0 is how long the runtime may take (0: its default)."""
        request = checkpoint_request(container_id, str(location), timeout_seconds)
        self._call("CheckpointContainer", request, (timeout_seconds or 120) + CHECKPOINT_GRACE_SECONDS)

    def checkpoint_streamed(
        self, container_id: str, fifo: Path, timeout_seconds: int, export: Callable[[Iterable[Chunk]], None]
    ) -> None:
        """CheckpointContainer into a FIFO at `fifo` (made here, removed after) that `export` reads as the
        runtime writes it: containerd 2.1 writes its tar with one sequential copy, once CRIU and its
        own content store are done, so the last part of its work overlaps with the reader's.

        containerd opens the path read-write: a reader that stops would leave it blocked in its write
        for good (it holds a read end itself, so no EPIPE). So a reader that fails still drains the
        FIFO to its end before the error goes on; an agent killed meanwhile leaves that to the next
        one (`drain`).
        """
        fifo.unlink(missing_ok=True)
        os.mkfifo(fifo, 0o600)
        failed: list[Exception] = []
        opened = threading.Event()  # the reader's open returned (or will never be tried)

        def call() -> None:
            try:
                self.checkpoint(container_id, fifo, timeout_seconds)
            except Exception as e:  # raised in the caller's thread once the reading ended
                failed.append(e)
            # The runtime may fail before it opens the FIFO: a writer of our own lets our reader's open
            # return and see EOF, once the reader is in it.
            while not opened.is_set():
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                    break
                except OSError:
                    opened.wait(0.01)

        runtime = threading.Thread(target=call, name=f"cri-{container_id[:12]}", daemon=True)
        runtime.start()
        try:
            try:
                stream = fifo.open("rb")
            finally:
                opened.set()
            with stream:
                # A 1 MiB pipe instead of 64 KiB: the runtime blocks less often and reads are larger.
                with contextlib.suppress(OSError):
                    fcntl.fcntl(stream.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
                try:
                    export(read_chunks(stream))
                except BaseException:
                    _read_to_end(stream)
                    raise
        finally:
            runtime.join()
            fifo.unlink(missing_ok=True)
        if failed:
            raise failed[0]

    def checkpoint_refusal(self, location: Path) -> str | None:
        """Why the runtime would checkpoint no container, in its own words; None: it would.

        CRI has no question for this, so the agent asks for the checkpoint of a container that does not
        exist: a runtime without the call answers Unimplemented, and containerd and CRI-O check that
        they can checkpoint at all (CRIU, CRI-O's enable_criu_support) before they look for the
        container, which they then do not find. Nothing is written to `location`.
        """
        try:
            self._call(
                "CheckpointContainer", checkpoint_request(PROBE_CONTAINER, str(location), 10), QUERY_TIMEOUT_SECONDS
            )
        except Failure as e:
            return e.message if e.reason == Reason.RUNTIME_CANNOT_CHECKPOINT else None
        return None

    def _call(self, method: str, request: bytes, timeout: float) -> bytes:
        import grpc

        # grpc's default authority for a unix target is the socket path, which it percent-encodes into
        # the :authority header; containerd refuses nothing, but a plain name is what other clients send.
        options = [("grpc.default_authority", "localhost")]
        with grpc.insecure_channel(f"unix://{self.socket}", options=options) as channel:
            call = channel.unary_unary(SERVICE + method, request_serializer=_raw, response_deserializer=_raw)
            try:
                response: bytes = call(request, timeout=timeout, wait_for_ready=False)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
                raise failure(method, code, details, self.socket) from None
        return response


def _read_to_end(stream: io.BufferedReader) -> None:
    buffer = bytearray(PIPE_SIZE)
    while stream.readinto(buffer):
        pass


def drain(fifo: Path) -> None:
    """Read a FIFO a runtime may still be writing a checkpoint into to its end, and remove it.

    For what an agent killed during checkpoint_streamed left: the runtime's write returns and its call
    ends. A FIFO that no runtime holds (any more, or yet) ends at once and goes; a runtime that opens
    the path only afterwards then writes a plain file there, which the work folder's removal takes."""
    try:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    try:
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as stream:
            _read_to_end(stream)
    finally:
        os.close(fd)
        fifo.unlink(missing_ok=True)
