"""`kubectl checkpointer`: the kubectl plugin (placeholder until the plugin lands)."""

from __future__ import annotations


def main() -> int:
    raise SystemExit("kubectl-checkpointer: not built yet")
