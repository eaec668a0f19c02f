"""The CRI adapter: its hand-written protobuf messages, byte for byte, and what a runtime's failures mean;
what an agent records of its runtime on its Lease, and what the controller refuses because of it.

The bytes are those protoc's encoders give for the CRI's runtime.v1 messages; a gRPC server in this
process, on a unix socket, plays a runtime's side of the two calls.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import cast

import grpc
import pytest

from checkpointer.adapters.cri import (
    PROBE_CONTAINER,
    SERVICE,
    CriRuntime,
    CriVersion,
    checkpoint_request,
    drain,
    failure,
    fields,
    version_request,
    version_response,
)
from checkpointer.adapters.kube import Kube
from checkpointer.adapters.podman import Runtime
from checkpointer.errors import Failure, Retry
from checkpointer.reasons import Reason
from checkpointer.services.capabilities import (
    ANNOTATIONS,
    CRI_ANNOTATIONS,
    CriFacts,
    NodeFacts,
    missing_for_pod_checkpoint,
)
from checkpointer.services.node import Node
from checkpointer.settings import Settings

SOCKET = Path("/run/containerd/containerd.sock")


def test_version_request_names_the_cri_version() -> None:
    # field 1, length-delimited (0x0a), two bytes
    assert version_request() == b"\x0a\x02v1"
    assert version_request("") == b""


def test_checkpoint_request_encodes_its_three_fields() -> None:
    request = checkpoint_request("abc", "/var/lib/checkpointer/spool/x.tar", 300)
    location = b"/var/lib/checkpointer/spool/x.tar"
    assert request == b"\x0a\x03abc" + b"\x12" + bytes([len(location)]) + location + b"\x18\xac\x02"
    # proto3 leaves a zero timeout out: the runtime's default then applies.
    assert checkpoint_request("abc", "/l", 0) == b"\x0a\x03abc\x12\x02/l"


def test_long_strings_take_a_varint_length() -> None:
    container_id = "c" * 200
    request = checkpoint_request(container_id, "/l", 1)
    assert request[:3] == b"\x0a\xc8\x01" and request[3:203] == container_id.encode()
    assert list(fields(request)) == [(1, 2, container_id.encode()), (2, 2, b"/l"), (3, 0, 1)]


def test_a_negative_int64_is_ten_bytes_of_twos_complement() -> None:
    request = checkpoint_request("a", "/l", -1)
    assert request.endswith(b"\x18" + b"\xff" * 9 + b"\x01")


def test_version_response_reads_its_strings_and_skips_unknown_fields() -> None:
    data = (
        b"\x0a\x070.1.0-x"
        + b"\x12\x0acontainerd"
        + b"\x1a\x06v2.1.9"
        + b"\x22\x02v1"
        # fields a newer runtime might add: a varint, a fixed64, a fixed32, bytes
        + b"\x28\x96\x01"
        + b"\x31"
        + b"\x00" * 8
        + b"\x3d"
        + b"\x00" * 4
        + b"\x42\x01z"
    )
    assert version_response(data) == CriVersion("containerd", "v2.1.9", "v1")
    assert version_response(b"") == CriVersion("", "", "")


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\x0a", b"\x28\x96", b"\x0b\x00", b"\x31\x00"])
def test_a_truncated_or_malformed_message_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        list(fields(data))


@pytest.mark.parametrize(
    ("call", "code", "details", "kind", "reason"),
    [
        ("Version", grpc.StatusCode.UNAVAILABLE, "connect: no such file", Retry, Reason.RUNTIME_UNAVAILABLE),
        ("CheckpointContainer", grpc.StatusCode.UNAVAILABLE, "", Retry, Reason.RUNTIME_UNAVAILABLE),
        ("Version", grpc.StatusCode.DEADLINE_EXCEEDED, "", Retry, Reason.RUNTIME_UNAVAILABLE),
        (
            "CheckpointContainer",
            grpc.StatusCode.UNIMPLEMENTED,
            "unknown method CheckpointContainer for service runtime.v1.RuntimeService",
            Failure,
            Reason.RUNTIME_CANNOT_CHECKPOINT,
        ),
        (
            "CheckpointContainer",
            grpc.StatusCode.UNKNOWN,
            'failed to checkpoint container "x": CRIU binary not found or too old',
            Failure,
            Reason.RUNTIME_CANNOT_CHECKPOINT,
        ),
        (
            "CheckpointContainer",
            grpc.StatusCode.UNKNOWN,
            "checkpoint/restore support not available",
            Failure,
            Reason.RUNTIME_CANNOT_CHECKPOINT,
        ),
        (
            "CheckpointContainer",
            grpc.StatusCode.NOT_FOUND,
            'an error occurred when trying to find container "x": not found',
            Failure,
            Reason.CONTAINER_NOT_FOUND,
        ),
        (
            "CheckpointContainer",
            grpc.StatusCode.UNKNOWN,
            'container "x" is in CONTAINER_EXITED state. only CONTAINER_RUNNING containers can be checkpointed',
            Failure,
            Reason.CONTAINER_NOT_RUNNING,
        ),
        ("CheckpointContainer", grpc.StatusCode.DEADLINE_EXCEEDED, "", Failure, Reason.CHECKPOINT_FAILED),
        (
            "CheckpointContainer",
            grpc.StatusCode.UNKNOWN,
            "checkpointing container failed: criu failed: type NOTIFY errno 0",
            Failure,
            Reason.CHECKPOINT_FAILED,
        ),
    ],
)
def test_what_a_failed_call_means(
    call: str, code: grpc.StatusCode, details: str, kind: type[Exception], reason: Reason
) -> None:
    error = failure(call, code, details, SOCKET)
    assert isinstance(error, kind) and error.reason == reason
    assert str(SOCKET) in error.message or details in error.message or code.name in error.message


Handler = Callable[[bytes, grpc.ServicerContext], bytes]


@pytest.fixture
def runtime_server(tmp_path: Path) -> Iterator[tuple[Path, dict[str, Handler], list[tuple[str, bytes]]]]:
    """A runtime's side of the CRI on a unix socket: the handlers a test sets, and the requests it got."""
    socket = tmp_path / "cri.sock"
    handlers: dict[str, Handler] = {}
    received: list[tuple[str, bytes]] = []

    def serve(method: str) -> grpc.RpcMethodHandler:
        def behaviour(request: bytes, context: grpc.ServicerContext) -> bytes:
            received.append((method, request))
            return handlers[method](request, context)

        return grpc.unary_unary_rpc_method_handler(behaviour)

    service = grpc.method_handlers_generic_handler(
        "runtime.v1.RuntimeService", {name: serve(name) for name in ("Version", "CheckpointContainer")}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[service])
    server.add_insecure_port(f"unix://{socket}")
    server.start()
    try:
        yield socket, handlers, received
    finally:
        server.stop(None).wait()


def test_the_calls_reach_a_runtime_and_read_its_answers(
    runtime_server: tuple[Path, dict[str, Handler], list[tuple[str, bytes]]],
) -> None:
    socket, handlers, received = runtime_server
    handlers["Version"] = lambda request, context: b"\x12\x0acontainerd\x1a\x06v2.1.9\x22\x02v1"
    handlers["CheckpointContainer"] = lambda request, context: b""
    runtime = CriRuntime(socket)

    assert runtime.version() == CriVersion("containerd", "v2.1.9", "v1")
    runtime.checkpoint("abc", Path("/spool/abc.tar"), 60)
    assert received == [
        ("Version", b"\x0a\x02v1"),
        ("CheckpointContainer", checkpoint_request("abc", "/spool/abc.tar", 60)),
    ]
    assert SERVICE == "/runtime.v1.RuntimeService/"


def test_a_runtime_without_checkpoints_fails_for_good(
    runtime_server: tuple[Path, dict[str, Handler], list[tuple[str, bytes]]],
) -> None:
    socket, handlers, _ = runtime_server

    def unimplemented(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "method CheckpointContainer not implemented")

    handlers["CheckpointContainer"] = unimplemented
    with pytest.raises(Failure) as failed:
        CriRuntime(socket).checkpoint("abc", Path("/spool/abc.tar"), 60)
    assert failed.value.reason == Reason.RUNTIME_CANNOT_CHECKPOINT
    assert "not implemented" in failed.value.message


def test_a_missing_socket_is_retried(tmp_path: Path) -> None:
    with pytest.raises(Retry) as retried:
        CriRuntime(tmp_path / "absent.sock").version()
    assert retried.value.reason == Reason.RUNTIME_UNAVAILABLE
    assert str(tmp_path / "absent.sock") in retried.value.message


def write_as_containerd(location: str, data: bytes, opened: threading.Event | None = None) -> None:
    """containerd 2.1's write of its tar: opened read-write (and created), one sequential copy."""
    fd = os.open(location, os.O_RDWR | os.O_CREAT, 0o600)
    if opened is not None:
        opened.set()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 256 * 1024]) :]
    finally:
        os.close(fd)


def location_of(request: bytes) -> str:
    return next(v.decode() for n, _, v in fields(request) if n == 2 and isinstance(v, bytes))


TAR = bytes(range(256)) * (12 * 1024)  # 3 MiB: three times the pipe


def test_a_streamed_checkpoint_is_read_as_the_runtime_writes_it(
    runtime_server: tuple[Path, dict[str, Handler], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    socket, handlers, _ = runtime_server
    handlers["CheckpointContainer"] = lambda request, context: write_as_containerd(location_of(request), TAR) or b""
    read = bytearray()
    fifo = tmp_path / "abc.fifo"
    CriRuntime(socket).checkpoint_streamed("abc", fifo, 60, lambda chunks: [read.extend(c) for c in chunks] and None)
    assert bytes(read) == TAR
    assert not fifo.exists()


def test_a_reader_that_fails_drains_the_runtime_first(
    runtime_server: tuple[Path, dict[str, Handler], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    socket, handlers, _ = runtime_server
    wrote = threading.Event()

    def write(request: bytes, context: grpc.ServicerContext) -> bytes:
        write_as_containerd(location_of(request), TAR)
        wrote.set()
        return b""

    def spool_full(chunks: Iterable[bytes | memoryview]) -> None:
        next(iter(chunks))
        raise OSError(28, "No space left on device")

    handlers["CheckpointContainer"] = write
    with pytest.raises(OSError, match="No space left"):
        CriRuntime(socket).checkpoint_streamed("abc", tmp_path / "abc.fifo", 60, spool_full)
    # The runtime's write returned, and its call ended, before the error went on.
    assert wrote.is_set()
    assert not (tmp_path / "abc.fifo").exists()


def test_a_runtime_that_fails_before_it_writes_ends_the_reading(
    runtime_server: tuple[Path, dict[str, Handler], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    socket, handlers, _ = runtime_server

    def not_running(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNKNOWN, 'container "abc" is in CONTAINER_EXITED state')

    handlers["CheckpointContainer"] = not_running
    read = bytearray()
    with pytest.raises(Failure) as failed:
        CriRuntime(socket).checkpoint_streamed(
            "abc", tmp_path / "abc.fifo", 60, lambda cs: [read.extend(c) for c in cs] and None
        )
    assert failed.value.reason == Reason.CONTAINER_NOT_RUNNING and not read


def test_what_a_killed_reader_left_is_drained_by_the_next(tmp_path: Path) -> None:
    fifo = tmp_path / "left.fifo"
    os.mkfifo(fifo, 0o600)
    opened = threading.Event()
    runtime = threading.Thread(target=write_as_containerd, args=(str(fifo), TAR, opened))
    runtime.start()
    # The runtime blocks in its write once the pipe is full, holding the FIFO open.
    assert opened.wait(10)
    drain(fifo)
    runtime.join(10)
    assert not runtime.is_alive() and not fifo.exists()
    drain(fifo)  # gone already: nothing to do
    os.mkfifo(fifo, 0o600)
    drain(fifo)  # no runtime holds it: it ends at once
    assert not fifo.exists()


# -- what the agent records of its runtime, and what the controller refuses because of it ------------------

CONTAINERD = CriFacts(runtime="containerd", version="v2.1.9", api_version="v1", checkpoint=True)
NODE = NodeFacts(criu="4.2.1", podman="5.8.2", runc="1.3.3", kernel="6.18.0-1-amd64", cri=CONTAINERD)


def test_the_runtime_survives_the_lease_annotations() -> None:
    annotations = NODE.annotations()
    assert annotations[CRI_ANNOTATIONS["runtime"]] == "containerd"
    assert annotations[CRI_ANNOTATIONS["version"]] == "v2.1.9"
    assert annotations[CRI_ANNOTATIONS["api_version"]] == "v1"
    assert annotations[CRI_ANNOTATIONS["checkpoint"]] == "true"
    assert annotations[CRI_ANNOTATIONS["refusal"]] == ""
    assert NodeFacts.from_annotations(annotations) == NODE
    refusing = replace(NODE, cri=replace(CONTAINERD, checkpoint=False, refusal="CRIU binary not found"))
    assert NodeFacts.from_annotations(refusing.annotations()) == refusing
    # Only the runtime recorded (podman's facts still being asked for): facts all the same.
    only = {k: v for k, v in NODE.annotations().items() if k in CRI_ANNOTATIONS.values()}
    assert NodeFacts.from_annotations(only) == NodeFacts(cri=CONTAINERD)


def test_an_agent_without_a_runtime_records_none_of_it() -> None:
    podman_only = replace(NODE, cri=None)
    assert not set(podman_only.annotations()) & set(CRI_ANNOTATIONS.values())
    assert set(podman_only.annotations()) == set(ANNOTATIONS.values())
    assert NodeFacts.from_annotations(podman_only.annotations()) == podman_only


def test_a_node_whose_runtime_cannot_checkpoint_is_refused_a_pod_checkpoint() -> None:
    assert missing_for_pod_checkpoint(NODE, "node-a") is None
    refusing = replace(NODE, cri=replace(CONTAINERD, checkpoint=False, refusal="CRIU binary not found or too old"))
    why = missing_for_pod_checkpoint(refusing, "node-a")
    assert why is not None
    assert "node node-a" in why and "containerd v2.1.9 (CRI v1)" in why and "CRIU binary not found" in why
    assert "keeps running" in why


def test_nothing_known_of_the_runtime_refuses_no_pod_checkpoint() -> None:
    assert missing_for_pod_checkpoint(None, "node-a") is None
    assert missing_for_pod_checkpoint(replace(NODE, cri=None), "node-a") is None


def test_the_agent_records_what_its_runtime_answers(
    runtime_server: tuple[Path, dict[str, Handler], list[tuple[str, bytes]]], tmp_path: Path
) -> None:
    socket, handlers, received = runtime_server
    handlers["Version"] = lambda request, context: b"\x12\x0acontainerd\x1a\x06v2.1.9\x22\x02v1"

    def no_such_container(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, 'an error occurred when trying to find container "x": not found')

    handlers["CheckpointContainer"] = no_such_container
    node = agent(socket, tmp_path)
    assert node.cri_facts() == CONTAINERD
    # The probe names a container no runtime has, and a path in the spool that nothing writes.
    method, request = received[-1]
    assert method == "CheckpointContainer"
    assert dict((n, v) for n, _, v in fields(request))[1] == PROBE_CONTAINER.encode()
    assert not list(tmp_path.glob("spool/*"))

    def without_criu(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.UNKNOWN, "CRIU binary not found or too old (<31600). Failed checkpoint")

    handlers["CheckpointContainer"] = without_criu
    facts = node.cri_facts()
    assert facts is not None and not facts.checkpoint and "CRIU binary not found" in facts.refusal


def test_an_agent_records_no_runtime_that_does_not_answer_nor_one_without_a_socket(tmp_path: Path) -> None:
    assert agent(tmp_path / "absent.sock", tmp_path).cri_facts() is None
    assert agent(None, tmp_path).cri_facts() is None


def agent(socket: Path | None, tmp_path: Path) -> Node:
    settings = Settings(node_name="node-a", cri_socket=socket, spool_dir=tmp_path / "spool")
    return Node(settings, cast(Kube, None), cast(Runtime, None), cri=CriRuntime(socket) if socket else None)
