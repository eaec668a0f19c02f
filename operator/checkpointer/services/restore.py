"""The agent's side of a ContainerRestore (filled in by the restore work)."""

from __future__ import annotations

from typing import Any

from checkpointer.services.agent import Agent


def run(agent: Agent, body: dict[str, Any]) -> None:
    raise NotImplementedError
