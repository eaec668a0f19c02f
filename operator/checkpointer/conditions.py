"""Status building: pure functions over the typed status, conditions in the metav1.Condition shape."""

from __future__ import annotations

import datetime
from typing import Any

from checkpointer.models import Condition, PhasedStatus
from checkpointer.reasons import ConditionType, Phase, Reason


def format_time(moment: datetime.datetime, precise: bool = False) -> str:
    """RFC 3339 in UTC. `precise` keeps microseconds, as startTime and completionTime do: many
    checkpoints take less than a second, and the time to pickup is measured from startTime."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if precise else "%Y-%m-%dT%H:%M:%SZ")


def now(precise: bool = False) -> str:
    return format_time(datetime.datetime.now(datetime.UTC), precise)


def parse_time(text: str | None) -> datetime.datetime | None:
    """An RFC 3339 time as status and the API server write it (with or without a fraction), in UTC;
    None for nothing or for text that is not one."""
    if not text:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(datetime.UTC) if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def set_condition(
    conditions: list[Condition],
    type_: ConditionType,
    status: bool,
    reason: Reason,
    message: str,
    generation: int,
) -> list[Condition]:
    """Return conditions with `type_` set; lastTransitionTime moves only when the status flips."""
    status_text = "True" if status else "False"
    previous = next((c for c in conditions if c.type == type_), None)
    kept = previous.last_transition_time if previous and previous.status == status_text else None
    updated = Condition(
        type=str(type_),
        status=status_text,
        reason=str(reason),
        message=message[:32000],
        last_transition_time=kept or now(),
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type_] + [updated]


def phase_patch(
    status: PhasedStatus, phase: Phase, reason: Reason, message: str, generation: int, scheduled: bool | None = None
) -> dict[str, Any]:
    """The status fields that move together with a phase, by field name: the Ready condition (and the
    Scheduled one, when `scheduled` says), the observed generation and the completion time."""
    conditions = set_condition(
        status.conditions, ConditionType.READY, phase == Phase.SUCCEEDED, reason, message, generation
    )
    if scheduled is not None:
        conditions = set_condition(conditions, ConditionType.SCHEDULED, scheduled, reason, message, generation)
    patch: dict[str, Any] = {"phase": str(phase), "observed_generation": generation, "conditions": conditions}
    if phase.finished:
        patch["completion_time"] = now(precise=True)
    return patch
