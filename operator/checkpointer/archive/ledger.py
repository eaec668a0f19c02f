"""What the agent started on its node that may outlive an object's work folder.

Two lists in one file at the spool's root, beside the per-object folders rather than in them, so
that they survive a folder's loss: the multipart uploads this agent opened, and the local
checkpoints (CRIU's images and logs in a container's folder) that `keep: true` left on the node. The
sweep (services/sweep.py) reads it and ends what no live object needs any more.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from checkpointer.archive.workfolder import read_json, write_json

NAME = ".ledger.json"


@dataclass(frozen=True)
class OpenUpload:
    """A multipart upload this agent opened for an object."""

    uid: str
    storage: str
    key: str
    upload_id: str


@dataclass(frozen=True)
class KeptCheckpoint:
    """A local checkpoint `keep: true` left in a container's folder: the container's id names it."""

    uid: str
    kind: str  # checkpoint or restore (workfolder.CHECKPOINT, workfolder.RESTORE)
    container_id: str
    # False for a checkpoint without export: the local checkpoint is then all there is of it.
    exported: bool = True


class Ledger:
    def __init__(self, root: Path) -> None:
        self.path = root / NAME
        self._lock = threading.Lock()

    def _load(self) -> tuple[list[OpenUpload], list[KeptCheckpoint]]:
        raw: Any = read_json(self.path) or {}
        try:
            uploads = [OpenUpload(**u) for u in raw.get("uploads", [])]
            kept = [KeptCheckpoint(**k) for k in raw.get("keptCheckpoints", [])]
        except (TypeError, AttributeError):
            return [], []
        return uploads, kept

    def _save(self, uploads: list[OpenUpload], kept: list[KeptCheckpoint]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"uploads": [asdict(u) for u in uploads], "keptCheckpoints": [asdict(k) for k in kept]})

    def uploads(self) -> list[OpenUpload]:
        with self._lock:
            return self._load()[0]

    def kept(self) -> list[KeptCheckpoint]:
        with self._lock:
            return self._load()[1]

    def add_upload(self, upload: OpenUpload) -> None:
        with self._lock:
            uploads, kept = self._load()
            if upload not in uploads:
                self._save([*uploads, upload], kept)

    def add_kept(self, entry: KeptCheckpoint) -> None:
        with self._lock:
            uploads, kept = self._load()
            if entry not in kept:
                self._save(uploads, [*kept, entry])

    def upload_done(self, uid: str, key: str) -> None:
        """The upload of `key` is completed (or aborted): it is no longer open."""
        with self._lock:
            uploads, kept = self._load()
            left = [u for u in uploads if (u.uid, u.key) != (uid, key)]
            if len(left) != len(uploads):
                self._save(left, kept)

    def drop(self, uploads: Sequence[OpenUpload] = (), kept: Sequence[KeptCheckpoint] = ()) -> None:
        if not uploads and not kept:
            return
        with self._lock:
            now_uploads, now_kept = self._load()
            self._save([u for u in now_uploads if u not in uploads], [k for k in now_kept if k not in kept])
