"""Reading an archive's config.dump and spec.dump with bounded memory: oversized members, enormous
or crafted extended headers and endless member lists end in CorruptArchive before they are read."""

from __future__ import annotations

import io
import json
import tarfile
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from checkpointer.archive.codec import (
    DUMP_LIMIT,
    EXTENDED_HEADER_LIMIT,
    EXTENDED_HEADERS_LIMIT,
    CorruptArchive,
    read_configuration,
)

MiB = 1024 * 1024
CONFIG = {"name": "web", "rootfsImageName": "localhost/counter:latest"}
SPEC = {"ociVersion": "1.2.0", "process": {"capabilities": {"bounding": ["CAP_CHOWN"]}}}


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _member(name: str, data: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    return _header(name, len(data), kind) + _padded(data)


def _write(path: Path, parts: Iterable[bytes]) -> Path:
    with path.open("wb") as out:
        for part in parts:
            out.write(part)
        out.write(b"\0" * 2 * tarfile.BLOCKSIZE)
    return path


def _dumps(config: object = CONFIG, spec: object = SPEC) -> list[bytes]:
    return [_member("config.dump", json.dumps(config).encode()), _member("spec.dump", json.dumps(spec).encode())]


def _peak(read: Callable[[], object]) -> int:
    """Bytes Python allocated at most while `read` ran."""
    tracemalloc.start()
    try:
        read()
    except CorruptArchive:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_reads_both_dumps_of_a_podman_style_archive(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [
            ("checkpoint/pages-1.img", b"p" * 70000),
            ("./config.dump", json.dumps(CONFIG).encode()),
            ("spec.dump", json.dumps(SPEC).encode()),
            # a name past 100 bytes: a small pax header, as Go's writer makes one
            ("checkpoint/" + "n" * 150, b"x"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for whole in (False, True):
        found = read_configuration(path, whole)
        assert found.config == CONFIG
        assert found.spec == SPEC


def test_reads_a_gzip_archive(tmp_path: Path) -> None:
    plain = _write(tmp_path / "a.tar", _dumps())
    path = tmp_path / "a.tar.gz"
    import gzip

    path.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_configuration(path, whole=True).spec == SPEC


@pytest.mark.parametrize("name", ["config.dump", "spec.dump"])
def test_an_oversized_dump_is_refused_without_being_read(tmp_path: Path, name: str) -> None:
    size = 64 * MiB
    path = tmp_path / "big.tar"
    with path.open("wb") as out:
        out.write(_member("config.dump" if name == "spec.dump" else "spec.dump", b"{}"))
        out.write(_header(name, size))
        block = b"[" + b" " * (MiB - 1)
        for _ in range(size // MiB):
            out.write(block)
            block = b" " * MiB
        out.write(b"\0" * 2 * tarfile.BLOCKSIZE)
    with pytest.raises(CorruptArchive, match=f"{name} has {size} bytes, more than {DUMP_LIMIT}"):
        read_configuration(path, whole=False)
    assert _peak(lambda: read_configuration(path, whole=True)) < MiB


def test_an_enormous_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    size = 32 * MiB
    record = b"%d comment=" % size
    body = record + b"a" * (size - len(record) - 1) + b"\n"
    assert len(body) == size
    path = _write(tmp_path / "pax.tar", [_header("././@PaxHeader", size, tarfile.XHDTYPE), body, *_dumps()])
    with pytest.raises(CorruptArchive, match=f"extended tar header of {size} bytes"):
        read_configuration(path, whole=False)
    assert _peak(lambda: read_configuration(path, whole=False)) < MiB

    # Python's own reader takes the whole header into memory: what the bound is there for.
    def unbounded() -> None:
        with tarfile.open(path) as tar:
            tar.getmembers()

    assert _peak(unbounded) > size


def test_an_enormous_gnu_long_name_is_refused(tmp_path: Path) -> None:
    size = 8 * MiB
    path = _write(tmp_path / "long.tar", [_header("././@LongLink", size, tarfile.GNUTYPE_LONGNAME), b"n" * size])
    with pytest.raises(CorruptArchive, match="extended tar header"):
        read_configuration(path, whole=False)
    assert _peak(lambda: read_configuration(path, whole=False)) < MiB


def test_extended_headers_of_one_archive_are_capped_together(tmp_path: Path) -> None:
    def pax(i: int) -> bytes:
        body = b"%05d comment=" % 60000
        body += b"c" * (60000 - len(body) - 1) + b"\n"
        return _member("././@PaxHeader", body, tarfile.XHDTYPE) + _member(f"checkpoint/f{i}", b"x")

    count = EXTENDED_HEADERS_LIMIT // 60000 + 1
    path = _write(tmp_path / "many.tar", [*(pax(i) for i in range(count)), *_dumps()])
    with pytest.raises(CorruptArchive, match="extended tar headers take more than"):
        read_configuration(path, whole=False)


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path) -> None:
    chain = [_member("././@PaxHeader", b"12 path=abc\n", tarfile.XHDTYPE) for _ in range(5000)]
    path = _write(tmp_path / "chain.tar", [*chain, *_dumps()])
    with pytest.raises(CorruptArchive, match="in a row"):
        read_configuration(path, whole=False)


@pytest.mark.parametrize(
    "body",
    [
        # Every record claims 2 bytes, and Python's reader looks for "=" past each record's end:
        # keywords of 30 KiB each, 15,000 of them.
        b"2 " * (EXTENDED_HEADER_LIMIT // 2 - 1) + b"=\n",
        # A run of digits: Python before 3.11.10 searches it in quadratic time.
        b"1" * (EXTENDED_HEADER_LIMIT - 1) + b"\n",
        b"99 path=short\n",
        b"GNU.sparse.size=1\n",
        b"20 GNU.sparse.size=1\n",
    ],
)
def test_a_malformed_pax_header_is_refused(tmp_path: Path, body: bytes) -> None:
    path = _write(tmp_path / "bad.tar", [_member("././@PaxHeader", body, tarfile.XHDTYPE), *_dumps()])
    started = time.monotonic()
    assert _peak(lambda: read_configuration(path, whole=False)) < MiB
    with pytest.raises(CorruptArchive, match=r"pax header|sparse"):
        read_configuration(path, whole=False)
    assert time.monotonic() - started < 5


def test_many_members_do_not_accumulate_in_memory(tmp_path: Path) -> None:
    empty = _header("checkpoint/f", 0)
    path = _write(tmp_path / "many.tar", [*_dumps(), empty * 50000])
    assert _peak(lambda: read_configuration(path, whole=True)) < 2 * MiB


@pytest.mark.parametrize(
    "parts",
    [
        pytest.param(lambda: [*_dumps(), _member("./config.dump", b"{}")], id="config twice"),
        pytest.param(lambda: [*_dumps(), _member("checkpoint/../spec.dump", b"{}")], id="spec twice"),
        pytest.param(lambda: [_dumps()[0]], id="no spec"),
        pytest.param(lambda: [_dumps()[1]], id="no config"),
        pytest.param(lambda: [_dumps()[0], _header("spec.dump", 0, tarfile.SYMTYPE)], id="spec a symlink"),
        pytest.param(lambda: _dumps(spec=["not", "an", "object"]), id="spec not an object"),
        pytest.param(lambda: [_dumps()[0], _member("spec.dump", b"[" * 100000)], id="spec nested too deep"),
        pytest.param(lambda: [_dumps()[0], _member("spec.dump", b"\xff{}")], id="spec not utf-8"),
    ],
)
def test_an_archive_that_could_show_podman_another_configuration_is_refused(
    tmp_path: Path, parts: Callable[[], list[bytes]]
) -> None:
    path = _write(tmp_path / "a.tar", parts())
    for whole in (False, True):
        with pytest.raises(CorruptArchive):
            read_configuration(path, whole)


def test_a_sparse_member_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "sparse.tar", [*_dumps(), _header("checkpoint/s", 0, tarfile.GNUTYPE_SPARSE)])
    with pytest.raises(CorruptArchive, match="sparse"):
        read_configuration(path, whole=False)
