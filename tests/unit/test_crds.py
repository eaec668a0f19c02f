"""The CRDs in crds/ match the API contract of docs/api.md, without a cluster.

What the API server does with them (CEL at admission, pruning, printer columns) is checked
against a real one in tests/e2e/test_admission.py.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

CRDS = Path(__file__).resolve().parents[2] / "crds"
GROUP = "checkpointer.dev"
VERSION = "v1alpha1"

Schema = dict[str, Any]

# kind -> (file, plural, short name, scope)
KINDS = {
    "ContainerCheckpoint": ("containercheckpoints.yaml", "containercheckpoints", "ccp", "Namespaced"),
    "ContainerRestore": ("containerrestores.yaml", "containerrestores", "crst", "Namespaced"),
    "CheckpointStorage": ("checkpointstorages.yaml", "checkpointstorages", "cks", "Cluster"),
    "ContainerMigration": ("containermigrations.yaml", "containermigrations", "cmig", "Namespaced"),
}

# Dotted path under .spec -> OpenAPI type. "[]" is a list's item.
SPEC_FIELDS = {
    "ContainerCheckpoint": {
        "nodeName": "string",
        "containers": "array",
        "containers[]": "string",
        "all": "boolean",
        "latest": "boolean",
        "leaveRunning": "boolean",
        "tcpEstablished": "boolean",
        "keep": "boolean",
        "ttl": "string",
        "preCheckpoint": "boolean",
        "withPrevious": "boolean",
        "previousCheckpointRef": "object",
        "previousCheckpointRef.name": "string",
        "export": "object",
        "export.storageRef": "object",
        "export.storageRef.name": "string",
        "export.key": "string",
        "compress": "string",
        "ignoreRootfs": "boolean",
        "ignoreVolumes": "boolean",
        "podRef": "object",
        "podRef.name": "string",
        "podRef.containers": "array",
        "podRef.containers[]": "string",
    },
    "ContainerRestore": {
        "nodeName": "string",
        "source": "object",
        "source.checkpointRef": "object",
        "source.checkpointRef.name": "string",
        "source.checkpointRef.container": "string",
        "source.archive": "object",
        "source.archive.storageRef": "object",
        "source.archive.storageRef.name": "string",
        "source.archive.namespace": "string",
        "source.archive.key": "string",
        "source.archive.sha256": "string",
        "previous": "object",
        "previous.storageRef": "object",
        "previous.storageRef.name": "string",
        "previous.key": "string",
        "previous.sha256": "string",
        "name": "string",
        "tcpEstablished": "boolean",
        "tcpClose": "boolean",
        "ignoreRootfs": "boolean",
        "ignoreVolumes": "boolean",
        "ignoreStaticIP": "boolean",
        "ignoreStaticMAC": "boolean",
        "keep": "boolean",
        "ttl": "string",
        "fileLocks": "boolean",
        "pod": "string",
        "publish": "array",
        "publish[]": "string",
    },
    "ContainerMigration": {
        "source": "object",
        "source.nodeName": "string",
        "source.container": "string",
        "targetNodeName": "string",
        "storageRef": "object",
        "storageRef.name": "string",
        "compress": "string",
        "tcpEstablished": "boolean",
        "name": "string",
        "ttl": "string",
    },
    "CheckpointStorage": {
        "bucket": "string",
        "prefix": "string",
        "endpoint": "string",
        "region": "string",
        "forcePathStyle": "boolean",
        "caBundle": "string",
        "credentialsSecretRef": "object",
        "credentialsSecretRef.namespace": "string",
        "credentialsSecretRef.name": "string",
        "default": "boolean",
        "deletionPolicy": "string",
        "allowedNamespaces": "array",
        "allowedNamespaces[]": "string",
        "acceptUnsignedArchives": "boolean",
        "encryption": "object",
        "encryption.secretRef": "object",
        "encryption.secretRef.namespace": "string",
        "encryption.secretRef.name": "string",
    },
}

CONDITION_FIELDS = {
    "conditions": "array",
    "conditions[]": "object",
    "conditions[].type": "string",
    "conditions[].status": "string",
    "conditions[].reason": "string",
    "conditions[].message": "string",
    "conditions[].lastTransitionTime": "string",
    "conditions[].observedGeneration": "integer",
}
PROGRESS_FIELDS = {
    "progress": "object",
    "progress.bytesDone": "integer",
    "progress.bytesTotal": "integer",
}
STATUS_FIELDS = {
    "ContainerCheckpoint": {
        "phase": "string",
        "observedGeneration": "integer",
        "nodeName": "string",
        "storageRef": "object",
        "storageRef.name": "string",
        "startTime": "string",
        "completionTime": "string",
        "frozenTime": "string",
        "expiration": "string",
        **PROGRESS_FIELDS,
        **CONDITION_FIELDS,
        "manifestSHA256": "string",
        "archives": "array",
        "archives[]": "object",
        "archives[].container": "string",
        "archives[].containerID": "string",
        "archives[].uri": "string",
        "streams": "array",
        "streams[]": "object",
        "streams[].container": "string",
        "streams[].key": "string",
        "streams[].partSize": "integer",
        "streams[].digests": "array",
        "streams[].digests[]": "string",
        "streams[].size": "integer",
        "archives[].key": "string",
        "archives[].size": "integer",
        "archives[].sha256": "string",
        "archives[].compression": "string",
        "archives[].stats": "object",
    },
    "ContainerRestore": {
        "phase": "string",
        "observedGeneration": "integer",
        "nodeName": "string",
        "startTime": "string",
        "completionTime": "string",
        "runningTime": "string",
        "expiration": "string",
        **PROGRESS_FIELDS,
        **CONDITION_FIELDS,
        "archive": "object",
        "archive.storageRef": "object",
        "archive.storageRef.name": "string",
        "archive.key": "string",
        "archive.sha256": "string",
        "archive.compression": "string",
        "containerID": "string",
        "containerName": "string",
        "stats": "object",
    },
    "ContainerMigration": {
        "phase": "string",
        "observedGeneration": "integer",
        "checkpointRef": "object",
        "checkpointRef.name": "string",
        "restoreRef": "object",
        "restoreRef.name": "string",
        "fallbackRestoreRef": "object",
        "fallbackRestoreRef.name": "string",
        "sourceNodeName": "string",
        "targetNodeName": "string",
        "frozenTime": "string",
        "runningTime": "string",
        "downtimeSeconds": "number",
        "startTime": "string",
        "completionTime": "string",
        "expiration": "string",
        **PROGRESS_FIELDS,
        **CONDITION_FIELDS,
    },
    "CheckpointStorage": {
        "phase": "string",
        "lastValidatedTime": "string",
        "message": "string",
    },
}

PHASES = {
    "ContainerCheckpoint": ["Pending", "Scheduled", "Checkpointing", "Uploading", "Succeeded", "Failed"],
    "ContainerRestore": ["Pending", "Scheduled", "Downloading", "Restoring", "Succeeded", "Failed"],
    "CheckpointStorage": ["Available", "Unavailable"],
    "ContainerMigration": ["Pending", "Checkpointing", "Transferring", "Restoring", "Succeeded", "Failed"],
}

# kind -> [(name, jsonPath)] in order, NAME excepted.
PRINTER_COLUMNS = {
    "ContainerCheckpoint": [
        ("Phase", ".status.phase"),
        ("Node", ".spec.nodeName"),
        ("Containers", ".status.archives[*].container"),
        ("Size", ".status.archives[*].size"),
        ("Age", ".metadata.creationTimestamp"),
    ],
    "ContainerRestore": [
        ("Phase", ".status.phase"),
        ("Node", ".spec.nodeName"),
        ("Checkpoint", ".spec.source.checkpointRef.name"),
        ("Archive", ".spec.source.archive.key"),
        ("Container", ".status.containerName"),
        ("Age", ".metadata.creationTimestamp"),
    ],
    "ContainerMigration": [
        ("Phase", ".status.phase"),
        ("Source", ".spec.source.nodeName"),
        ("Container", ".spec.source.container"),
        ("Target", ".status.targetNodeName"),
        ("Downtime", ".status.downtimeSeconds"),
        ("Age", ".metadata.creationTimestamp"),
    ],
    "CheckpointStorage": [
        ("Bucket", ".spec.bucket"),
        ("Endpoint", ".spec.endpoint"),
        ("Default", ".spec.default"),
        ("Phase", ".status.phase"),
        ("Age", ".metadata.creationTimestamp"),
    ],
}

REQUIRED_SPEC = {
    "ContainerCheckpoint": {
        # nodeName: required unless podRef is set, a CEL rule
        "": None,
        "previousCheckpointRef": ["name"],
        "podRef": ["name"],
        "export.storageRef": ["name"],
    },
    "ContainerRestore": {
        "": ["nodeName"],
        "source.checkpointRef": ["name"],
        "source.archive": ["key"],
        "previous": ["key"],
    },
    "CheckpointStorage": {"": ["bucket"], "credentialsSecretRef": ["namespace", "name"]},
    "ContainerMigration": {"": ["source"], "source": ["nodeName", "container"], "storageRef": ["name"]},
}


def load(kind: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CRDS / KINDS[kind][0]).read_text())
    return data


def version(kind: str) -> dict[str, Any]:
    versions: list[dict[str, Any]] = load(kind)["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


def root(kind: str) -> Schema:
    schema: Schema = version(kind)["schema"]["openAPIV3Schema"]
    return schema


def node(schema: Schema, dotted: str) -> Schema:
    """The schema at a dotted path such as `source.archive.key` or `publish[]`."""
    for part in dotted.replace("[]", ".[]").split("."):
        if not part:
            continue
        schema = schema["items"] if part == "[]" else schema["properties"][part]
    return schema


def walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its dotted path, the root included."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


def rules(kind: str) -> Iterator[tuple[str, Schema, dict[str, Any]]]:
    for path, schema in walk(root(kind)):
        for rule in schema.get("x-kubernetes-validations", []):
            yield path, schema, rule


def rule_messages(kind: str, path: str) -> list[str]:
    return [rule["message"] for p, _, rule in rules(kind) if p == path]


every_kind = pytest.mark.parametrize("kind", list(KINDS))
podman_kinds = pytest.mark.parametrize("kind", ["ContainerCheckpoint", "ContainerRestore"])


def test_there_is_one_file_per_kind_and_nothing_else() -> None:
    # CheckpointSchedule has no phase but a template: tests/unit/test_schedule_crd.py checks it.
    files = [*(f for f, *_ in KINDS.values()), "checkpointschedules.yaml"]
    assert sorted(p.name for p in CRDS.glob("*.yaml")) == sorted(files)


@every_kind
def test_names_group_and_scope(kind: str) -> None:
    _, plural, short, scope = KINDS[kind]
    crd = load(kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.{GROUP}"
    assert crd["spec"]["group"] == GROUP
    assert crd["spec"]["scope"] == scope
    assert crd["spec"]["names"] == {
        "kind": kind,
        "listKind": f"{kind}List",
        "plural": plural,
        "singular": kind.lower(),
        "shortNames": [short],
        "categories": ["checkpointer"],
    }


@every_kind
def test_one_served_storage_version_with_a_status_subresource(kind: str) -> None:
    v = version(kind)
    assert v["name"] == VERSION
    assert v["served"] is True
    assert v["storage"] is True
    assert v["subresources"] == {"status": {}}


@every_kind
def test_printer_columns(kind: str) -> None:
    columns = version(kind)["additionalPrinterColumns"]
    assert [(c["name"], c["jsonPath"]) for c in columns] == PRINTER_COLUMNS[kind]
    types = {c["name"]: c["type"] for c in columns}
    assert types["Age"] == "date"
    assert types["Phase"] == "string"


@every_kind
def test_spec_fields_and_types(kind: str) -> None:
    spec = node(root(kind), "spec")
    for dotted, typ in SPEC_FIELDS[kind].items():
        assert node(spec, dotted)["type"] == typ, dotted
    declared = {p for p, _ in walk(spec) if p}
    assert declared == set(SPEC_FIELDS[kind]), "spec fields not in docs/api.md, or missing"


@every_kind
def test_spec_required_fields(kind: str) -> None:
    assert root(kind)["required"] == ["spec"]
    spec = node(root(kind), "spec")
    for dotted, required in REQUIRED_SPEC[kind].items():
        assert node(spec, dotted).get("required") == required, dotted


@every_kind
def test_status_is_declared(kind: str) -> None:
    status = node(root(kind), "status")
    for dotted, typ in STATUS_FIELDS[kind].items():
        assert node(status, dotted)["type"] == typ, dotted
    declared = {p for p, _ in walk(status) if p}
    assert declared == set(STATUS_FIELDS[kind])
    assert node(status, "phase")["enum"] == PHASES[kind]


@every_kind
def test_only_podman_stats_are_free_form(kind: str) -> None:
    free = {p for p, s in walk(root(kind)) if s.get("x-kubernetes-preserve-unknown-fields")}
    expected = {
        "ContainerCheckpoint": {"status.archives[].stats"},
        "ContainerRestore": {"status.stats"},
        "CheckpointStorage": set(),
        "ContainerMigration": set(),
    }
    assert free == expected[kind]
    for path in free:
        assert node(root(kind), path)["type"] == "object"


@every_kind
def test_every_field_has_a_description(kind: str) -> None:
    missing = [p or "<root>" for p, s in walk(root(kind)) if p != "metadata" and not s.get("description")]
    assert missing == []


@podman_kinds
def test_spec_descriptions_name_the_podman_flag(kind: str) -> None:
    spec = node(root(kind), "spec")
    flags = {
        "all": "--all",
        "latest": "--latest",
        "leaveRunning": "--leave-running",
        "tcpEstablished": "--tcp-established",
        "keep": "--keep",
        "preCheckpoint": "--pre-checkpoint",
        "withPrevious": "--with-previous",
        "export": "--export",
        "compress": "--compress",
        "ignoreRootfs": "--ignore-rootfs",
        "ignoreVolumes": "--ignore-volumes",
        "tcpClose": "--tcp-close",
        "ignoreStaticIP": "--ignore-static-ip",
        "ignoreStaticMAC": "--ignore-static-mac",
        "fileLocks": "--file-locks",
        "pod": "--pod",
        "publish": "--publish",
        "name": "--name",
        "previous": "--import-previous",
        "source": "--import",
    }
    for field, flag in flags.items():
        if field in spec["properties"]:
            assert flag in spec["properties"][field]["description"], field


@every_kind
def test_every_cel_rule_has_a_message(kind: str) -> None:
    found = list(rules(kind))
    assert found
    for path, _, rule in found:
        assert set(rule) <= {"rule", "message", "fieldPath", "reason", "messageExpression"}, path
        assert rule["rule"].strip(), path
        assert len(rule.get("message", "").strip()) > 20, f"{path}: {rule['rule']}"


@every_kind
def test_cel_rules_are_bounded_for_the_cost_budget(kind: str) -> None:
    """Strings a rule reads have maxLength and lists of checked items have maxItems."""
    for path, schema, _ in rules(kind):
        if schema["type"] == "string":
            assert "maxLength" in schema, path
    for path, schema in walk(root(kind)):
        if schema.get("type") == "array" and "x-kubernetes-validations" in schema.get("items", {}):
            assert "maxItems" in schema, path


def test_checkpoint_rules() -> None:
    kind = "ContainerCheckpoint"
    spec_messages = rule_messages(kind, "spec")
    for words in [
        "exactly one of containers, all: true, latest: true or podRef",
        "nodeName is required",
        "a Pod's checkpoint is always exported",
        "a Pod's container always keeps running",
        "preCheckpoint, withPrevious and previousCheckpointRef are podman's and cannot be used with podRef",
        "tcpEstablished and keep are podman's and cannot be used with podRef",
        "ignoreRootfs and ignoreVolumes are podman's and cannot be used with podRef",
        "preCheckpoint and withPrevious cannot be combined",
        "previousCheckpointRef is only allowed with withPrevious",
        "withPrevious: true needs previousCheckpointRef",
        "compress applies only to an exported checkpoint",
        "ignoreRootfs applies only to an exported checkpoint",
        "ignoreVolumes applies only to an exported checkpoint",
    ]:
        assert any(words in m for m in spec_messages), words
    assert "spec is immutable; delete and recreate the ContainerCheckpoint" in spec_messages
    immutable = [r for p, _, r in rules(kind) if p == "spec" and r["rule"] == "self == oldSelf"]
    assert len(immutable) == 1
    assert len(rule_messages(kind, "spec.export.key")) == 4
    spec = node(root(kind), "spec")
    assert node(spec, "compress")["enum"] == ["zstd", "none", "gzip"]
    assert "default" not in node(spec, "compress")
    containers = node(spec, "containers")
    assert containers["x-kubernetes-list-type"] == "set"
    assert containers["minItems"] == 1


def test_restore_rules() -> None:
    kind = "ContainerRestore"
    spec_messages = rule_messages(kind, "spec")
    for words in [
        "source must set exactly one of checkpointRef",
        "name cannot be combined with tcpEstablished",
        "tcpEstablished and tcpClose cannot be combined",
        "spec is immutable; delete and recreate the ContainerRestore",
    ]:
        assert any(words in m for m in spec_messages), words
    for key in ("spec.source.archive.key", "spec.previous.key"):
        assert len(rule_messages(kind, key)) == 4, key
    for sha in ("spec.source.archive.sha256", "spec.previous.sha256"):
        assert any("64 lowercase hexadecimal" in m for m in rule_messages(kind, sha)), sha
    assert len(rule_messages(kind, "spec.publish[]")) == 2


def test_migration_rules() -> None:
    kind = "ContainerMigration"
    spec_messages = rule_messages(kind, "spec")
    assert any("name cannot be combined with tcpEstablished" in m for m in spec_messages)
    assert "spec is immutable; delete and recreate the ContainerMigration" in spec_messages
    spec = node(root(kind), "spec")
    assert node(spec, "compress")["enum"] == ["zstd", "none", "gzip"]
    for path in ("spec.source.nodeName", "spec.source.container", "spec.targetNodeName", "spec.name"):
        assert rule_messages(kind, path), path
    assert "--compress" in node(spec, "compress")["description"]
    assert "--tcp-established" in node(spec, "tcpEstablished")["description"]


def test_storage_rules_and_defaults() -> None:
    kind = "CheckpointStorage"
    spec = node(root(kind), "spec")
    assert node(spec, "deletionPolicy")["enum"] == ["Delete", "Retain"]
    assert node(spec, "deletionPolicy")["default"] == "Delete"
    assert any("http:// or https:// URL" in m for m in rule_messages(kind, "spec.endpoint"))
    assert len(rule_messages(kind, "spec.prefix")) == 4
    assert rule_messages(kind, "spec.bucket")


# The one rule of a free string a tenant writes (docs/security.md, "Tenant strings"): RE2's classes of
# control characters (C0, DEL, C1) and the Unicode line and paragraph separators.
CONTROL_RULE = "!self.matches('[\\\\p{Cc}\\\\p{Zl}\\\\p{Zp}]')"
# caBundle is PEM: its line breaks and tabs are its own, every other control character is refused.
PEM_RULE = "!self.matches('[\\\\x{0}-\\\\x{8}\\\\x{b}\\\\x{c}\\\\x{e}-\\\\x{1f}\\\\x{7f}-\\\\x{9f}\\\\p{Zl}\\\\p{Zp}]')"
CONTROL = ["a\nb", "a\x1b[31mb", "a\tb", "a\rb", "a\x00b", "a\x7fb", "a\x85b", "a\x9bb", "a\u2028b", "ok\n"]
SCHEDULES = "checkpointschedules.yaml"


def _anchored(schema: Schema) -> list[str]:
    """The schema's regular expressions that must match the whole value: its pattern, its matches()."""
    found = [schema["pattern"]] if "pattern" in schema else []
    for rule in schema.get("x-kubernetes-validations", []):
        found += [m.replace("\\\\", "\\") for m in re.findall(r"self\.matches\('(\^.*?\$)'\)", rule["rule"])]
    return found


def _refuses(regex: str, value: str) -> bool:
    # RE2's $ is the end of the text; Python's would also match before a final newline.
    return re.search(regex.removesuffix("$") + r"\Z", value) is None


def tenant_strings() -> Iterator[tuple[str, str, Schema]]:
    """Every string under the spec of every CRD (a schedule's template included), by file and path."""
    for file in [*(f for f, *_ in KINDS.values()), SCHEDULES]:
        crd = yaml.safe_load((CRDS / file).read_text())
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, schema in walk(spec, "spec"):
            if schema.get("type") == "string":
                yield file, path, schema


def test_the_control_character_rule_is_the_unicode_classes_it_names() -> None:
    controls = {chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) in ("Cc", "Zl", "Zp")}
    assert controls == {*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029"}
    assert all(c in controls for value in CONTROL for c in value if not c.isalnum() and c not in "[")


def test_every_string_a_tenant_writes_refuses_control_characters() -> None:
    strings = list(tenant_strings())
    assert len(strings) > 30
    for file, path, schema in strings:
        rules = [r["rule"].strip() for r in schema.get("x-kubernetes-validations", [])]
        if "enum" in schema or CONTROL_RULE in rules:
            continue
        if path == "spec.caBundle":
            assert PEM_RULE in rules, f"{file}: {path}"
            continue
        anchored = _anchored(schema)
        assert anchored, f"{file}: {path} accepts control characters: add {CONTROL_RULE}"
        for value in CONTROL:
            assert any(_refuses(r, value) for r in anchored), f"{file}: {path} accepts {value!r}"


def test_free_strings_carry_the_rule_with_a_message_a_person_reads() -> None:
    free = {
        ("containercheckpoints.yaml", "spec.export.key"),
        ("containerrestores.yaml", "spec.source.archive.key"),
        ("containerrestores.yaml", "spec.previous.key"),
        (SCHEDULES, "spec.schedule"),
        (SCHEDULES, "spec.template.export.key"),
        ("checkpointstorages.yaml", "spec.prefix"),
        ("checkpointstorages.yaml", "spec.endpoint"),
        ("checkpointstorages.yaml", "spec.region"),
    }
    for file, path, schema in tenant_strings():
        if (file, path) not in free:
            continue
        free.discard((file, path))
        [rule] = [r for r in schema["x-kubernetes-validations"] if r["rule"].strip() == CONTROL_RULE]
        assert "must not contain control characters (newline, tab, escape, …)" in rule["message"], path
    assert not free


@podman_kinds
def test_conditions_have_the_metav1_condition_shape(kind: str) -> None:
    conditions = node(root(kind), "status.conditions")
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert item["properties"]["observedGeneration"]["format"] == "int64"


@every_kind
def test_times_and_sizes_have_formats(kind: str) -> None:
    status = node(root(kind), "status")
    for path, schema in walk(status):
        if path.endswith("Time") and schema.get("type") == "string":
            assert schema.get("format") == "date-time", path
        if schema.get("type") == "integer":
            assert schema.get("format") == "int64", path
