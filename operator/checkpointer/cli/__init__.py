"""`kubectl checkpointer`: the kubectl plugin (docs/kubectl-plugin.md)."""

from __future__ import annotations


def main() -> None:
    from checkpointer.cli.commands import cli

    cli(prog_name="kubectl checkpointer")
