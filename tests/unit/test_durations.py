"""Go durations, as the CRDs' ttl and retention.maxAge carry them."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest

from checkpointer.durations import DURATION_PATTERN, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("90s", timedelta(seconds=90)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("168h", timedelta(days=7)),
        ("1.5h", timedelta(minutes=90)),
        ("500ms", timedelta(milliseconds=500)),
        ("0s", timedelta()),
        ("2h45m30s", timedelta(hours=2, minutes=45, seconds=30)),
    ],
)
def test_parses_what_go_parses(text: str, span: timedelta) -> None:
    assert parse_duration(text) == span
    assert re.match(DURATION_PATTERN, text)


@pytest.mark.parametrize("text", ["", "7d", "1h 30m", "-5m", "m", "10", "1h30", "h1"])
def test_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)
    assert not re.match(DURATION_PATTERN, text)


def test_formats_whole_seconds() -> None:
    assert format_duration(timedelta(hours=1, minutes=30)) == "1h30m0s"
    assert format_duration(timedelta(seconds=75)) == "1m15s"
    assert format_duration(timedelta(seconds=5)) == "5s"
