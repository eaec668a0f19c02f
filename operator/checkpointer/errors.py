"""Typed errors: permanent ones end the object in Failed, temporary ones are retried by kopf."""

from __future__ import annotations

import kopf

from checkpointer.reasons import Reason


class Failure(kopf.PermanentError):
    """The object cannot succeed; it ends in phase Failed with this reason and message."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Retry(kopf.TemporaryError):
    """Something outside us is not ready yet; kopf calls the handler again after `delay`."""

    def __init__(self, reason: Reason, message: str, delay: float = 10.0) -> None:
        super().__init__(message, delay=delay)
        self.reason = reason
        self.message = message


class CommandError(Exception):
    """A subprocess failed; carries what a person needs to see why."""

    def __init__(self, argv: list[str], returncode: int, stderr: str, timed_out: bool = False) -> None:
        super().__init__(f"{' '.join(argv)} exited {returncode}: {stderr.strip()[-4000:]}")
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.timed_out = timed_out
