"""Step lines in both log formats, the pure parts of the metrics (docs/metrics.md), and what a
tenant's strings become in a text log line and in the plugin's output (docs/security.md)."""

from __future__ import annotations

import datetime
import io
import json
import logging
from collections.abc import Iterator

import click
import pytest
from rich.console import Console
from rich.table import Table

from checkpointer import logs, metrics
from checkpointer.cli import commands, present
from checkpointer.models import Archive

BODY = {
    "metadata": {"namespace": "team-a", "name": "web-1", "uid": "0c6f1d2e-1111-2222-3333-444455556666"},
    "spec": {"nodeName": "node-a"},
}


@pytest.fixture
def captured(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter() if request.param == "json" else logging.Formatter("%(message)s"))
    logs.STEPS.addHandler(handler)
    logs.STEPS.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logs.STEPS.removeHandler(handler)


@pytest.mark.parametrize("captured", ["text"], indirect=True)
def test_text_step_and_total_lines_name_object_uid_node_and_durations(captured: io.StringIO) -> None:
    steps = logs.Steps.of("checkpoint", BODY)
    steps.line(step="export", container="web", took=1.234)
    steps.total("Succeeded", "Succeeded", 4.5)
    assert captured.getvalue().splitlines() == [
        "checkpoint team-a/web-1 uid=0c6f1d2e node=node-a step=export container=web took=1.23s",
        "checkpoint team-a/web-1 uid=0c6f1d2e node=node-a result=Succeeded reason=Succeeded total=4.50s",
    ]


@pytest.mark.parametrize("captured", ["json"], indirect=True)
def test_json_lines_carry_the_fields_as_keys(captured: io.StringIO) -> None:
    steps = logs.Steps.of("restore", BODY)
    with pytest.raises(RuntimeError), steps.step("download"):
        raise RuntimeError("cut")
    line = json.loads(captured.getvalue().splitlines()[0])
    assert line["level"] == "INFO" and line["logger"] == "checkpointer.steps"
    assert line["message"].startswith("restore team-a/web-1 uid=0c6f1d2e node=node-a step=download took=")
    assert line["time"].endswith("+00:00")
    assert {k: line[k] for k in ("kind", "namespace", "name", "uid", "node", "step", "error")} == {
        "kind": "restore",
        "namespace": "team-a",
        "name": "web-1",
        "uid": BODY["metadata"]["uid"],
        "node": "node-a",
        "step": "download",
        "error": "RuntimeError",
    }
    assert isinstance(line["took"], float)


def test_configure_json_makes_every_line_one_object(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("json", verbose=False)
        logging.getLogger("checkpointer.test").info("hello %s", "there", extra={"node": "node-b"})
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    line = json.loads(capsys.readouterr().err.strip())
    assert (line["message"], line["logger"], line["node"]) == ("hello there", "checkpointer.test", "node-b")


def test_frozen_seconds_reads_criu_statistics_of_each_container() -> None:
    stats = {
        "container_statistics": [
            {"id": "a", "criu_statistics": {"frozen_time": 250000, "freezing_time": 10}},
            {"id": "b", "runtime_checkpoint_duration": 5},
        ]
    }
    assert metrics.frozen_seconds(stats) == [0.25]
    assert metrics.frozen_seconds(None) == []


@pytest.fixture
def existing() -> Iterator[list[metrics.Existing]]:
    """Metrics on, judged by what the test puts in the list (its last entry), read again on every miss."""
    now = [metrics.Existing(frozenset({"node-x"}), frozenset({"unit"}))]
    saved = metrics._State.enabled, metrics._State.bounds
    metrics._State.enabled = True
    try:
        metrics.bound(lambda: now[-1], min_seconds=0)
        yield now
    finally:
        metrics._State.enabled, metrics._State.bounds = saved


def series(metric: object) -> set[tuple[str, ...]]:
    """The label values of every series of `metric` (a histogram's buckets as one)."""
    assert isinstance(metric, metrics.MetricWrapperBase)
    skip = {"le"}
    return {
        tuple(v for k, v in sample.labels.items() if k not in skip)
        for family in metric.collect()
        for sample in family.samples
    }


def test_byte_counter_adds_each_parts_bytes_once(existing: list[metrics.Existing]) -> None:
    counter = metrics.UPLOADED
    advance = metrics.byte_counter(counter, "node-x", "unit")
    for done in (8, 16, 16, 20):  # a repeated total adds nothing
        advance(done)
    assert counter.labels("node-x", "unit")._value.get() == 20


def test_made_up_nodes_and_storages_are_counted_under_one_value(existing: list[metrics.Existing]) -> None:
    metrics.CHECKPOINTS.clear()
    for i in range(30):
        archives = [Archive(container="web", size=2**20, stats={"container_statistics": []})]
        metrics.finished("containercheckpoints", "team-a", f"made-up-{i}", "Failed", "NodeNotFound", archives, 1.0)
        metrics.byte_counter(metrics.UPLOADED, f"made-up-{i}", f"bucket-{i}")(1)
    metrics.finished("containercheckpoints", "team-a", "node-x", "Succeeded", "Succeeded", [], 1.0)
    assert series(metrics.CHECKPOINTS) == {
        ("team-a", metrics.OTHER, "Failed", "NodeNotFound"),
        ("team-a", "node-x", "Succeeded", "Succeeded"),
    }
    assert metrics.CHECKPOINTS.labels("team-a", metrics.OTHER, "Failed", "NodeNotFound")._value.get() == 30
    assert not {v for labels in series(metrics.UPLOADED) for v in labels} & {f"bucket-{i}" for i in range(30)}


def test_a_node_whose_agent_came_up_since_the_last_read_is_named(existing: list[metrics.Existing]) -> None:
    existing.append(metrics.Existing(frozenset({"node-x", "node-new"}), frozenset({"unit"})))
    metrics.finished("containerrestores", "team-a", "node-new", "Succeeded", "Succeeded", [], None)
    assert ("team-a", "node-new", "Succeeded", "Succeeded") in series(metrics.RESTORES)


def test_series_of_gone_nodes_and_storages_are_dropped(existing: list[metrics.Existing]) -> None:
    metrics.finished("containercheckpoints", "team-a", "node-x", "Succeeded", "Succeeded", [], 1.0)
    metrics.byte_counter(metrics.DOWNLOADED, "node-x", "unit")(5)
    metrics.storage_available("unit", True)
    existing.append(metrics.Existing(frozenset({"node-y"}), frozenset({"other"})))

    def named() -> set[str]:
        return {v for m, _ in metrics._LABELS for labels in series(m) for v in labels}

    metrics.refresh()
    assert {"node-x", "unit"} <= named()  # the read before still had them: gone once absent from two
    metrics.refresh()
    assert not named() & {"node-x", "unit"}
    assert metrics.prune(existing[-1]) == 0  # nothing left to drop


def test_series_of_a_deleted_namespace_are_dropped(existing: list[metrics.Existing]) -> None:
    existing.append(metrics.Existing(frozenset({"node-x"}), frozenset(), frozenset({"team-a", "team-c"})))
    metrics.refresh()
    metrics.finished("containercheckpoints", "team-c", "node-x", "Failed", "ContainerNotFound", [], 1.0)
    metrics.finished("containercheckpoints", "team-d", "node-x", "Failed", "ContainerNotFound", [], 1.0)
    existing.append(metrics.Existing(frozenset({"node-x"}), frozenset(), frozenset({"team-a", "team-d"})))
    metrics.refresh()  # team-d was made after the last read: spared; team-c was in it: spared once more
    assert {labels[0] for labels in series(metrics.CHECKPOINTS)} >= {"team-c", "team-d"}
    metrics.refresh()
    assert {labels[0] for labels in series(metrics.CHECKPOINTS)} & {"team-c", "team-d"} == {"team-d"}


def test_namespaces_are_judged_only_where_the_process_lists_them() -> None:
    listed = metrics.Existing(frozenset(), frozenset(), frozenset({"team-a"}))
    assert listed.allows({"namespace": "team-a"}) and not listed.allows({"namespace": "gone"})
    assert metrics.Existing(frozenset(), frozenset()).allows({"namespace": "team-a"})
    assert listed.since(metrics.Existing(frozenset(), frozenset())).namespaces is None


def test_a_failed_read_keeps_the_last_values() -> None:
    reads: list[metrics.Existing | Exception] = [metrics.Existing(frozenset({"node-a"}), frozenset())]

    def read() -> metrics.Existing:
        value = reads[-1]
        if isinstance(value, Exception):
            raise value
        return value

    bounds = metrics.Bounds(read, min_seconds=0)
    assert bounds.node("node-a") == "node-a"
    reads.append(OSError("API server away"))
    assert (bounds.node("node-a"), bounds.node("node-b")) == ("node-a", metrics.OTHER)


def test_in_flight_counts_unfinished_objects_and_keeps_zeroes(existing: list[metrics.Existing]) -> None:
    existing.append(metrics.Existing(frozenset({"node-a"}), frozenset()))
    in_flight = metrics.InFlight()

    def body(uid: str, phase: str | None) -> dict[str, object]:
        return {"metadata": {"uid": uid}, "spec": {"nodeName": "node-a"}, "status": {"phase": phase} if phase else {}}

    in_flight.seen("containercheckpoints", body("1", None), deleted=False)
    in_flight.seen("containercheckpoints", body("2", "Uploading"), deleted=False)
    in_flight.seen("containerrestores", body("3", "Downloading"), deleted=False)
    assert in_flight.counts() == {("checkpoint", "node-a"): 2, ("restore", "node-a"): 1}
    [family] = in_flight.collect()
    in_flight.seen("containercheckpoints", body("1", "Succeeded"), deleted=False)
    in_flight.seen("containercheckpoints", body("2", "Uploading"), deleted=True)
    in_flight.seen("containerrestores", body("3", "Failed"), deleted=False)
    [family] = in_flight.collect()
    assert {tuple(s.labels.values()): s.value for s in family.samples} == {
        ("checkpoint", "node-a"): 0,
        ("restore", "node-a"): 0,
    }


def test_in_flight_names_only_nodes_with_an_agent(existing: list[metrics.Existing]) -> None:
    existing.append(metrics.Existing(frozenset({"node-a"}), frozenset()))
    in_flight = metrics.InFlight()
    for i in range(30):
        body = {"metadata": {"uid": str(i)}, "spec": {"nodeName": f"made-up-{i}"}, "status": {}}
        in_flight.seen("containercheckpoints", body, deleted=False)
    in_flight.seen("containercheckpoints", {"metadata": {"uid": "a"}, "spec": {"nodeName": "node-a"}}, deleted=False)
    assert "made-up-3" in in_flight.nodes()  # the pickup deadline still looks at the node as written
    [family] = in_flight.collect()
    assert {tuple(s.labels.values()): s.value for s in family.samples} == {
        ("checkpoint", metrics.OTHER): 30,
        ("checkpoint", "node-a"): 1,
    }
    existing.append(metrics.Existing(frozenset(), frozenset()))  # node-a's agent is gone
    in_flight.seen("containercheckpoints", {"metadata": {"uid": "a"}, "status": {"phase": "Failed"}}, deleted=False)
    [family] = in_flight.collect()
    assert {tuple(s.labels.values()) for s in family.samples} == {("checkpoint", metrics.OTHER)}


def test_elapsed_starts_at_start_time_else_creation() -> None:
    assert metrics.elapsed("2020-01-01T00:00:00.5Z", "2019-01-01T00:00:00Z") is not None
    assert metrics.elapsed(None, None) is None
    since_start = metrics.elapsed("2030-01-01T00:00:00Z", "2020-01-01T00:00:00Z")
    assert since_start == 0.0  # a clock behind the writer's never makes a negative duration


@pytest.mark.parametrize(("verbose", "shown"), [(False, 1), (True, 2)])
def test_kopfs_per_event_handler_successes_show_only_when_verbose(
    capsys: pytest.CaptureFixture[str], verbose: bool, shown: int
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("text", verbose=verbose)
        kopf_objects = logging.getLogger("kopf.objects")
        kopf_objects.info("Handler 'register.<locals>.expire_finished' succeeded.")
        kopf_objects.info("Creation is processed: 1 succeeded; 0 failed.")
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    assert len(capsys.readouterr().err.splitlines()) == shown


# --- a tenant's strings in text logs and the plugin ------------------------------------------------------

FORGED = "web\n2026-01-01 00:00:00,000 INFO checkpointer.steps: checkpoint team-b/x result=Succeeded"


def test_a_newline_in_a_logged_value_does_not_start_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("text", verbose=False)
        logs.Steps.of("checkpoint", {**BODY, "metadata": {**BODY["metadata"], "name": "x\x1b[2Jy"}}).line(
            step="upload", container=FORGED, key="a\u2028b\tc\rd"
        )
        try:
            raise ValueError(f"no such key {FORGED}")
        except ValueError:
            logging.getLogger("checkpointer.test").exception("upload of %s failed", FORGED)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    lines = capsys.readouterr().err.splitlines()
    assert "container=web\\n2026-01-01 00:00:00,000 INFO" in lines[0]
    assert "team-a/x\\x1b[2Jy" in lines[0] and "key=a\\u2028b\\tc\\rd" in lines[0]
    assert lines[1].endswith(f"upload of {logs.escaped(FORGED)} failed")
    assert lines[2] == "Traceback (most recent call last):"  # the traceback keeps its own lines
    assert lines[-1] == f"ValueError: no such key {logs.escaped(FORGED)}"
    assert not [line for line in lines if line.startswith("2026-01-01")]


def test_escaped_keeps_printable_text_and_escapes_every_control_character() -> None:
    assert logs.escaped("team-a/web-1 ä € 🙂 [bold]") == "team-a/web-1 ä € 🙂 [bold]"
    assert logs.escaped("\x00\x07\x1b\x7f\x85\x9b\u2029") == "\\x00\\x07\\x1b\\x7f\\x85\\x9b\\u2029"


def test_the_plugin_prints_names_keys_messages_and_conditions_escaped() -> None:
    obj = {
        "status": {
            "phase": "Failed",
            "conditions": [{"type": "Ready", "reason": "Bad\nReason", "message": "key 'a\x1b]0;owned\x07' refused"}],
        }
    }
    line = present.outcome(obj).line("ContainerCheckpoint", "web\r1")
    assert "\n" not in line and "\x1b" not in line and "\r" not in line
    assert line == "ContainerCheckpoint web\\r1: Failed (Bad\\nReason): key 'a\\x1b]0;owned\\x07' refused"
    manifest = {
        "namespace": "team-a",
        "name": "ccp\n1",
        "nodeName": "node-a",
        "archives": [{"container": "[red]web[/red]\x1b[0m", "key": "k\n2", "sha256": "x"}],
    }
    [row] = present.archive_rows([manifest], "")
    assert row.cells(datetime.datetime.now(datetime.UTC))[1:3] == ["ccp\\n1", "[red]web[/red]\\x1b[0m"]
    assert present.archive_cells(manifest["archives"][0])[-1] == "k\\n2"
    assert dict(present.manifest_fields(manifest, "s3://b/k", "unsigned"))["Checkpoint"].startswith("team-a/ccp\\n1")


def test_the_plugins_consoles_print_markup_as_it_is() -> None:
    console = Console(file=io.StringIO(), markup=commands.out._markup, color_system=None, width=200)
    table = Table(box=None)
    table.add_column("CONTAINER")
    table.add_row(present.printable("[bold]web[/bold]"))
    console.print(present.printable("ccp [red]x[/red]"))
    console.print(table)
    printed = console.file.getvalue()  # type: ignore[attr-defined]
    assert "ccp [red]x[/red]" in printed and "[bold]web[/bold]" in printed
    assert not commands.err._markup


def test_a_node_scheduled_to_is_named_before_the_next_read(existing: list[metrics.Existing]) -> None:
    metrics._State.bounds = metrics.Bounds(lambda: existing[-1], min_seconds=3600)
    metrics._State.bounds.refresh()
    in_flight = metrics.InFlight()
    body = {"metadata": {"uid": "b"}, "spec": {"nodeName": "node-new"}, "status": {"phase": "Scheduled"}}
    in_flight.seen("containercheckpoints", body, deleted=False)  # before the controller scheduled it
    metrics.has_agent("node-new")  # the controller found its agent's Lease alive and scheduled it
    metrics.finished("containercheckpoints", "team-a", "node-new", "Succeeded", "Succeeded", [], 1.0)
    assert ("team-a", "node-new", "Succeeded", "Succeeded") in series(metrics.CHECKPOINTS)
    in_flight.seen("containercheckpoints", {**body, "status": {"phase": "Succeeded"}}, deleted=False)
    [family] = in_flight.collect()  # no scrape while it was in flight: its zero is there all the same
    assert {tuple(s.labels.values()): s.value for s in family.samples} == {("checkpoint", "node-new"): 0}


def test_the_plugins_errors_are_one_line() -> None:
    @commands.handled
    def failing() -> None:
        raise commands.CliError("storage 'x\nError: forged\x1b[2J' not found")

    with pytest.raises(click.ClickException) as raised:
        failing()
    assert raised.value.message == "storage 'x\\nError: forged\\x1b[2J' not found"
