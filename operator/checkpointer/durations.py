"""Go durations (`90s`, `1h30m`, `168h`), the form Kubernetes APIs use for spans of time.

The CRDs check the same pattern at admission (DURATION_PATTERN), so a parse error here means an
object written before the pattern existed.
"""

from __future__ import annotations

import re
from datetime import timedelta

# Go's units; a day is not one (it is not always 24 hours).
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TERM = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
DURATION_PATTERN = r"^(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h))+$"


def parse_duration(text: str) -> timedelta:
    """The span a non-negative Go duration names; ValueError for anything else."""
    seconds, end = 0.0, 0
    for term in _TERM.finditer(text):
        if term.start() != end:
            break
        seconds += float(term.group(1)) * _UNITS[term.group(2)]
        end = term.end()
    if not text or end != len(text):
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 1h30m or 168h")
    return timedelta(seconds=seconds)


def format_duration(span: timedelta) -> str:
    """A span as Go prints it, whole seconds only (`1h30m0s`), for messages and status."""
    total = int(span.total_seconds())
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
