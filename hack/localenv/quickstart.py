"""What `./hack/quickstart` shows: a counter moved from node-a to node-b through S3 goes on counting.

`migrate_counter` runs the story on any environment with both nodes (the quickstart's own, or the
test session's) and tells it through `say`; `by_hand` is the same story as commands for a person to
run against `./hack/local-up`.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localenv.env import LocalEnv
from localenv.images import COUNTER, owned_by, read_count
from localenv.nodes import NODE_ENV

MiB = 1024 * 1024
SOURCE = "node-a"
TARGET = "node-b"
NAMESPACE = "default"
# How long the demo lets the counter run on each node before it reads the count.
RUN_SECONDS = 2.0


def mib(size: int) -> str:
    """A size for people: `0.27 MiB`, `12.3 MiB`, `1024 MiB`."""
    value = size / MiB
    if value >= 100:
        return f"{value:.0f} MiB"
    if value >= 1:
        return f"{value:.1f} MiB"
    return f"{value:.2f} MiB" if value >= 0.01 else f"{value:.3f} MiB"


@dataclass(frozen=True)
class Names:
    container: str = "counter"
    # The ContainerMigration; its ContainerCheckpoint and ContainerRestore take its name.
    migration: str = "quickstart"


@dataclass(frozen=True)
class Migration:
    last_on_source: int  # the counter's last output on node-a, when the checkpoint stopped it
    on_target: int  # the count on node-b RUN_SECONDS after the restore
    migration: dict[str, Any]  # the ContainerMigration's status
    checkpoint: dict[str, Any]  # the status of the ContainerCheckpoint it made
    restore: dict[str, Any]  # the status of the ContainerRestore it made


def run_counter_args(container: str) -> list[str]:
    """The label gives the container to the namespace: only its ContainerCheckpoints may take it."""
    return ["run", "-d", *owned_by(NAMESPACE), "--name", container, COUNTER]


def migration_yaml(names: Names) -> str:
    return f"""apiVersion: checkpointer.dev/v1alpha1
kind: ContainerMigration
metadata:
  name: {names.migration}
  namespace: {NAMESPACE}
spec:
  source: {{nodeName: {SOURCE}, container: {names.container}}}
  targetNodeName: {TARGET}   # leave it out and the controller chooses a node
  # through the default CheckpointStorage, zstd
"""


def migrate_counter(env: LocalEnv, say: Callable[[str], None] = print, names: Names = Names()) -> Migration:
    """Start a counter on node-a and move it to node-b with a ContainerMigration; tell it through `say`."""
    source, target = env.nodes[SOURCE], env.nodes[TARGET]
    say(f"1. {SOURCE} runs a counter: a shell loop that counts 5 times a second, the count in its memory.")
    say(f"   podman {shlex.join(run_counter_args(names.container))}")
    source.podman(*run_counter_args(names.container))
    time.sleep(RUN_SECONDS)
    say(f"   count on {SOURCE}: {read_count(source, names.container)}")

    say(f"\n2. Move it to {TARGET} with one ContainerMigration:")
    say(_indent(migration_yaml(names)))
    moved, took = _apply_until_done(env, "ContainerMigration", names.migration, migration_yaml(names))
    checkpoint = env.wait_phase("ccp", moved["checkpointRef"]["name"], ["Succeeded"], namespace=NAMESPACE)["status"]
    restore = env.wait_phase("crst", moved["restoreRef"]["name"], ["Succeeded"], namespace=NAMESPACE)["status"]
    logs = source.podman("logs", names.container).stdout.decode().split()
    last = int(logs[-1])
    archive = checkpoint["archives"][0]
    signed = ", its manifest signed by the controller" if checkpoint.get("manifestSHA256") else ""
    say(f"   ContainerMigration {names.migration}: Succeeded in {took:.1f}s; it made and owns")
    say(f"   - ContainerCheckpoint {moved['checkpointRef']['name']}: the counter stopped on {SOURCE}, into S3{signed}")
    say(f"     archive {archive['key']}: {mib(archive['size'])} ({archive.get('compression', 'zstd')})")
    say(
        f"   - ContainerRestore {moved['restoreRef']['name']}: container {restore['containerName']} runs on "
        f"{TARGET}, its archive's sha256 checked against the signed manifest"
    )
    say(f"   the counter's last output on {SOURCE}: {last}")
    say(
        f"   downtime {moved['downtimeSeconds']:.2f}s: stopped on {SOURCE} at {moved['frozenTime']}, "
        f"running on {TARGET} at {moved['runningTime']}"
    )

    say(f"\n3. On {TARGET}:")
    time.sleep(RUN_SECONDS)
    on_target = read_count(target, restore["containerName"])
    fresh = int(RUN_SECONDS * 5)
    say(
        f"   count on {TARGET} {RUN_SECONDS:.0f}s later: {on_target}; it went on from {last} "
        f"(started afresh it would be near {fresh})"
    )
    say(
        f"\nThe count went on: {last} on {SOURCE} before the move, {on_target} on {TARGET} after it, "
        f"{moved['downtimeSeconds']:.2f}s without counting."
    )
    return Migration(last, on_target, moved, checkpoint, restore)


def bucket_listing(env: LocalEnv, prefix: str) -> list[str]:
    listing = env.s3.client().list_objects_v2(Bucket=env.s3.bucket, Prefix=prefix)
    return [f"  {mib(obj['Size']):>10}  {obj['Key']}" for obj in listing.get("Contents", [])]


def by_hand_script(workdir: Path, names: Names = Names()) -> str:
    """The same story as shell commands against `./hack/local-up --workdir <workdir>`."""
    w = shlex.quote(str(workdir))
    c = names.container
    return f"""export KUBECONFIG={w}/kubeconfig PATH={w}/bin:$PATH
podman-{SOURCE} {shlex.join(run_counter_args(c))}
sleep 2; podman-{SOURCE} exec {c} cat /tmp/count
kubectl apply -f - <<'EOF'
{migration_yaml(names)}EOF
kubectl wait cmig/{names.migration} --for=jsonpath='{{.status.phase}}'=Succeeded --timeout=2m
kubectl get cmig {names.migration} -o jsonpath='downtime {{.status.downtimeSeconds}}s{{"\\n"}}'
podman-{SOURCE} logs --tail 1 {c}
sleep 2; podman-{TARGET} exec {c} cat /tmp/count
"""


def by_hand(workdir: Path, names: Names = Names()) -> str:
    w = shlex.quote(str(workdir))
    return f"""Do it again by hand. Keep an environment up in a second terminal (Ctrl-C there tears it down):

  ./hack/local-up --workdir {w}

then paste this here, as root ({w}/bin holds kubectl, and podman-<node> runs podman inside a node):

{by_hand_script(workdir, names)}
# Look, then clean up:
kubectl get cmig,ccp,crst   # the migration and the checkpoint and restore it made
kubectl delete cmig {names.migration}   # with its checkpoint and restore, and the archive in S3
podman-{SOURCE} rm {names.container}; podman-{TARGET} rm -f {names.container}
"""


def write_tools(env: LocalEnv, kubectl: Path) -> Path:
    """`<workdir>/bin` with kubectl and podman-<node> (podman inside the node), and `<workdir>/kubeconfig`."""
    bin_dir = env.workdir / "bin"
    bin_dir.mkdir(exist_ok=True)
    link = bin_dir / "kubectl"
    link.unlink(missing_ok=True)
    link.symlink_to(kubectl)
    kubeconfig = env.workdir / "kubeconfig"
    kubeconfig.unlink(missing_ok=True)
    kubeconfig.symlink_to(env.kubeconfig)
    node_env = " ".join(f"{k}={shlex.quote(v)}" for k, v in NODE_ENV.items())
    for name, node in env.nodes.items():
        script = bin_dir / f"podman-{name}"
        enter = shlex.join(node.nsenter_argv())
        script.write_text(f'#!/bin/sh\n# podman inside {name}\nexec {enter} env {node_env} podman "$@"\n')
        script.chmod(0o755)
    return bin_dir


def _indent(text: str, prefix: str = "   ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip("\n").split("\n"))


def _apply_until_done(env: LocalEnv, kind: str, name: str, manifest: str) -> tuple[dict[str, Any], float]:
    """Apply `manifest` and wait for its object to succeed: its status and the seconds it took."""
    started = time.monotonic()
    env.kubectl("apply", "-f", "-", input=manifest)
    status: dict[str, Any] = env.wait_phase(kind, name, ["Succeeded", "Failed"], namespace=NAMESPACE)["status"]
    if status.get("phase") != "Succeeded":
        raise RuntimeError(f"{kind} {name} failed: {_ready_message(status)}")
    return status, time.monotonic() - started


def _ready_message(status: dict[str, Any]) -> str:
    ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return f"{ready.get('reason')}: {ready.get('message')}" if ready else json.dumps(status)
