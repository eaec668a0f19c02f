"""The one way checkpointer runs a program: an argv list, never a shell, always a timeout."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Sequence

from checkpointer.errors import CommandError

log = logging.getLogger(__name__)


def run(argv: Sequence[str], *, timeout: float, input: bytes | None = None) -> str:
    """Run to completion; return stdout, or raise CommandError with argv, exit code and stderr."""
    argv = list(argv)
    log.debug("running %s", argv)
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, input=input, check=False)
    except subprocess.TimeoutExpired as e:
        raise CommandError(argv, -1, f"timed out after {timeout}s") from e
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc.stdout.decode(errors="replace")


def spawn(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """Start a program whose output the caller streams; the caller waits for it with a timeout."""
    log.debug("starting %s", list(argv))
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], argv: Sequence[str], timeout: float) -> str:
    """Wait for a spawned program; return stdout or raise CommandError."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise CommandError(list(argv), -1, f"timed out after {timeout}s") from e
    if proc.returncode != 0:
        raise CommandError(list(argv), proc.returncode, stderr.decode(errors="replace"))
    return stdout.decode(errors="replace")
