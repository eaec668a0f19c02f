"""Starting and stopping the environment's long-running processes.

Every process runs in its own session (process group) with its output in a log file, so a failed
test can show the log and a teardown can end the whole group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(
    os.environ.get("CHECKPOINTER_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "checkpointer"
)
BIN = CACHE / "bin"


class LocalEnvError(RuntimeError):
    """A part of the local environment could not be started."""


class ProcessExited(LocalEnvError):
    """A process that a wait is for has exited: waiting longer cannot help."""


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 120,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a short command; on failure raise with argv, exit code and stderr."""
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        input=input,
    )
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace")[-2000:]
        raise LocalEnvError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {stderr}")
    return proc


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str, probe: Callable[[], bool], timeout: float = 60, interval: float = 0.2, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return
        except ProcessExited:  # the probe knows it can never succeed
            raise
        except Exception:  # the probe is expected to fail until the thing is up
            pass
        time.sleep(interval)
    tail = ""
    if log is not None and log.exists():
        tail = "\n--- " + str(log) + " ---\n" + log.read_text(errors="replace")[-3000:]
    raise LocalEnvError(f"timed out after {timeout}s waiting for {what}{tail}")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    # When terminate() asked it to stop (monotonic), if it did.
    terminated_at: float | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        """SIGTERM to its group, without waiting; stop() then waits for what is left of the grace."""
        if self.terminated_at is None:
            self.terminated_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self, grace: float = 10) -> None:
        """SIGTERM, and SIGKILL once `grace` seconds have passed since the SIGTERM."""
        if self.popen.poll() is not None:
            return
        self.terminate()
        assert self.terminated_at is not None
        try:
            self.popen.wait(max(0.0, self.terminated_at + grace - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@dataclass
class Supervisor:
    """Owns the processes of one environment; stops them in reverse order of start."""

    log_dir: Path
    processes: list[Process] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Process:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        proc = Process(name, popen, log)
        self.processes.append(proc)
        return proc

    def stop(self, name: str) -> None:
        for proc in self.processes:
            if proc.name == name:
                proc.stop()
        self.processes = [p for p in self.processes if p.name != name]

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()


def require(present: bool, message: str) -> None:
    """A missing piece of infrastructure fails the test under CI and skips it elsewhere.

    A skipped test is not a passed test: CI must never go green without the real components.
    """
    if present:
        return
    import pytest

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message} (CI=true: missing infrastructure fails, it does not skip)", pytrace=False)
    pytest.skip(f"{message}; run ./hack/test, which installs it")
