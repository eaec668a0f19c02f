"""`python -m localenv up|demo`: the local environment for people (hack/local-up, hack/quickstart)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from pathlib import Path

from localenv import quickstart
from localenv.env import LocalEnv, remove_workdir
from localenv.procs import BIN


def up(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="checkpointer-"))
    env = LocalEnv.up(workdir, args.nodes)
    bin_dir = quickstart.write_tools(env, BIN / "kubectl")
    print(f"environment up in {workdir}\n  export KUBECONFIG={workdir / 'kubeconfig'} PATH={bin_dir}:$PATH")
    print(f"  kubectl, and podman inside each node: {', '.join(f'podman-{n}' for n in env.nodes)}")
    print(f"  details: {workdir / 'env.json'}")
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
    print("checkpointer quickstart: a running counter moves from node-a to node-b through S3, memory and all\n")
    try:
        env = LocalEnv.up(workdir, [quickstart.SOURCE, quickstart.TARGET])
    except BaseException:
        # up() has stopped what it started; its logs are what tells why.
        print(f"the environment did not come up; its logs stay in {workdir / 'logs'}", file=sys.stderr)
        raise
    try:
        print(
            f"control plane, S3 server, node-a and node-b (podman + CRIU), the controller and an agent per node "
            f"up in {time.monotonic() - started:.0f}s\n"
        )
        try:
            migration = quickstart.migrate_counter(env)
        except RuntimeError as failed:
            print(f"\nquickstart failed: {failed}\n\n{env.logs()}")
            return 1
        print(f"\nin the bucket {env.s3.bucket}:")
        print("\n".join(quickstart.bucket_listing(env, migration.checkpoint["archives"][0]["key"].rsplit("/", 1)[0])))
        print("\n" + quickstart.by_hand(Path(tempfile.gettempdir()) / "checkpointer"))
        return 0 if migration.on_target > migration.last_on_source else 1
    finally:
        env.down()
        remove_workdir(workdir)
        print(f"torn down; {time.monotonic() - started:.0f}s in all")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m localenv")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="bring the environment up and keep it until Ctrl-C")
    p_up.add_argument("--workdir")
    p_up.add_argument("--nodes", nargs="+", default=["node-a", "node-b"])
    p_up.set_defaults(func=up)
    sub.add_parser("demo", help="bring it up, move a counter from node-a to node-b through S3, tear down").set_defaults(
        func=demo
    )
    args = parser.parse_args()
    # A terminated demo still tears its environment down (the finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
