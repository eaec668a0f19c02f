"""When a finished ContainerCheckpoint or ContainerRestore expires: completionTime + ttl. Pure.

The ttl is the object's `spec.ttl`, or the controller's default (CHECKPOINTER_DEFAULT_TTL) for an
object that names none. Both are Go durations (durations.py); the CRDs check the pattern.
"""

from __future__ import annotations

import datetime
from typing import Any

from checkpointer.conditions import format_time, parse_time
from checkpointer.durations import parse_duration
from checkpointer.models import ObjectStatus
from checkpointer.reasons import FINISHED


def ttl_of(obj: dict[str, Any], default: str) -> str:
    """The object's ttl, or the default; '' when neither names one."""
    return str((obj.get("spec") or {}).get("ttl") or default or "")


def expiration(completion_time: str, ttl: str) -> str | None:
    """completionTime + ttl, rounded up to the second; None without a ttl, or with one that does not parse."""
    completed = parse_time(completion_time)
    if completed is None or not ttl:
        return None
    try:
        span = parse_duration(ttl)
    except ValueError:
        return None
    moment = completed + span
    if moment.microsecond:  # never before completionTime + ttl
        moment = moment.replace(microsecond=0) + datetime.timedelta(seconds=1)
    return format_time(moment)  # whole seconds: what status.expiration holds


def desired_expiration(obj: dict[str, Any], default: str) -> str | None:
    """The expiration a finished object should carry; None for one that is not finished or has no ttl."""
    status = ObjectStatus.of(obj)
    if status.phase not in FINISHED:
        return None
    return expiration(status.completion_time or "", ttl_of(obj, default))


def seconds_until(expires: str, now: datetime.datetime) -> float:
    """Seconds from `now` until `expires` (negative once past); 0 for a time that does not parse."""
    moment = parse_time(expires)
    return (moment - now).total_seconds() if moment else 0.0
