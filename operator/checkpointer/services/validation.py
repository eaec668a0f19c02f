"""Keeping CheckpointStorage.status true: can the controller reach the bucket with its credentials,
and is its prefix its own?"""

from __future__ import annotations

from collections.abc import Iterable

from checkpointer.archive.store import StorageError, Stores
from checkpointer.conditions import now
from checkpointer.models import CheckpointStorage, StorageStatus


def validate(stores: Stores, storage: CheckpointStorage, others: Iterable[CheckpointStorage] = ()) -> StorageStatus:
    """The status to write: Available when the bucket answers and no older storage on the same bucket
    nests with this one's prefix (see nested_with), Unavailable with a reason otherwise."""
    older = nested_with(storage, others)
    if older is not None:
        return _status("Unavailable", nesting_message(storage, older))
    try:
        stores.of(storage).reachable()
    except StorageError as e:
        return _status("Unavailable", f"bucket {storage.spec.bucket!r} is not reachable: {e}")
    except Exception as e:  # a missing Secret or key, a bad CA bundle: all mean Unavailable
        return _status("Unavailable", f"{type(e).__name__}: {e}")
    return _status("Available", f"bucket {storage.spec.bucket!r} is reachable")


def location(storage: CheckpointStorage) -> tuple[str, str]:
    """The bucket a storage names, as (endpoint, bucket): storages with the same one share its keys. Pure."""
    return (storage.spec.endpoint or "").strip().rstrip("/").lower(), storage.spec.bucket


def prefixes_nest(a: str, b: str) -> bool:
    """Whether one prefix lies strictly inside the other (`""` holds every other). Pure.

    Equal prefixes do not nest: namespace N's folder is then one and the same folder through either
    storage, so no namespace reaches another's. Nested ones do: through the outer storage, export.key
    `team-b/x` in namespace `team-a` is inside the inner storage's folder of namespace team-b when
    the inner prefix is `team-a`.
    """
    a, b = a.strip("/"), b.strip("/")
    if a == b:
        return False
    return not a or not b or a.startswith(f"{b}/") or b.startswith(f"{a}/")


def _seniority(storage: CheckpointStorage) -> tuple[str, str]:
    return storage.metadata.creation_timestamp or "", storage.metadata.name


def nested_with(storage: CheckpointStorage, others: Iterable[CheckpointStorage]) -> CheckpointStorage | None:
    """The oldest other storage on the same endpoint and bucket whose prefix contains `storage`'s or lies
    inside it, when `storage` is the younger of the two (created later; ties by name); None otherwise.

    Only the younger one is refused, so that a storage in use keeps working when a nesting one is added. Pure.
    """
    for other in sorted(others, key=_seniority):
        if other.metadata.name == storage.metadata.name or location(other) != location(storage):
            continue
        if prefixes_nest(storage.spec.prefix, other.spec.prefix) and _seniority(other) < _seniority(storage):
            return other
    return None


def nesting_message(storage: CheckpointStorage, older: CheckpointStorage) -> str:
    def shown(prefix: str) -> str:
        return repr(prefix.strip("/")) if prefix.strip("/") else "'' (the whole bucket)"

    return (
        f"prefix {shown(storage.spec.prefix)} nests with prefix {shown(older.spec.prefix)} of CheckpointStorage "
        f"{older.metadata.name} on the same bucket {storage.spec.bucket!r}: one namespace's folder would lie inside "
        "another's. Give this storage a prefix that neither contains nor lies inside another storage's on this "
        "bucket (an equal prefix is fine), or another bucket"
    )


def _status(phase: str, message: str) -> StorageStatus:
    return StorageStatus(phase=phase, message=message[:1000], last_validated_time=now())
