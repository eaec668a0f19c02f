"""The plugin's decisions: the objects it builds from the command line, and what it shows people."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from checkpointer.archive import signature
from checkpointer.archive.manifest import sign
from checkpointer.cli import plan, present
from checkpointer.cli.commands import cli
from checkpointer.cli.session import CliError, context_namespace

NOW = datetime.datetime(2026, 1, 2, 12, 0, tzinfo=datetime.UTC)


# --- plan: the command line as objects ------------------------------------------------------------------


def test_targets_are_node_slash_container() -> None:
    assert plan.parse_target("node-a/web") == plan.Target("node-a", "web")
    for wrong in ("web", "node-a/", "/web", "node-a/web/x"):
        with pytest.raises(ValueError, match="NODE/CONTAINER"):
            plan.parse_target(wrong)


def test_addresses_are_storage_colon_key_relative_to_the_namespace() -> None:
    assert plan.parse_address("local:web-1a2b3c4d/web.tar.zst") == plan.ArchiveAddress(
        "local", "web-1a2b3c4d/web.tar.zst"
    )
    assert plan.parse_address("web-1a2b3c4d") == plan.ArchiveAddress(None, "web-1a2b3c4d")
    assert plan.parse_address(":/nightly/") == plan.ArchiveAddress(None, "nightly")
    with pytest.raises(ValueError, match="STORAGE:KEY"):
        plan.parse_address("local:")


def test_kinds_are_kubectls_words() -> None:
    assert plan.parse_kind("ccp/web-1") == (plan.CHECKPOINT, "web-1")
    assert plan.parse_kind("ContainerRestore/r") == (plan.RESTORE, "r")
    assert plan.parse_kind("containercheckpoints.checkpointer.dev/x") == (plan.CHECKPOINT, "x")
    for wrong in ("pod/x", "ccp", "ccp/"):
        with pytest.raises(ValueError, match="KIND/NAME"):
            plan.parse_kind(wrong)


def test_generated_names_are_valid_object_names() -> None:
    assert plan.generated_name("web", "abc123") == "web-abc123"
    assert plan.generated_name("Web_Server.1", "abc123") == "web-server-1-abc123"
    long = plan.generated_name("x" * 100, "abc123")
    assert len(long) == 63 and long.endswith("-abc123")
    assert plan.generated_name("___", "abc123") == "checkpoint-abc123"
    assert plan.generated_name("web") != plan.generated_name("web")


def test_one_checkpoint_per_node_with_its_containers_in_order() -> None:
    targets = [plan.parse_target(t) for t in ("node-a/web", "node-b/db", "node-a/cache", "node-a/web")]
    objects = plan.checkpoint_objects(targets, "shop", token="t0")
    assert [o["spec"] for o in objects] == [
        {"nodeName": "node-a", "containers": ["web", "cache"]},
        {"nodeName": "node-b", "containers": ["db"]},
    ]
    assert [o["metadata"] for o in objects] == [
        {"name": "web-t0", "namespace": "shop"},
        {"name": "db-t0", "namespace": "shop"},
    ]
    assert objects[0]["apiVersion"] == "checkpointer.dev/v1alpha1" and objects[0]["kind"] == "ContainerCheckpoint"


def test_checkpoint_flags_become_the_spec() -> None:
    target = [plan.Target("node-a", "web")]
    (default,) = plan.checkpoint_objects(target, "ns", export="", compress="none", leave_running=True, name="n")
    assert default["metadata"]["name"] == "n"
    assert default["spec"] == {
        "nodeName": "node-a",
        "containers": ["web"],
        "leaveRunning": True,
        "export": {},
        "compress": "none",
    }
    (named,) = plan.checkpoint_objects(target, "ns", export="offsite")
    assert named["spec"]["export"] == {"storageRef": {"name": "offsite"}} and "compress" not in named["spec"]


def test_checkpoint_refusals_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="--export"):
        plan.checkpoint_objects([plan.Target("a", "web")], "ns", compress="gzip")
    with pytest.raises(ValueError, match="several nodes"):
        plan.checkpoint_objects([plan.Target("a", "web"), plan.Target("b", "db")], "ns", name="one")
    with pytest.raises(ValueError, match="at least one"):
        plan.checkpoint_objects([], "ns")


def test_an_export_value_with_a_slash_is_a_target() -> None:
    assert plan.split_export("node-a/web", ("node-b/db",)) == ("", ("node-a/web", "node-b/db"))
    assert plan.split_export("offsite", ("node-a/web",)) == ("offsite", ("node-a/web",))
    assert plan.split_export(None, ("node-a/web",)) == (None, ("node-a/web",))


def test_restore_of_a_checkpoint_or_of_an_archive() -> None:
    by_name = plan.restore_object("ns", "node-b", checkpoint="web-1", container="web", token="t0")
    assert by_name["kind"] == "ContainerRestore"
    assert by_name["metadata"] == {"name": "web-restore-t0", "namespace": "ns"}
    assert by_name["spec"] == {"nodeName": "node-b", "source": {"checkpointRef": {"name": "web-1", "container": "web"}}}
    address = plan.ArchiveAddress("offsite", "web-1a2b3c4d/web.tar.zst")
    stored = plan.restore_object("ns", "node-b", archive=address, container_name="web2", name="r")
    assert stored["metadata"]["name"] == "r"
    assert stored["spec"] == {
        "nodeName": "node-b",
        "source": {"archive": {"key": "web-1a2b3c4d/web.tar.zst", "storageRef": {"name": "offsite"}}},
        "name": "web2",
    }
    default = plan.restore_object("ns", "n", archive=plan.ArchiveAddress(None, "f/web.tar.zst"), token="t0")
    assert default["spec"]["source"] == {"archive": {"key": "f/web.tar.zst"}}
    assert default["metadata"]["name"] == "web-restore-t0"
    with pytest.raises(ValueError, match="not both or neither"):
        plan.restore_object("ns", "n")


def test_a_key_names_its_checkpoints_folder() -> None:
    assert plan.archive_folder("web-1a2b3c4d/web.tar.zst") == "web-1a2b3c4d"
    assert plan.archive_folder("web-1a2b3c4d/manifest.json") == "web-1a2b3c4d"
    assert plan.archive_folder("web-1a2b3c4d") == "web-1a2b3c4d"
    assert plan.archive_folder("nightly/web") == "nightly/web"
    done = {"status": {"archives": [{"container": "web", "key": "pre/shop/web-1-0a1b2c3d/web.tar.zst"}]}}
    assert plan.checkpoint_folder(done) == "pre/shop/web-1-0a1b2c3d"
    assert plan.checkpoint_folder({"status": {"phase": "Checkpointing"}}) is None
    assert plan.checkpoint_folder(None) is None


# --- present: what people see ------------------------------------------------------------------------------


def test_sizes_rates_and_durations_for_people() -> None:
    assert [present.size(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 2**30, 3 * 2**40, None)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "5.0 MiB",
        "1.0 GiB",
        "3.0 TiB",
        "-",
    ]
    assert present.rate(1.5 * 2**20) == "1.5 MiB/s" and present.rate(None) == "-"
    assert [present.duration(s) for s in (0, 59.6, 61, 599, 601, 3600 + 300, 90000, None)] == [
        "0s",
        "1m00s",
        "1m01s",
        "9m59s",
        "10m",
        "1h05m",
        "1d1h",
        "-",
    ]
    assert present.age("2026-01-02T11:58:00Z", NOW) == "2m00s" and present.age(None, NOW) == "-"


def test_the_rate_is_over_the_last_seconds_and_the_eta_follows() -> None:
    meter = present.Meter()
    meter.add(0.0, 0)
    assert meter.rate() is None and meter.eta(100) is None
    for second in range(1, 11):
        meter.add(float(second), second * 10 * 2**20)
    assert meter.rate() == pytest.approx(10 * 2**20)
    assert meter.samples[0][0] >= 10 - present.RATE_WINDOW - 1
    assert meter.eta(200 * 2**20) == pytest.approx(10.0)
    assert meter.eta(None) is None
    meter.add(11.0, 0)  # an upload that starts over
    assert meter.rate() is None


def test_progress_from_a_status() -> None:
    meter = present.Meter()
    status = {"phase": "Uploading", "progress": {"bytesDone": 2**29, "bytesTotal": 2**30}}
    present.progress({"status": {"phase": "Checkpointing"}}, meter, 0.0)
    shown = present.progress({"status": status}, meter, 2.0)
    assert (shown.phase, shown.done, shown.total) == ("Uploading", 2**29, 2**30)
    assert shown.rate == pytest.approx(2**28) and shown.eta == pytest.approx(2.0)
    assert shown.text() == "Uploading  512.0 MiB of 1.0 GiB  256.0 MiB/s  ETA 2s"
    streaming = present.progress({"status": {"phase": "Uploading", "progress": {"bytesDone": 3 * 2**28}}}, meter, 3.0)
    assert streaming.total is None and streaming.bytes_text() == "768.0 MiB" and streaming.eta is None
    done = present.progress({"status": {"phase": "Succeeded", "progress": {"bytesDone": 2**30}}}, meter, 4.0)
    assert (done.total, done.eta) == (2**30, 0.0)
    assert present.progress({}, present.Meter(), 0.0).text() == "Pending  0 B  -  ETA -"


def test_objects_print_without_managed_fields() -> None:
    obj = {"kind": "ContainerCheckpoint", "metadata": {"name": "w", "managedFields": [{"manager": "kopf"}]}}
    assert present.without_managed_fields(obj) == {"kind": "ContainerCheckpoint", "metadata": {"name": "w"}}
    assert present.without_managed_fields({"items": []}) == {"items": []}


def test_outcome_is_the_phase_and_the_ready_condition() -> None:
    failed = {
        "status": {
            "phase": "Failed",
            "conditions": [
                {"type": "Scheduled", "reason": "Scheduled", "message": "x"},
                {"type": "Ready", "reason": "ContainerNotFound", "message": "no container web on node-a"},
            ],
        }
    }
    result = present.outcome(failed)
    assert result.failed and result.finished
    assert result.line("ContainerCheckpoint", "web-1") == (
        "ContainerCheckpoint web-1: Failed (ContainerNotFound): no container web on node-a"
    )
    done = {"status": {"phase": "Succeeded", "conditions": [{"type": "Ready", "reason": "Succeeded", "message": "ok"}]}}
    assert present.outcome(done).line("ContainerRestore", "r") == "ContainerRestore r: Succeeded: ok"
    pending = present.outcome({})
    assert not pending.finished and pending.line("ContainerRestore", "r") == "ContainerRestore r: Pending"


def manifest(name: str, completed: str, *archives: dict[str, object]) -> dict[str, object]:
    return {
        "manifestVersion": 1,
        "namespace": "shop",
        "name": name,
        "uid": "0f0e0d0c-0000",
        "nodeName": "node-a",
        "flags": {"nodeName": "node-a", "containers": ["web", "db"], "leaveRunning": True, "export": {}},
        "host": {"node": "node-a", "podman": "5.4.0", "criu": "4.1"},
        "startTime": "2026-01-02T11:00:00.000000Z",
        "completionTime": completed,
        "archives": list(archives),
    }


def test_archive_rows_newest_first_with_keys_as_a_restore_names_them() -> None:
    old = manifest("old", "2026-01-01T12:00:00Z", {"container": "web", "key": "pre/shop/old-1/web.tar.zst", "size": 5})
    new = manifest(
        "new",
        "2026-01-02T11:59:00Z",
        {"container": "db", "key": "pre/shop/new-2/db.tar", "size": 3 * 2**20},
        {"container": "web", "key": "pre/shop/new-2/web.tar", "size": 2**30},
    )
    rows = present.archive_rows([old, new], "pre")
    assert [(r.checkpoint, r.container, r.key) for r in rows] == [
        ("new", "web", "new-2/web.tar"),
        ("new", "db", "new-2/db.tar"),
        ("old", "web", "old-1/web.tar.zst"),
    ]
    assert rows[0].cells(NOW) == ["shop", "new", "web", "node-a", "1.0 GiB", "1m00s"]
    assert present.relative_key("shop/f/web.tar", "", "shop") == "f/web.tar"


def test_a_manifest_readable() -> None:
    entry = {
        "container": "web",
        "key": "shop/new-2/web.tar.zst.age",
        "size": 2**20,
        "uncompressedSize": 4 * 2**20,
        "compression": "zstd",
        "sha256": "ab" * 32,
        "encryption": {"format": "age", "recipients": ["age1x", "age1y"]},
    }
    fields = dict(present.manifest_fields(manifest("new", "2026-01-02T11:00:02.500000Z", entry), "s3://b/k", "valid"))
    assert fields["Checkpoint"] == "shop/new (uid 0f0e0d0c-0000)"
    assert fields["Flags"] == "containers=web,db leaveRunning export=default storage"
    assert fields["Versions"] == "podman 5.4.0, criu 4.1"
    assert fields["Completed"].endswith("(took 2.5s)")
    assert present.archive_cells(entry) == [
        "web",
        "1.0 MiB",
        "4.0 MiB",
        "zstd",
        "age, 2 recipients",
        "ab" * 32,
        "shop/new-2/web.tar.zst.age",
    ]
    assert present.flags_text({"export": {"storageRef": {"name": "off"}, "key": "k"}, "compress": "none"}) == (
        "export=off key=k compress=none"
    )


def test_the_signature_state_of_a_manifest() -> None:
    key = signature.generate()
    keys = {signature.key_id(key.public_key()): key.public_key()}
    signed = sign(manifest("m", "2026-01-02T11:00:00Z"), key)
    assert present.signature_state(signed, keys, "") == f"valid, Ed25519 key {signature.key_id(key.public_key())[:16]}"
    assert present.signature_state({**signed, "name": "edited"}, keys, "").startswith("INVALID: ")
    assert present.signature_state(signed, None, "no ConfigMap").endswith("not verified: no ConfigMap")
    assert present.signature_state(manifest("m", ""), keys, "").startswith("unsigned")


# --- the commands that need no cluster ------------------------------------------------------------------------


def test_dry_run_prints_yaml_and_json_without_a_cluster() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["-n", "shop", "checkpoint", "node-a/web", "--export", "--dry-run", "--name", "w"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("apiVersion: checkpointer.dev/v1alpha1\nkind: ContainerCheckpoint\n")
    migrated = runner.invoke(cli, ["migrate", "node-a/web", "--to", "node-b", "-n", "shop", "--dry-run", "-o", "json"])
    assert migrated.exit_code == 0, migrated.output
    doc = json.loads(migrated.output)
    assert doc["kind"] == "ContainerMigration" and doc["metadata"]["namespace"] == "shop"
    assert doc["spec"] == {"source": {"nodeName": "node-a", "container": "web"}, "targetNodeName": "node-b"}
    # Without --to the controller chooses; --to the source node is a mistake said at once.
    chosen = runner.invoke(cli, ["migrate", "node-a/web", "-n", "s", "--dry-run", "-o", "json", "--compress", "none"])
    assert json.loads(chosen.output)["spec"] == {
        "source": {"nodeName": "node-a", "container": "web"},
        "compress": "none",
    }
    same = runner.invoke(cli, ["migrate", "node-a/web", "-n", "s", "--to", "node-a", "--dry-run"])
    assert same.exit_code == 1 and "is the node the container runs on" in same.output


def test_watch_takes_a_migration_by_any_of_kubectls_words() -> None:
    for word in ("cmig", "containermigration", "containermigrations", "ContainerMigration.checkpointer.dev"):
        assert plan.parse_kind(f"{word}/m") == ("ContainerMigration", "m")


def test_a_finished_migration_says_what_it_made_and_its_downtime() -> None:
    obj = {
        "kind": "ContainerMigration",
        "status": {
            "checkpointRef": {"name": "m"},
            "restoreRef": {"name": "m"},
            "downtimeSeconds": 1.234,
            "sourceNodeName": "node-a",
            "targetNodeName": "node-b",
            "frozenTime": "t0",
            "runningTime": "t1",
        },
    }
    lines = present.migration_lines(obj)
    assert lines == [
        "  made ContainerCheckpoint m, ContainerRestore m",
        "  downtime 1.23s: stopped on node-a at t0, running on node-b at t1",
    ]
    assert present.migration_lines({"kind": "ContainerCheckpoint"}) == []


def test_mistakes_are_one_line_and_exit_1() -> None:
    result = CliRunner().invoke(cli, ["-n", "x", "checkpoint", "web", "--dry-run"])
    assert result.exit_code == 1 and "is not NODE/CONTAINER" in result.output and "Traceback" not in result.output


def test_the_namespace_is_the_contexts_as_kubectl_reads_it(tmp_path: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "shop", "context": {"cluster": "c", "user": "u", "namespace": "shop"}},
            {"name": "plain", "context": {"cluster": "c", "user": "u"}},
        ],
        "current-context": "shop",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    assert context_namespace(str(path), None) == "shop"
    assert context_namespace(str(path), "plain") == "default"
    with pytest.raises(CliError, match="not in the kubeconfig"):
        context_namespace(str(path), "elsewhere")


def test_a_pods_checkpoint_names_the_pod_and_its_containers() -> None:
    runner = CliRunner()
    args = ["checkpoint", "pod/counter", "-c", "counter", "-n", "shop", "--dry-run", "-o", "json", "--name", "c"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["metadata"] == {"name": "c", "namespace": "shop"}
    # No node: the controller takes the Pod's. Always exported: alone, to the default storage.
    assert doc["spec"] == {"podRef": {"name": "counter", "containers": ["counter"]}, "export": {}}
    stored = runner.invoke(
        cli, ["checkpoint", "po/web", "--export=cold", "--compress", "gzip", "-n", "s", "--dry-run", "-o", "json"]
    )
    assert json.loads(stored.output)["spec"] == {
        "podRef": {"name": "web"},
        "export": {"storageRef": {"name": "cold"}},
        "compress": "gzip",
    }
    for args, words in [
        (["pod/web", "node-a/db"], "pod/NAME checkpoints one Pod"),
        (["pod/web", "--leave-running"], "always keep running"),
        (["node-a/web", "-c", "web"], "use it with pod/NAME"),
        (["pod/"], "is not pod/NAME"),
    ]:
        refused = runner.invoke(cli, ["checkpoint", *args, "-n", "s", "--dry-run"])
        assert refused.exit_code == 1 and words in refused.output, refused.output
