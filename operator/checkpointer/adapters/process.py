"""The one way checkpointer runs a program: an argv list, never a shell, always a timeout."""

from __future__ import annotations

import ctypes
import logging
import signal
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
        raise CommandError(argv, -1, f"timed out after {timeout}s", timed_out=True) from e
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc.stdout.decode(errors="replace")


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: Sequence[str], die_with_parent: bool = False) -> subprocess.Popen[bytes]:
    """Start a program whose output the caller streams; the caller waits for it with a timeout.

    `die_with_parent`: the kernel kills the program when the thread that started it ends, the agent
    killed included, so that nothing it started outlives the reader of its output.
    """
    log.debug("starting %s", list(argv))
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent if die_with_parent else None,
    )


def finish(proc: subprocess.Popen[bytes], argv: Sequence[str], timeout: float) -> str:
    """Wait for a spawned program; return stdout or raise CommandError."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise CommandError(list(argv), -1, f"timed out after {timeout}s", timed_out=True) from e
    if proc.returncode != 0:
        raise CommandError(list(argv), proc.returncode, stderr.decode(errors="replace"))
    return stdout.decode(errors="replace")
