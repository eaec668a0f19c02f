"""Every property of every CRD's spec and status is a field of its model, and every field of a model
is a property of its CRD: a field cannot be added to one and forgotten in the other (the models ignore
what they do not know, so a forgotten one would be dropped without a word)."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from checkpointer.models import (
    CheckpointSchedule,
    CheckpointSpec,
    CheckpointStorage,
    ContainerCheckpoint,
    ContainerMigration,
    ContainerRestore,
)

CRDS = Path(__file__).resolve().parents[2] / "crds"
MODELS: dict[str, type[BaseModel]] = {
    "containercheckpoints.yaml": ContainerCheckpoint,
    "containerrestores.yaml": ContainerRestore,
    "checkpointstorages.yaml": CheckpointStorage,
    "checkpointschedules.yaml": CheckpointSchedule,
    "containermigrations.yaml": ContainerMigration,
}
# Fields a model keeps as written, as a plain dict, whose CRD properties another model holds: a
# schedule's template is passed on to its checkpoints as it is, and read as a ContainerCheckpoint spec.
AS_WRITTEN: dict[str, type[BaseModel]] = {"checkpointschedules.yaml:spec.template": CheckpointSpec}

Schema = dict[str, Any]


def schema_of(file: str) -> Schema:
    crd = yaml.safe_load((CRDS / file).read_text())
    [version] = crd["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def inner(annotation: Any) -> Any:
    """The type a field holds, without None, lists and dicts around it: a model, or a plain type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        [kept] = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner(kept)
    if origin is list:
        return inner(typing.get_args(annotation)[0])
    return origin or annotation


def differences(schema: Schema, model: Any, path: str, file: str) -> list[str]:
    """Where the properties of `schema` (an object, or an array of objects) and the fields of `model` differ."""
    if schema.get("type") == "array":
        return differences(schema.get("items") or {}, model, f"{path}[]", file)
    properties: dict[str, Schema] = schema.get("properties") or {}
    if f"{file}:{path}" in AS_WRITTEN:
        if model is not dict:
            return [f"{path}: AS_WRITTEN names it, but its model holds {model}, not a dict"]
        model = AS_WRITTEN[f"{file}:{path}"]
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        if properties:
            return [f"{path}: the CRD declares properties {sorted(properties)}, the model holds {model}"]
        return []
    if not properties:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return [f"{path}: the CRD keeps it as written, the model reads it as {model.__name__}"]
        return [f"{path}: the CRD declares no properties, the model {model.__name__} has fields"]
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    found = [f"{path}.{p}: in the CRD, not in {model.__name__}" for p in sorted(set(properties) - set(fields))]
    found += [f"{path}.{f}: in {model.__name__}, not in the CRD" for f in sorted(set(fields) - set(properties))]
    for name in sorted(set(properties) & set(fields)):
        found += differences(properties[name], inner(fields[name].annotation), f"{path}.{name}", file)
    return found


@pytest.mark.parametrize("file", sorted(MODELS))
def test_every_property_of_spec_and_status_is_a_model_field_and_back(file: str) -> None:
    schema, model = schema_of(file), MODELS[file]
    found = []
    for part in ("spec", "status"):
        found += differences(schema["properties"][part], inner(model.model_fields[part].annotation), part, file)
    assert found == []


def test_the_walk_sees_nested_objects_arrays_of_objects_and_kept_fields() -> None:
    """The walk itself: a property missing deep down, or a field too many, is found."""

    class Leaf(BaseModel):
        a: int | None = None

    class Root(BaseModel):
        items: list[Leaf] = []
        kept: dict[str, Any] | None = None

    schema = {
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {"a": {}, "b": {}}}},
            "kept": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    assert differences(schema, Root, "status", "x.yaml") == ["status.items[].b: in the CRD, not in Leaf"]
    del schema["properties"]["kept"]
    assert differences(schema, Root, "status", "x.yaml") == [
        "status.kept: in Root, not in the CRD",
        "status.items[].b: in the CRD, not in Leaf",
    ]
