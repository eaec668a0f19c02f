"""What faults leave on a node, cleared: work folders of objects that are gone or done, abandoned uploads.

An object's folder normally goes with the object's last step. It outlives it when the agent was
killed at the wrong moment (between the object's last status write and the folder's removal), when
the object was deleted while this agent was down, or on purpose: a failed checkpoint may keep its
spool (an upload past its deadline) for as long as its object exists.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from checkpointer import NODE_LABEL
from checkpointer.adapters.kube import CHECKPOINTS, RESTORES
from checkpointer.archive.store import StorageError
from checkpointer.archive.workfolder import WorkFolder
from checkpointer.errors import Failure
from checkpointer.models import NameRef
from checkpointer.reasons import Phase
from checkpointer.services.node import Node

log = logging.getLogger(__name__)


def sweep(node: Node) -> None:
    root = node.settings.spool_dir
    # Folders first, objects second: a folder made after the listing belongs to an object that the
    # listing of objects then includes, so no live object's folder is taken for an orphan.
    folders = {path: uid for path in root.iterdir() if (uid := WorkFolder.uid_of(path))}
    if not folders:
        return
    selector = f"{NODE_LABEL}={node.settings.node_name}"
    phases = node.kube.phases(CHECKPOINTS, selector) | node.kube.phases(RESTORES, selector)
    for path, uid in folders.items():
        folder = WorkFolder(path)
        gone = uid not in phases
        _abort_abandoned(node, folder, gone=gone)
        if gone or phases[uid] == Phase.SUCCEEDED:
            log.info("removing %s: its object is %s", path, "gone" if gone else "done")
            folder.remove()


def _abort_abandoned(node: Node, folder: WorkFolder, gone: bool) -> None:
    """Abort the uploads a deadline or a deletion left open, once their storage answers."""
    for container, state in folder.upload_states().items():
        if not (state.abandoned or (gone and state.upload_id)):
            continue
        try:
            node.store(NameRef(name=state.storage)).abort_uploads(state.key)
        except (Failure, *StorageError) as e:
            log.info("the upload of %s stays open for now: %s", state.key, e)
            continue
        log.info("aborted the open upload of %s", state.key)
        if not gone:
            folder.save_upload_state(container, replace(state, abandoned=False))
