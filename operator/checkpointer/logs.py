"""Logging: plain text or one JSON object per line, and the step lines of a checkpoint or restore.

A step line names the object, its node and how long the step took, in one form for every step:

    checkpoint team-a/web-1 uid=0c6f1d2e node=node-a step=export container=web took=1.23s
    checkpoint team-a/web-1 uid=0c6f1d2e node=node-a result=Succeeded reason=Succeeded total=4.56s

With `--log-format json` the same fields are keys of the line's object (`uid` whole there), beside
time, level, logger and message.

A text line is one line whatever its values hold: names, keys and messages come from what tenants
wrote, so control characters and line separators in them are printed as escapes (`\\n`, `\\x1b`).
JSON lines are escaped by JSON itself.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from checkpointer.models import node_of

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The attribute of a LogRecord that carries a step line's fields.
FIELDS = "checkpointer_fields"
# Every attribute a plain LogRecord has: anything else was passed in `extra` and belongs in the JSON.
# Every step line comes from this one logger, whichever process and module writes it.
STEPS = logging.getLogger("checkpointer.steps")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: what the CRDs refuse
# in a tenant's strings, and what could start a line or move a terminal's cursor.
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escaped(text: str) -> str:
    """`text` on one line: each control character or line separator as its escape (`\\n`, `\\x1b`). Pure."""
    return CONTROL.sub(_escape, text)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, one line per record but for a traceback's own lines, whatever its values hold."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escaped(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        # The traceback's lines are its own; the messages of its exceptions are not.
        seen: set[int] = set()
        error = ei[1]
        while isinstance(error, BaseException) and id(error) not in seen:
            seen.add(id(error))
            message = str(error)
            if message != escaped(message):
                text = text.replace(message, escaped(message))
            error = error.__cause__ or error.__context__
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a step line's fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, Mapping):
            line.update(fields)
        # Other `extra` values too, when they are plain: kopf's carry its whole settings object.
        for key, value in record.__dict__.items():
            plain = isinstance(value, str | int | float | bool) or value is None
            if plain and key not in _STANDARD and key not in line and not key.startswith("k8s_"):
                line[key] = value
        ref = getattr(record, "k8s_ref", None)  # kopf's lines about one object name it
        if isinstance(ref, Mapping) and "object" not in line:
            line["object"] = {k: ref[k] for k in ("kind", "namespace", "name", "uid") if ref.get(k)}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _not_a_handler_success(record: logging.LogRecord) -> bool:
    """False for kopf's "Handler '…' succeeded." lines, which its watch-event handlers write for every
    event of every object (thousands a minute at scale); step lines say what was done."""
    return not (
        record.name == "kopf.objects"
        and record.levelno == logging.INFO
        and record.getMessage().endswith("' succeeded.")
    )


def configure(log_format: LogFormat, verbose: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    if not verbose:
        handler.addFilter(_not_a_handler_success)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _text(value: Any) -> str:
    return f"{value:.2f}s" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Steps:
    """The step lines of one ContainerCheckpoint or ContainerRestore ("checkpoint" or "restore")."""

    kind: str
    namespace: str
    name: str
    uid: str
    node: str

    @classmethod
    def of(cls, kind: str, body: Mapping[str, Any]) -> Steps:
        meta = body.get("metadata") or {}
        node = node_of(body)
        namespace, name, uid = (str(meta.get(k) or "") for k in ("namespace", "name", "uid"))
        return cls(kind, namespace, name, uid, node)

    def line(self, **fields: Any) -> None:
        """One INFO line: the object, then `fields` in their order (floats are seconds)."""
        head = f"{self.kind} {self.namespace}/{self.name} uid={self.uid[:8]} node={self.node}"
        text = " ".join([head, *(f"{k}={_text(v)}" for k, v in fields.items())])
        keys = {"kind": self.kind, "namespace": self.namespace, "name": self.name, "uid": self.uid, "node": self.node}
        rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in fields.items()}
        STEPS.info("%s", text, extra={FIELDS: keys | rounded})

    @contextlib.contextmanager
    def step(self, step: str, **fields: Any) -> Iterator[None]:
        """Log the step with its duration once it ends; one that raised says so (`error=`)."""
        started = time.monotonic()
        try:
            yield
        except BaseException as e:
            reason = getattr(e, "reason", None)
            self.line(step=step, **fields, took=time.monotonic() - started, error=str(reason or type(e).__name__))
            raise
        self.line(step=step, **fields, took=time.monotonic() - started)

    def took(self, step: str, since: float, **fields: Any) -> None:
        """Log a step that began at `since` (time.monotonic()) and has just ended."""
        self.line(step=step, **fields, took=time.monotonic() - since)

    def total(self, result: str, reason: str, seconds: float | None) -> None:
        """The last line: the object's final phase and its whole duration."""
        if seconds is None:
            self.line(result=result, reason=reason)
        else:
            self.line(result=result, reason=reason, total=seconds)
