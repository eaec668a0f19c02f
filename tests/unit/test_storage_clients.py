"""S3 clients and CA files: one client per storage configuration, no file left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from checkpointer.adapters import storage as adapter
from checkpointer.adapters.storage import CaFiles, Credentials
from checkpointer.archive import store as store_module
from checkpointer.archive.store import RateLimiter, Stores, Transfer
from checkpointer.models import CheckpointStorage

CA = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUP\n-----END CERTIFICATE-----\n"


def storage(**spec: Any) -> CheckpointStorage:
    return CheckpointStorage.model_validate(
        {"metadata": {"name": "archive"}, "spec": {"bucket": "checkpoints", "endpoint": "https://s3.test", **spec}}
    )


class Secrets:
    """The one call Stores makes to the API server: the storage's credentials."""

    def __init__(self) -> None:
        self.credentials = Credentials("AKIDTEST", "secret-test")

    def credentials_of(self, _: CheckpointStorage) -> Credentials:
        return self.credentials


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[CheckpointStorage]:
    calls: list[CheckpointStorage] = []

    def client(storage: CheckpointStorage, credentials: Credentials | None, max_connections: int = 10) -> object:
        calls.append(storage)
        return object()

    monkeypatch.setattr(store_module, "client", client)
    return calls


def stores(secrets: Secrets) -> Stores:
    kube: Any = type("Kube", (), {"credentials": staticmethod(secrets.credentials_of)})()
    return Stores(kube, Transfer(8 * 2**20, 2, RateLimiter(0), RateLimiter(0)))


def test_validating_a_storage_again_reuses_its_client(made: list[CheckpointStorage]) -> None:
    secrets = Secrets()
    s = stores(secrets)
    for _ in range(60):  # an hour of validations
        s.of(storage())
    assert len(made) == 1


def test_a_changed_storage_or_rotated_credentials_replace_the_client(made: list[CheckpointStorage]) -> None:
    secrets = Secrets()
    s = stores(secrets)
    first = s.of(storage())
    secrets.credentials = Credentials("AKIDNEW", "secret-new")
    second = s.of(storage())
    third = s.of(storage(prefix="elsewhere"))
    assert len(made) == 3
    assert third.prefix == "elsewhere"
    assert first._s3 is not second._s3
    assert len(s._clients) == 1, "the old clients are let go"


def test_a_ca_bundle_is_one_private_file_removed_with_the_process(tmp_path: Path) -> None:
    files = CaFiles()
    first = Path(files.path(CA))
    assert files.path(CA) == str(first), "the same bundle, the same file"
    assert first.read_text() == CA
    other = Path(files.path(CA.replace("MIIB", "MIIC")))
    assert other != first
    assert {p.name for p in first.parent.iterdir()} == {first.name, other.name}
    assert first.parent.stat().st_mode & 0o077 == 0, "a private folder"
    files.remove()
    assert not first.parent.exists()


def test_a_client_with_a_ca_bundle_makes_no_new_file_per_client() -> None:
    before = Path(adapter.CA_FILES.path(CA)).parent
    count = len(list(before.iterdir()))
    for _ in range(5):
        adapter.client(storage(caBundle=CA), Credentials("AKIDTEST", "secret-test"))
    assert len(list(before.iterdir())) == count


def test_credentials_never_print() -> None:
    credentials = Credentials("AKIDTEST", "secret-test")
    assert "AKIDTEST" not in repr(credentials)
    assert "secret-test" not in f"{credentials!r} {credentials}"
