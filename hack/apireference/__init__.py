"""The API reference, docs/api-reference.md, generated from the CRDs in crds/.

`hack/gen-api-reference` writes it; tests/unit/test_api_reference.py fails when the page differs from
what `render` makes of the CRDs now. The output depends only on the CRDs' content: kinds in file name
order, fields in the order the schema declares them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
PAGE = ROOT / "docs" / "api-reference.md"

Schema = Mapping[str, Any]

# Metadata the API server defines for every object; the reference documents what this project adds.
_COMMON_PROPERTIES = ("apiVersion", "kind", "metadata")


@dataclass(frozen=True)
class Field:
    path: str
    schema: Schema
    required: bool


@dataclass(frozen=True)
class Rule:
    path: str
    rule: str
    message: str


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cell(text: str) -> str:
    """Text for a table cell: one line, pipes escaped, and angle brackets outside code spans escaped so
    that `<prefix>` is shown rather than taken for HTML."""
    parts = _one_line(text).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _code(text: str) -> str:
    text = _one_line(text).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _type(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "integer or string"
    kind = str(schema.get("type", "any"))
    if kind == "array":
        return "[]" + _type(schema.get("items", {}))
    if kind == "object" and "properties" not in schema:
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return "object (any fields)"
        if "additionalProperties" in schema:
            return "map[string]" + _type(schema["additionalProperties"])
    if "format" in schema:
        return f"{kind} ({schema['format']})"
    return kind


_BOUNDS = (
    ("minLength", "min length"),
    ("maxLength", "max length"),
    ("minimum", "minimum"),
    ("maximum", "maximum"),
    ("minItems", "min items"),
    ("maxItems", "max items"),
    ("minProperties", "min properties"),
    ("maxProperties", "max properties"),
)


def _allowed(schema: Schema) -> str:
    """Enum, pattern and bounds of a field, and of its items for an array of scalars."""
    notes: list[str] = []
    if "enum" in schema:
        values = (v if isinstance(v, str) else json.dumps(v) for v in schema["enum"])
        notes.append("one of " + ", ".join(_code(v) for v in values))
    if "pattern" in schema:
        notes.append("pattern " + _code(schema["pattern"]))
    notes.extend(f"{label} {schema[key]}" for key, label in _BOUNDS if key in schema)
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "map":
        keys = ", ".join(schema.get("x-kubernetes-list-map-keys", []))
        notes.append(f"list of unique {keys}")
    elif list_type == "set":
        notes.append("unique items")
    items = schema.get("items", {})
    if schema.get("type") == "array" and items.get("type") != "object":
        item_notes = _allowed(items)
        if item_notes:
            notes.append("each item: " + item_notes)
    return "; ".join(notes)


def fields(schema: Schema, prefix: str) -> Iterator[Field]:
    """Every field under an object schema, depth first in declaration order; array items of objects
    appear as `name[].field`."""
    required = set(schema.get("required", []))
    for name, child in schema.get("properties", {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield Field(path, child, name in required)
        if child.get("type") == "array" and child.get("items", {}).get("type") == "object":
            yield from fields(child["items"], f"{path}[]")
        else:
            yield from fields(child, path)


def rules(schema: Schema, path: str) -> Iterator[Rule]:
    for entry in schema.get("x-kubernetes-validations", []):
        message = entry.get("message") or entry.get("messageExpression", "")
        where = path + str(entry.get("fieldPath", "")) if entry.get("fieldPath") else path
        yield Rule(where, str(entry["rule"]), str(message))
    for name, child in schema.get("properties", {}).items():
        yield from rules(child, f"{path}.{name}")
    if "items" in schema:
        yield from rules(schema["items"], f"{path}[]")


def _field_table(root: Schema, section: str) -> list[str]:
    schema = root.get("properties", {}).get(section)
    if schema is None:
        return []
    lines = [f"### {section}", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    if section in root.get("required", []):
        lines += [f"`{section}` is required.", ""]
    rows = list(fields(schema, ""))
    if not rows:
        return [*lines, f"`{section}` has no fields.", ""]
    lines += [
        "| field | type | required | default | allowed values | description |",
        "|---|---|---|---|---|---|",
    ]
    for field in rows:
        default = _code(json.dumps(field.schema["default"])) if "default" in field.schema else ""
        lines.append(
            f"| `{field.path}` | {_type(field.schema)} | {'yes' if field.required else ''} | {default} "
            f"| {_allowed(field.schema)} | {_cell(field.schema.get('description', ''))} |"
        )
    return [*lines, ""]


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def _printer_columns(columns: list[Schema]) -> list[str]:
    if not columns:
        return []
    lines = [
        "### Printer columns (`kubectl get`)",
        "",
        "| column | type | JSONPath | description |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c['name']} | {c['type']} | {_code(c['jsonPath'])} | {_cell(c.get('description', ''))} |" for c in columns
    ]
    return [*lines, ""]


def _rule_table(schema: Schema) -> list[str]:
    found = list(rules({"x-kubernetes-validations": schema.get("x-kubernetes-validations", [])}, "(object)"))
    found += [rule for name, child in schema.get("properties", {}).items() for rule in rules(child, name)]
    if not found:
        return []
    lines = [
        "### Validation rules (CEL)",
        "",
        "Checked by the API server when an object is created or changed; the message is what",
        "`kubectl apply` shows.",
        "",
        "| field | rule | message |",
        "|---|---|---|",
    ]
    lines += [f"| `{r.path}` | {_code(r.rule)} | {_cell(r.message)} |" for r in found]
    return [*lines, ""]


def _kind_section(crd: Schema) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    lines = [f"## {names['kind']}", ""]
    for version in spec["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        served = "served" if version.get("served") else "not served"
        stored = ", storage version" if version.get("storage") else ""
        subresources = ", ".join(sorted(version.get("subresources", {}))) or "none"
        lines += [
            "| | |",
            "|---|---|",
            f"| group/version | `{spec['group']}/{version['name']}` ({served}{stored}) |",
            f"| scope | {spec['scope']} |",
            f"| resource | `{names['plural']}` (singular `{names.get('singular', '')}`, "
            f"list `{names.get('listKind', '')}`) |",
            f"| short names | {', '.join(f'`{n}`' for n in names.get('shortNames', [])) or 'none'} |",
            f"| categories | {', '.join(f'`{n}`' for n in names.get('categories', [])) or 'none'} |",
            f"| subresources | {subresources} |",
            "",
        ]
        if schema.get("description"):
            lines += [_cell(schema["description"]), ""]
        lines += _printer_columns(version.get("additionalPrinterColumns", []))
        extra = [name for name in schema.get("properties", {}) if name not in (*_COMMON_PROPERTIES, "spec", "status")]
        for section in ("spec", "status", *extra):
            lines += _field_table(schema, section)
        lines += _rule_table(schema)
    return lines


def load(crd_dir: Path = CRDS) -> list[dict[str, Any]]:
    """The CRDs of a folder, in file name order."""
    crds: list[dict[str, Any]] = []
    for path in sorted(crd_dir.glob("*.yaml")):
        crds.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return crds


def render(crd_dir: Path = CRDS) -> str:
    crds = load(crd_dir)
    kinds = [crd["spec"]["names"]["kind"] for crd in crds]
    lines = [
        "# API reference",
        "",
        "<!-- Generated by hack/gen-api-reference from crds/*.yaml. Do not edit by hand: change the CRDs",
        "and run hack/gen-api-reference. -->",
        "",
        "Every kind, field and admission rule of the CRDs in `crds/`, generated from them by",
        "`hack/gen-api-reference` (`tests/unit/test_api_reference.py` fails when this page is stale).",
        "What the fields do together, with examples, is in [api.md](api.md) and [usage.md](usage.md).",
        "",
        "Kinds: " + ", ".join(f"[{kind}](#{_anchor(kind)})" for kind in kinds) + ".",
        "",
    ]
    for crd in crds:
        lines += _kind_section(crd)
    return "\n".join(lines).rstrip("\n") + "\n"
