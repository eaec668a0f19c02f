"""What `./hack/quickstart` shows: a counter checkpointed on node-a into S3 goes on counting on node-b.

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
    checkpoint: str = "quickstart"
    restore: str = "quickstart"


@dataclass(frozen=True)
class Migration:
    last_on_source: int  # the counter's last output on node-a, when the checkpoint stopped it
    on_target: int  # the count on node-b RUN_SECONDS after the restore
    checkpoint: dict[str, Any]  # the ContainerCheckpoint's status
    restore: dict[str, Any]  # the ContainerRestore's status


def run_counter_args(container: str) -> list[str]:
    """The label gives the container to the namespace: only its ContainerCheckpoints may take it."""
    return ["run", "-d", *owned_by(NAMESPACE), "--name", container, COUNTER]


def checkpoint_yaml(names: Names) -> str:
    return f"""apiVersion: checkpointer.dev/v1alpha1
kind: ContainerCheckpoint
metadata:
  name: {names.checkpoint}
  namespace: {NAMESPACE}
spec:
  nodeName: {SOURCE}
  containers: [{names.container}]
  export: {{}}          # into the default CheckpointStorage, zstd
"""


def restore_yaml(names: Names, key: str = "<name>-<uid8>/counter.tar.zst") -> str:
    return f"""apiVersion: checkpointer.dev/v1alpha1
kind: ContainerRestore
metadata:
  name: {names.restore}
  namespace: {NAMESPACE}
spec:
  nodeName: {TARGET}
  source:
    checkpointRef: {{name: {names.checkpoint}}}
    # or, once the checkpoint object is gone: archive: {{key: {key}}}
    # (the key is relative to the namespace's folder, {NAMESPACE}/)
"""


def migrate_counter(env: LocalEnv, say: Callable[[str], None] = print, names: Names = Names()) -> Migration:
    """Start a counter on node-a, checkpoint it into S3, restore it on node-b; tell it through `say`."""
    source, target = env.nodes[SOURCE], env.nodes[TARGET]
    say(f"1. {SOURCE} runs a counter: a shell loop that counts 5 times a second, the count in its memory.")
    say(f"   podman {shlex.join(run_counter_args(names.container))}")
    source.podman(*run_counter_args(names.container))
    time.sleep(RUN_SECONDS)
    say(f"   count on {SOURCE}: {read_count(source, names.container)}")

    say(f"\n2. Checkpoint it into S3 (the container stops on {SOURCE}):")
    say(_indent(checkpoint_yaml(names)))
    checkpoint, took = _apply_until_done(env, "ContainerCheckpoint", names.checkpoint, checkpoint_yaml(names))
    logs = source.podman("logs", names.container).stdout.decode().split()
    last = int(logs[-1])
    archive = checkpoint["archives"][0]
    signed = ", its manifest signed by the controller" if checkpoint.get("manifestSHA256") else ""
    say(f"   ContainerCheckpoint {names.checkpoint}: Succeeded in {took:.1f}s{signed}")
    say(f"   archive {archive['key']}: {mib(archive['size'])} ({archive.get('compression', 'zstd')})")
    say(f"   the counter's last output on {SOURCE}: {last}")

    say(f"\n3. Restore it on {TARGET}:")
    say(_indent(restore_yaml(names, archive["key"].split(f"{NAMESPACE}/", 1)[1])))
    restore, took = _apply_until_done(env, "ContainerRestore", names.restore, restore_yaml(names))
    say(f"   ContainerRestore {names.restore}: Succeeded in {took:.1f}s, container {restore['containerName']} runs")
    say(f"   read from {restore['archive']['key']}, its sha256 checked against the signed manifest")
    time.sleep(RUN_SECONDS)
    on_target = read_count(target, restore["containerName"])
    fresh = int(RUN_SECONDS * 5)
    say(
        f"   count on {TARGET} {RUN_SECONDS:.0f}s later: {on_target}; it went on from {last} "
        f"(started afresh it would be near {fresh})"
    )
    say(f"\nThe count went on: {last} on {SOURCE} before the checkpoint, {on_target} on {TARGET} after the restore.")
    return Migration(last, on_target, checkpoint, restore)


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
{checkpoint_yaml(names)}EOF
kubectl wait ccp/{names.checkpoint} --for=jsonpath='{{.status.phase}}'=Succeeded --timeout=2m
kubectl get ccp {names.checkpoint} -o jsonpath='{{.status.archives[0].key}} {{.status.archives[0].size}}{{"\\n"}}' |
  awk '{{printf "%s %.2f MiB\\n", $1, $2 / 1048576}}'
podman-{SOURCE} logs --tail 1 {c}
kubectl apply -f - <<'EOF'
{restore_yaml(names)}EOF
kubectl wait crst/{names.restore} --for=jsonpath='{{.status.phase}}'=Succeeded --timeout=2m
sleep 2; podman-{TARGET} exec {c} cat /tmp/count
"""


def by_hand(workdir: Path, names: Names = Names()) -> str:
    w = shlex.quote(str(workdir))
    return f"""Do it again by hand. Keep an environment up in a second terminal (Ctrl-C there tears it down):

  ./hack/local-up --workdir {w}

then paste this here, as root ({w}/bin holds kubectl, and podman-<node> runs podman inside a node):

{by_hand_script(workdir, names)}
# Look, then clean up:
kubectl get ccp,crst   # their SIZE column is in bytes
kubectl delete crst {names.restore}
kubectl delete ccp {names.checkpoint}   # takes its archive and manifest out of S3
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
