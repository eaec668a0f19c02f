"""The CheckpointSchedule CRD: its template is validated exactly as a ContainerCheckpoint's spec.

What the API server does with it (CEL at admission) is checked in tests/e2e/test_schedules.py.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from checkpointer.durations import DURATION_PATTERN

CRDS = Path(__file__).resolve().parents[2] / "crds"


def _schema(file: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / file).read_text())
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_template_is_a_container_checkpoint_spec() -> None:
    """Equal but for the spec's description and its immutability rule (a template may change)."""
    spec = copy.deepcopy(_schema("containercheckpoints.yaml")["properties"]["spec"])
    template = copy.deepcopy(_schema("checkpointschedules.yaml")["properties"]["spec"]["properties"]["template"])
    spec["x-kubernetes-validations"] = [r for r in spec["x-kubernetes-validations"] if r["rule"] != "self == oldSelf"]
    del spec["description"], template["description"]
    assert template == spec, "run hack/sync-chart-crds.sh: the template differs from ContainerCheckpoint's spec"


def test_names_printer_columns_and_fields() -> None:
    crd = yaml.safe_load((CRDS / "checkpointschedules.yaml").read_text())
    assert crd["spec"]["names"]["shortNames"] == ["ccs"]
    assert crd["spec"]["names"]["plural"] == "checkpointschedules"
    assert crd["spec"]["scope"] == "Namespaced"
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Schedule": ("string", ".spec.schedule"),
        "Suspend": ("boolean", ".spec.suspend"),
        "Last": ("date", ".status.lastScheduleTime"),
        "Active": ("integer", ".status.activeCount"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(spec) == {
        "schedule",
        "timeZone",
        "suspend",
        "concurrencyPolicy",
        "startingDeadlineSeconds",
        "onNodeCordon",
        "cordonAction",
        "retention",
        "template",
    }
    assert spec["concurrencyPolicy"]["enum"] == ["Forbid", "Allow"]
    assert spec["cordonAction"]["enum"] == ["Checkpoint", "Migrate"]
    assert spec["retention"]["properties"]["maxAge"]["pattern"] == DURATION_PATTERN
    assert re.match(DURATION_PATTERN, "168h")
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"lastScheduleTime", "lastSuccessfulTime", "active", "conditions"} <= set(status)


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_every_field_is_described_and_every_rule_is_bounded_and_explained() -> None:
    root = _schema("checkpointschedules.yaml")
    assert [p for p, s in _walk(root) if p != "metadata" and not s.get("description")] == []
    for path, schema in _walk(root):
        for rule in schema.get("x-kubernetes-validations", []):
            assert len(rule["message"].strip()) > 20, path
            if schema["type"] == "string":
                assert "maxLength" in schema, path
