"""The Helm chart ships the canonical CRDs byte for byte, and its version follows the package's.

Rendering, linting and applying the chart are checked with helm and a real API server in
tests/e2e/test_chart.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
CHART = ROOT / "charts" / "checkpointer"
SYNC = "run hack/sync-chart-crds.sh"


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.yaml")}


def test_chart_holds_every_crd_and_no_other() -> None:
    assert _names(CRDS), "crds/ holds no CRDs"
    assert _names(CHART / "crds") == _names(CRDS), SYNC


@pytest.mark.parametrize("name", sorted(_names(CRDS)))
def test_chart_crd_is_byte_identical(name: str) -> None:
    copy = CHART / "crds" / name
    assert copy.exists(), f"charts/checkpointer/crds/{name} is missing: {SYNC}"
    assert copy.read_bytes() == (CRDS / name).read_bytes(), f"charts/checkpointer/crds/{name} differs: {SYNC}"


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["name"] == "checkpointer"
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"] == ">=1.28.0-0"
