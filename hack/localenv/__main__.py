"""`python -m localenv up|demo`: the local environment for people (hack/local-up, hack/quickstart)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from localenv.env import LocalEnv, remove_workdir
from localenv.images import COUNTER, owned_by, read_count

CHECKPOINT = "quickstart"


def up(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="checkpointer-"))
    env = LocalEnv.up(workdir, args.nodes)
    print(f"environment up in {workdir}\n  export KUBECONFIG={env.kubeconfig}\n  details: {workdir / 'env.json'}")
    print("press Ctrl-C to tear everything down")
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        env.down()
        remove_workdir(workdir)
    return 0


def demo(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="checkpointer-demo-"))
    started = time.monotonic()
    env = LocalEnv.up(workdir, ["node-a"])
    try:
        print(f"local cluster, S3 and node-a up in {time.monotonic() - started:.0f}s (workdir {workdir})")
        node = env.nodes["node-a"]
        node.podman("run", "-d", *owned_by("default"), "--name", "counter", COUNTER)
        time.sleep(1)
        print(f"workload 'counter' is running on node-a, count {read_count(node, 'counter')}")
        manifest = f"""apiVersion: checkpointer.dev/v1alpha1
kind: ContainerCheckpoint
metadata:
  name: {CHECKPOINT}
  namespace: default
spec:
  nodeName: node-a
  containers: [counter]
  export: {{}}
"""
        print("applying:\n" + manifest)
        env.kubectl("apply", "-f", "-", input=manifest)
        env.wait_phase("ccp", CHECKPOINT, ["Succeeded", "Failed"])
        print(env.kubectl("get", "ccp", CHECKPOINT, "-o", "wide").stdout)
        status = json.loads(env.kubectl("get", "ccp", CHECKPOINT, "-o", "json").stdout)["status"]
        print("status:\n" + json.dumps(status, indent=2))
        listing = env.s3.client().list_objects_v2(Bucket=env.s3.bucket)
        print(f"objects in bucket {env.s3.bucket}:")
        for obj in listing.get("Contents", []):
            print(f"  {obj['Size']:>12}  {obj['Key']}")
        return 0 if status.get("phase") == "Succeeded" else 1
    finally:
        env.down()
        remove_workdir(workdir)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m localenv")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="bring the environment up and keep it until Ctrl-C")
    p_up.add_argument("--workdir")
    p_up.add_argument("--nodes", nargs="+", default=["node-a", "node-b"])
    p_up.set_defaults(func=up)
    sub.add_parser("demo", help="bring it up, checkpoint a workload into S3, print the result, tear down").set_defaults(
        func=demo
    )
    args = parser.parse_args()
    # A terminated demo still tears its environment down (the finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
