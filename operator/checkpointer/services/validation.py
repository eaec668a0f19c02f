"""Keeping CheckpointStorage.status true: can the controller reach the bucket with its credentials?"""

from __future__ import annotations

from typing import Any

from checkpointer.archive.store import StorageError, Stores
from checkpointer.conditions import now
from checkpointer.models import CheckpointStorage


def validate(stores: Stores, storage: CheckpointStorage) -> dict[str, Any]:
    """The status to write: Available when the bucket answers, Unavailable with a reason otherwise."""
    try:
        stores.of(storage).reachable()
    except StorageError as e:
        return _status("Unavailable", f"bucket {storage.spec.bucket!r} is not reachable: {e}")
    except Exception as e:  # a missing Secret or key, a bad CA bundle: all mean Unavailable
        return _status("Unavailable", f"{type(e).__name__}: {e}")
    return _status("Available", f"bucket {storage.spec.bucket!r} is reachable")


def _status(phase: str, message: str) -> dict[str, Any]:
    return {"phase": phase, "message": message[:1000], "lastValidatedTime": now()}
