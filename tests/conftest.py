"""Session fixtures: one local environment (control plane, S3, two podman nodes, controller, agents).

Under CI=true a missing piece fails the tests; it never skips them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localenv.controlplane import ControlPlane, missing_binaries
from localenv.env import LocalEnv
from localenv.procs import BIN, require


def _require_environment() -> None:
    missing = missing_binaries() + [b for b in ("versitygw", "helm") if not (BIN / b).exists()]
    require(not missing, f"local environment binaries missing: {', '.join(missing)}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster",
        choices=["local", "kind"],
        default="local",
        help=(
            "local: the environment the tests start themselves; kind: the cluster hack/kind/up.sh made, "
            "for tests/e2e/test_helm_nodes.py (the operator installed by Helm alone)"
        ),
    )


@pytest.fixture(scope="session")
def local_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEnv]:
    if request.config.getoption("--cluster") == "kind":
        # These tests start, stop and fault the operator's processes themselves: only the local
        # environment lets them. What runs on kind is the Helm-installed user story.
        pytest.fail(
            "--cluster kind runs tests/e2e/test_helm_nodes.py only; this test needs the local environment",
            pytrace=False,
        )
    _require_environment()
    env = LocalEnv.up(Path(tmp_path_factory.mktemp("env")))
    try:
        yield env
    finally:
        env.down()


@pytest.fixture(scope="session")
def tenants(local_env: LocalEnv) -> Iterator[Any]:
    """A user who may edit only team-a, and a running container of team-a and of team-b (tests/e2e/tenants.py)."""
    from tenants import tenants_of  # tests/e2e is on the path once an e2e test is collected

    yield from tenants_of(local_env)


@pytest.fixture(scope="session")
def control_plane(local_env: LocalEnv) -> ControlPlane:
    return local_env.control_plane


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A control plane of the test module's own, for tests that install cluster-wide objects and CRDs."""
    from helpers import own_control_plane  # tests/e2e is on the path once an e2e test is collected

    with own_control_plane(tmp_path_factory.mktemp("control-plane")) as plane:
        yield plane


@pytest.fixture(scope="module")
def unsigned(local_env: LocalEnv) -> Iterator[str]:
    """A storage that admits unsigned archives (made by plain podman) and keeps them, for the test module."""
    from helpers import storage_accepting_unsigned

    with storage_accepting_unsigned(local_env) as storage:
        yield storage


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    env = getattr(item, "funcargs", {}).get("local_env")
    if report.failed and isinstance(env, LocalEnv):
        report.sections.append(("checkpointer logs", env.logs()))
    return report
