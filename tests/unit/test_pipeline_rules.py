"""The rules of a restore that follows a running checkpoint (services/pipeline.py, services/checkpoint.py)."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import pytest

from checkpointer.archive import spool as spooling
from checkpointer.archive.spool import GrowingFile
from checkpointer.errors import Failure
from checkpointer.models import Compression
from checkpointer.reasons import Reason
from checkpointer.services.checkpoint import Stream, streams_parts
from checkpointer.services.pipeline import Streamed, StreamView, _Flow, chosen_stream, followable


def test_a_checkpoint_streams_when_a_migration_owns_it_or_it_asks() -> None:
    owned = {
        "metadata": {"ownerReferences": [{"apiVersion": "checkpointer.dev/v1alpha1", "kind": "ContainerMigration"}]}
    }
    assert streams_parts(owned)
    assert streams_parts({"metadata": {"annotations": {"checkpointer.dev/stream": "true"}}})
    assert not streams_parts({"metadata": {}})
    # A kind of that name from another group is not checkpointer's migration.
    other = {"metadata": {"ownerReferences": [{"apiVersion": "example.com/v1", "kind": "ContainerMigration"}]}}
    assert not streams_parts(other)


def test_only_the_parts_that_landed_in_order_are_published() -> None:
    stream = Stream("web", "default/m-1/web.tar.zst", 8)
    stream.landed |= {0: "a", 2: "c"}
    assert stream.entry()["digests"] == ["a"], "part 2 waits for part 1"
    stream.landed[1] = "b"
    stream.size = 20
    assert stream.entry() == {
        "container": "web",
        "key": "default/m-1/web.tar.zst",
        "partSize": 8,
        "digests": ["a", "b", "c"],
        "size": 20,
    }


def _body(streams: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {"spec": spec, "status": {"streams": streams}}


def test_the_restore_reads_the_stream_of_its_container() -> None:
    web = {"container": "web", "key": "k/web.tar", "partSize": 8, "digests": ["a"]}
    db = {"container": "db", "key": "k/db.tar", "partSize": 8, "digests": []}
    assert chosen_stream(_body([web, db], containers=["web", "db"]), "db") == StreamView.of(db)
    # Two containers and none named: which is the restore's is said once the checkpoint Succeeded.
    assert chosen_stream(_body([web, db], containers=["web", "db"]), "") is None
    assert chosen_stream(_body([web], containers=["web"]), "") == StreamView.of(web)
    assert chosen_stream(_body([], containers=["web"]), "") is None


def test_the_count_of_parts_is_known_once_the_size_is() -> None:
    view = StreamView.of({"container": "web", "key": "k", "partSize": 8, "digests": ["a", "b"]})
    assert view.count() is None
    assert StreamView.of({"key": "k", "partSize": 8, "digests": ["a", "b"], "size": 16}).count() == 2
    assert StreamView.of({"key": "k", "partSize": 8, "digests": ["a", "b"], "size": 9}).count() == 2
    assert StreamView.of({"key": "k", "partSize": 8, "digests": ["a"], "size": 0}).count() == 1


def test_a_restore_streams_a_checkpoint_it_saw_succeed_first_when_every_part_was_published() -> None:
    whole = StreamView.of({"container": "web", "key": "k/web.tar.zst", "partSize": 8, "digests": ["a"], "size": 5})
    assert followable(whole, succeeded=False) and followable(whole, succeeded=True)
    # Running: a first part is enough; Succeeded: an incomplete record is downloaded the usual way.
    started = StreamView.of({"container": "web", "key": "k/web.tar.zst", "partSize": 8, "digests": ["a"]})
    assert followable(started, succeeded=False) and not followable(started, succeeded=True)
    nothing = StreamView.of({"container": "web", "key": "k/web.tar.zst", "partSize": 8, "digests": []})
    assert not followable(nothing, succeeded=False)
    assert not followable(StreamView.of({"key": "k/web.manifest", "partSize": 8, "digests": ["a"]}), succeeded=False)


class _SucceededWithOnePart:
    """A followed checkpoint that Succeeded with one part published of an archive whose size it never said."""

    name = "ccp"

    def read(self, fresh_within: float = 0.0) -> dict[str, Any]:
        part = hashlib.sha256(b"abcd").hexdigest()
        stream = {"container": "web", "key": "k/web.tar.zst", "partSize": 4, "digests": [part]}
        return {"status": {"phase": "Succeeded", "streams": [stream]}}

    def phase(self) -> str:
        return "Succeeded"


class _Parts:
    def read_part(self, key: str, number: int, start: int, length: int) -> bytearray:
        return bytearray(b"abcd")

    def uri(self, key: str) -> str:
        return f"s3://bucket/{key}"


def test_a_stream_whose_checkpoint_succeeded_without_its_last_parts_fails_instead_of_waiting() -> None:
    streamed = Streamed.__new__(Streamed)
    streamed.checkpoint = _SucceededWithOnePart()  # type: ignore[assignment]
    streamed.store = _Parts()  # type: ignore[assignment]
    streamed.key, streamed.container, streamed.flow = "k/web.tar.zst", "web", _Flow()
    streamed.status = SimpleNamespace(progress=lambda *_: None)  # type: ignore[assignment]
    parts = streamed._parts()
    assert next(parts) == b"abcd"
    with pytest.raises(Failure) as failed:
        next(parts)
    assert failed.value.reason == Reason.ARCHIVE_NOT_FOUND and "no more to come" in str(failed.value)


class _Archive:
    """A followed checkpoint streaming `data` in parts of 4 bytes, with what its spool published for them."""

    name = "ccp"

    def __init__(self, tmp: Any, data: bytes) -> None:
        spool = GrowingFile(tmp / "spool", 4)
        spooling.write([data], spool, Compression.NONE, 0)
        count = -(-len(data) // 4)
        self.prefixes = [spool.prefix_sha256(i) for i in range(count)]
        self.stored = bytearray(data)

    def read(self, fresh_within: float = 0.0) -> dict[str, Any]:
        size = len(self.stored)
        stream = {"container": "web", "key": "k/web.tar", "partSize": 4, "digests": self.prefixes, "size": size}
        return {"status": {"phase": "Running", "streams": [stream]}}

    def phase(self) -> str:
        return "Running"

    def read_part(self, key: str, number: int, start: int, length: int) -> bytearray:
        return self.stored[start : start + length]

    def uri(self, key: str) -> str:
        return f"s3://bucket/{key}"


def _streamed(archive: _Archive) -> Streamed:
    streamed = Streamed.__new__(Streamed)
    streamed.checkpoint = archive  # type: ignore[assignment]
    streamed.store = archive  # type: ignore[assignment]
    streamed.key, streamed.container, streamed.flow = "k/web.tar", "web", _Flow()
    streamed.status = SimpleNamespace(progress=lambda *_: None)  # type: ignore[assignment]
    return streamed


def test_each_part_is_checked_with_the_archives_sha256_up_to_its_end(tmp_path: Any) -> None:
    data = b"abcdefghij"
    archive = _Archive(tmp_path, data)
    # What the spool publishes per part is the sha256 of the archive so far; the last is the whole's.
    assert archive.prefixes == [hashlib.sha256(data[:end]).hexdigest() for end in (4, 8, 10)]
    streamed = _streamed(archive)
    assert b"".join(streamed._parts()) == data
    assert streamed.flow.digest == hashlib.sha256(data).hexdigest() and streamed.flow.size == len(data)


def test_a_part_changed_in_the_bucket_stops_the_stream_before_its_bytes_go_on(tmp_path: Any) -> None:
    archive = _Archive(tmp_path, b"abcdefghij")
    archive.stored[5:6] = b"X"
    parts = _streamed(archive)._parts()
    assert next(parts) == b"abcd"
    with pytest.raises(Failure) as failed:
        next(parts)
    assert failed.value.reason == Reason.ARCHIVE_CORRUPT and "part 2" in str(failed.value)
