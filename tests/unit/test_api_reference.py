"""docs/api-reference.md is what hack/gen-api-reference makes of the CRDs now, and says what they say."""

from __future__ import annotations

from pathlib import Path

import apireference
import yaml

STALE = "docs/api-reference.md is stale: run hack/gen-api-reference"


def test_the_reference_is_current() -> None:
    assert apireference.PAGE.read_text() == apireference.render(), STALE


def test_the_reference_is_deterministic() -> None:
    assert apireference.render() == apireference.render()


def test_every_kind_field_column_and_rule_message_is_in_the_reference() -> None:
    page = apireference.render()
    for crd in apireference.load():
        names = crd["spec"]["names"]
        assert f"## {names['kind']}\n" in page
        for short in names.get("shortNames", []):
            assert f"`{short}`" in page
        for version in crd["spec"]["versions"]:
            assert f"`{crd['spec']['group']}/{version['name']}`" in page
            for column in version.get("additionalPrinterColumns", []):
                assert f"| {column['name']} | {column['type']} | `{column['jsonPath']}` |" in page
            schema = version["schema"]["openAPIV3Schema"]
            for section in ("spec", "status"):
                for field in apireference.fields(schema["properties"].get(section, {}), ""):
                    assert f"| `{field.path}` |" in page, f"{names['kind']} {section}.{field.path} missing"
            for name, child in schema["properties"].items():
                for rule in apireference.rules(child, name):
                    assert f"| `{rule.path}` |" in page
                    assert " ".join(rule.message.split())[:40].replace("|", "\\|") in page


def test_a_field_shows_its_type_requirement_default_enum_and_pattern(tmp_path: Path) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "spec": {
            "group": "example.dev",
            "scope": "Namespaced",
            "names": {"kind": "Thing", "plural": "things", "singular": "thing", "shortNames": ["th"]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["mode"],
                                    "x-kubernetes-validations": [{"rule": "a || b", "message": "set a <or> b"}],
                                    "properties": {
                                        "mode": {"type": "string", "enum": ["Fast", "Slow"], "default": "Fast"},
                                        "name": {"type": "string", "pattern": "^[a-z]+$", "description": "at <x>"},
                                        "items": {
                                            "type": "array",
                                            "items": {"type": "object", "properties": {"size": {"type": "integer"}}},
                                        },
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    (tmp_path / "things.yaml").write_text(yaml.safe_dump(crd))
    page = apireference.render(tmp_path)
    assert '| `mode` | string | yes | `"Fast"` | one of `Fast`, `Slow` |' in page
    assert "| `name` | string |  |  | pattern `^[a-z]+$` | at &lt;x&gt; |" in page
    assert "| `items` | []object |" in page and "| `items[].size` | integer |" in page
    assert "| `spec` | `a \\|\\| b` | set a &lt;or&gt; b |" in page
    assert "| short names | `th` |" in page
