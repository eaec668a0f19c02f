"""`hack/soak/run`: checkpoints and restores on both nodes under agent kills and S3 restarts.

It brings up a local environment of its own, keeps a few chains in flight (a small memory
workload, its checkpoint exported to S3, a restore of it on the other node or on the same one
under a new name, then cleanup), and meanwhile a fault thread SIGKILLs a random node's agent or
stops the S3 server for a few seconds, at random intervals. It ends with the invariants of
docs/failure-semantics.md and prints what it did and what was lost; lost must be 0.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localenv import faults
from localenv.env import LocalEnv, remove_workdir
from localenv.images import MEMORY, owned_by, wait_for_log
from localenv.procs import REPO_ROOT, LocalEnvError

# The invariants live with the fault tests, which run them as a module of their own folder.
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))

import invariants

NODES = ("node-a", "node-b")  # node-a's agent uses podman's REST API, node-b's the CLI
TERMINAL = ("Succeeded", "Failed")
KINDS = {"ContainerCheckpoint": "ccp", "ContainerRestore": "crst"}
# Failures that the fault table of docs/failure-semantics.md gives for the faults injected here; any
# other reason is reported apart, although the invariants alone decide what is lost.
DOCUMENTED_FAILURES = {"ContainerCheckpoint": {"CheckpointInterrupted"}, "ContainerRestore": {"RestoreInterrupted"}}
# The default backoff doubles up to 300 s: with S3 stopped every minute or so, uploads would spend
# the soak waiting between attempts instead of being retried under faults.
SETTINGS = {"CHECKPOINTER_UPLOAD_RETRY_SECONDS": "2", "CHECKPOINTER_UPLOAD_RETRY_MAX_SECONDS": "16"}
POLL_SECONDS = 1.0
# A failed checkpoint's container comes back by the agent's restore in place, which may trail the
# object's last status write.
GIVEN_BACK_SECONDS = 30.0


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    status = obj.get("status") or {}
    found: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return found


@dataclass
class Record:
    """One ContainerCheckpoint or ContainerRestore the soak created, and what became of it."""

    kind: str
    name: str
    node: str
    detail: str
    started: float
    uid: str = ""
    phase: str = ""
    reason: str = ""
    reasons_seen: set[str] = field(default_factory=set)
    seconds: float | None = None
    late: bool = False

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL


@dataclass(frozen=True)
class Plan:
    node: str
    mib: int
    compress: str
    target: str  # where its restore goes, should its checkpoint succeed


@dataclass
class Figures:
    started: collections.Counter[str] = field(default_factory=collections.Counter)
    agent_kills: collections.Counter[str] = field(default_factory=collections.Counter)
    s3_restarts: int = 0
    fault_errors: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    not_given_back: list[str] = field(default_factory=list)
    restored_not_running: list[str] = field(default_factory=list)
    pending_deletions: dict[str, tuple[str, str]] = field(default_factory=dict)


class Soak:
    def __init__(self, env: LocalEnv, args: argparse.Namespace) -> None:
        self.env = env
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.Lock()
        # Held while S3 is down, and by whoever reads the bucket to check an object: a check must
        # not take a stopped server for a missing archive. It also keeps boto3's default session,
        # which is not thread-safe, to one thread at a time.
        self.s3_lock = threading.Lock()
        self.stop_faults = threading.Event()
        self.abort = threading.Event()
        self.records: list[Record] = []
        self.figures = Figures()
        self.t0 = time.monotonic()
        self.bound = self.t0 + args.minutes * 60

    # --- output ----------------------------------------------------------------------------------

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.t0
        with self.lock:
            print(f"[{int(elapsed) // 60:02d}:{int(elapsed) % 60:02d}] {text}", flush=True)

    # --- the budget ------------------------------------------------------------------------------

    def claim(self, kind: str) -> bool:
        """Count one more operation of `kind` when the budget and the time bound allow it."""
        with self.lock:
            if self.abort.is_set() or time.monotonic() >= self.bound:
                return False
            if sum(self.figures.started.values()) >= self.args.operations:
                return False
            self.figures.started[kind] += 1
            return True

    def plan(self) -> Plan:
        """What one chain does, drawn from the one seeded generator (reseeded copies draw poorly)."""
        with self.lock:
            rng = self.rng
            return Plan(rng.choice(NODES), rng.randint(16, 32), rng.choice(["zstd", "none"]), rng.choice(NODES))

    # --- objects ---------------------------------------------------------------------------------

    def create(self, kind: str, node: str, spec: dict[str, Any], detail: str) -> Record:
        name = unique(KINDS[kind])
        record = Record(kind, name, node, detail, time.monotonic())
        with self.lock:
            self.records.append(record)
        self.env.apply(
            {
                "apiVersion": "checkpointer.dev/v1alpha1",
                "kind": kind,
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"nodeName": node, **spec},
            }
        )
        return record

    def get(self, record: Record) -> dict[str, Any] | None:
        try:
            out = self.env.kubectl("get", KINDS[record.kind], record.name, "-n", "default", "-o", "json", check=False)
        except subprocess.TimeoutExpired:
            return None  # a loaded machine; the next poll asks again
        if out.returncode != 0:
            return None
        obj: dict[str, Any] = json.loads(out.stdout)
        return obj

    def observe(self, record: Record, obj: dict[str, Any]) -> None:
        record.uid = obj["metadata"]["uid"]
        record.phase = str((obj.get("status") or {}).get("phase") or "")
        reason = str(ready(obj).get("reason") or "")
        if reason:
            record.reason = reason
            record.reasons_seen.add(reason)

    def wait(self, record: Record) -> dict[str, Any] | None:
        """The object once terminal; None past its deadline, when it is left for the final check."""
        deadline = record.started + self.args.deadline
        while True:
            obj = self.get(record)
            if obj is not None:
                self.observe(record, obj)
                if record.terminal:
                    record.seconds = time.monotonic() - record.started
                    return obj
            if time.monotonic() > deadline:
                record.late = True
                status = json.dumps(obj.get("status") if obj else None)
                with self.lock:
                    self.figures.violations.append(
                        f"4. {record.kind} default/{record.name} (uid {record.uid}) is not terminal after "
                        f"{self.args.deadline:.0f}s: {status[:600]}"
                    )
                self.say(f"LATE {KINDS[record.kind]} {record.name} on {record.node}: {record.phase or '-'}")
                return None
            time.sleep(POLL_SECONDS)

    def delete(self, record: Record) -> None:
        self.env.kubectl("delete", KINDS[record.kind], record.name, "-n", "default", "--wait=false", check=False)
        with self.lock:
            self.figures.pending_deletions[record.uid] = (KINDS[record.kind], record.name)

    # --- containers ------------------------------------------------------------------------------

    def podman(self, node: str, *args: str) -> Any:
        return self.env.nodes[node].podman(*args, check=False, timeout=120)

    def container_state(self, node: str, container: str) -> str:
        out = self.podman(node, "inspect", "--format", "{{.State.Status}}", container)
        return str(out.stdout.decode().strip()) if out.returncode == 0 else "absent"

    def remove(self, node: str, container: str) -> None:
        self.podman(node, "rm", "-f", "-t", "0", container)

    def wait_running(self, node: str, container: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.container_state(node, container)
            if state == "running" or time.monotonic() > deadline:
                return state
            time.sleep(1)

    # --- checks of one object, before its containers and itself are cleaned up ----------------------

    def check_checkpoint(self, obj: dict[str, Any]) -> list[str]:
        """Invariants 1 and 3 for one checkpoint: its archive as stated, or its container not left bare."""
        with self.s3_lock:
            found = invariants.archives_in_bucket(self.env, [obj])
            found += invariants.settled(lambda: invariants.stopped_containers_keep_their_archive(self.env, [obj], []))
        return found

    # --- one chain: workload, checkpoint, restore, cleanup ---------------------------------------

    def chains(self) -> None:
        while not self.abort.is_set() and self.claim("ContainerCheckpoint"):
            try:
                self.chain(self.plan())
            except Exception as e:
                with self.lock:
                    self.figures.harness_errors.append(f"{type(e).__name__}: {e}")
                self.say(f"harness error: {type(e).__name__}: {str(e)[:400]}")
                traceback.print_exc()

    def chain(self, plan: Plan) -> None:
        node, mib, compress, target = plan.node, plan.mib, plan.compress, plan.target
        container = unique("soak")
        self.env.nodes[node].podman(
            "run", "-d", *owned_by("default"), "--name", container, MEMORY, str(mib), timeout=120
        )
        wait_for_log(self.env.nodes[node], container, "ready", timeout=120)
        ccp = self.create(
            "ContainerCheckpoint",
            node,
            {"containers": [container], "export": {}, "compress": compress},
            f"{container} {mib}MiB {compress}",
        )
        obj = self.wait(ccp)
        if obj is None:
            return  # its container and object stay as they are, for the final check to judge
        found = self.check_checkpoint(obj)
        note = ""
        # Whatever the reason, a failed checkpoint gives its container back, or never stopped it.
        if ccp.phase == "Failed":
            state = self.wait_running(node, container, GIVEN_BACK_SECONDS)
            if state != "running":
                with self.lock:
                    self.figures.not_given_back.append(f"{ccp.name} on {node}: {container} is {state}")
                note = f", container {state}, not given back"
        retried = " after UploadRetrying" if "UploadRetrying" in ccp.reasons_seen and ccp.phase == "Succeeded" else ""
        self.say(
            f"ccp  {ccp.name} {node} {ccp.detail}: {ccp.phase}/{ccp.reason}{retried} in {ccp.seconds:.1f}s{note}"
            + (f" VIOLATION {found}" if found else "")
        )
        with self.lock:
            self.figures.violations += found
        if found:
            return  # the evidence stays on the node and in the cluster
        restore: Record | None = None
        restored: tuple[str, str] | None = None
        if ccp.phase == "Succeeded" and self.claim("ContainerRestore"):
            spec: dict[str, Any] = {"source": {"checkpointRef": {"name": ccp.name}}}
            # The checkpointed container keeps its name on its own node.
            name = container if target != node else f"{container}-again"
            if name != container:
                spec["name"] = name
            restore = self.create("ContainerRestore", target, spec, f"{ccp.name} from {node} as {name}")
            robj = self.wait(restore)
            if robj is None:
                return
            restored = (target, name)
            note = ""
            if restore.phase == "Succeeded":
                state = self.wait_running(target, name, 10)
                if state != "running":
                    with self.lock:
                        self.figures.restored_not_running.append(f"{restore.name} on {target}: {name} is {state}")
                    note = f", container {state}"
            self.say(
                f"crst {restore.name} {target} {restore.detail}: {restore.phase}/{restore.reason} "
                f"in {restore.seconds:.1f}s{note}"
            )
        if restored is not None:
            self.remove(*restored)
        self.remove(node, container)
        if restore is not None:
            self.delete(restore)
        self.delete(ccp)

    # --- faults ----------------------------------------------------------------------------------

    def fault_loop(self) -> None:
        rng = random.Random(self.args.seed * 7919 + 1)
        while not self.stop_faults.wait(rng.uniform(self.args.fault_min, self.args.fault_max)):
            try:
                if rng.random() < 0.6:
                    self.kill_agent(rng.choice(NODES))
                else:
                    self.restart_s3(rng, also_kill=rng.random() < 0.25)
            except Exception as e:
                with self.lock:
                    self.figures.fault_errors.append(f"{type(e).__name__}: {e}")
                self.say(f"fault error: {type(e).__name__}: {str(e)[:600]}")
                # The soak cannot go on without both agents and S3: stop starting operations.
                self.abort.set()
                return

    def kill_agent(self, node: str) -> None:
        with self.lock:
            self.figures.agent_kills[node] += 1
        self.say(f"fault: SIGKILL agent {node}")
        try:
            faults.restart_agent(self.env, node, SETTINGS, kill=True)
        except LocalEnvError as e:
            # One more start, so that a slow start under load is not taken for a broken agent.
            self.say(f"fault: agent {node} did not come back ({str(e)[:300]}); starting it again")
            faults.restart_agent(self.env, node, SETTINGS)

    def restart_s3(self, rng: random.Random, also_kill: bool) -> None:
        down = rng.uniform(self.args.s3_down_min, self.args.s3_down_max)
        with self.s3_lock:
            with self.lock:
                self.figures.s3_restarts += 1
            self.say(f"fault: S3 stopped for {down:.1f}s")
            faults.stop_s3(self.env)
            stopped = time.monotonic()
            try:
                time.sleep(down / 2 if also_kill else down)
                if also_kill:
                    self.kill_agent(rng.choice(NODES))
                    time.sleep(down / 2)
            finally:
                faults.start_s3(self.env)
        self.say(f"fault: S3 started again after {time.monotonic() - stopped:.1f}s")

    def make_whole(self) -> None:
        """S3 and both agents up, whatever the last fault left, before the final check."""
        if not self.env.s3.process.alive():
            faults.start_s3(self.env)
        for node in NODES:
            port = self.env.health_ports.get(f"agent-{node}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                    if reply.status == 200:
                        continue
            except OSError:
                pass
            self.say(f"agent {node} is not healthy at the end; starting it again")
            faults.restart_agent(self.env, node, SETTINGS)

    # --- the run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.t0 = time.monotonic()
        self.bound = self.t0 + self.args.minutes * 60
        fault_thread = threading.Thread(target=self.fault_loop, name="faults", daemon=True)
        fault_thread.start()
        try:
            with ThreadPoolExecutor(self.args.parallel, thread_name_prefix="chain") as pool:
                for future in [pool.submit(self.chains) for _ in range(self.args.parallel)]:
                    future.result()
        finally:
            self.stop_faults.set()
            fault_thread.join()
        soak_seconds = time.monotonic() - self.t0
        timed_out = time.monotonic() >= self.bound
        self.say("operations done; faults stopped; making the environment whole")
        self.make_whole()
        self.wait_deletions()
        self.say("checking the invariants")
        end_violations = self.final_check()
        self.refresh()
        return self.summary(soak_seconds, timed_out, end_violations)

    def wait_deletions(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.figures.pending_deletions and time.monotonic() < deadline:
            for uid, (kind, name) in list(self.figures.pending_deletions.items()):
                out = self.env.kubectl(
                    "get", kind, name, "-n", "default", "-o", "jsonpath={.metadata.uid}", check=False
                )
                if "NotFound" in out.stderr or (out.returncode == 0 and out.stdout.strip() != uid):
                    del self.figures.pending_deletions[uid]
            time.sleep(2)

    def final_check(self) -> list[str]:
        try:
            invariants.check_invariants(self.env, timeout=self.args.final_timeout)
        except AssertionError as e:
            found = [line[2:] for line in str(e).splitlines() if line.startswith("- ")]
            # A late object is counted once, when its deadline passed.
            late = {r.uid for r in self.records if r.late and r.uid}
            return [v for v in found if not (v.startswith("4. ") and any(uid in v for uid in late))]
        return []

    def refresh(self) -> None:
        """The final phase of every object the soak left in place (late ones may have ended since)."""
        for record in self.records:
            if record.terminal:
                continue
            obj = self.get(record)
            if obj is not None:
                self.observe(record, obj)

    def summary(self, soak_seconds: float, timed_out: bool, end_violations: list[str]) -> dict[str, Any]:
        f = self.figures
        reasons: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in KINDS}
        unexpected: list[str] = []
        retried = 0
        for r in self.records:
            if not r.terminal:
                continue
            reasons[r.kind][f"{r.phase}/{r.reason}"] += 1
            if r.phase == "Succeeded" and "UploadRetrying" in r.reasons_seen:
                retried += 1
            if r.phase == "Failed" and r.reason not in DOCUMENTED_FAILURES[r.kind]:
                unexpected.append(f"{r.kind} {r.name} on {r.node}: {r.reason}")
        never = [f"{r.kind} {r.name} (uid {r.uid}): {r.phase or 'no phase'}" for r in self.records if not r.terminal]
        violations = f.violations + end_violations
        stuck = [f"{kind} {name}" for kind, name in f.pending_deletions.values()]
        return {
            "seed": self.args.seed,
            "options": {
                k: getattr(self.args, k)
                for k in ("operations", "minutes", "parallel", "deadline", "fault_min", "fault_max")
            },
            "operations": {
                "started": sum(f.started.values()),
                "checkpoints": f.started["ContainerCheckpoint"],
                "restores": f.started["ContainerRestore"],
            },
            "timeBoundReached": timed_out,
            "finished": {
                "total": sum(1 for r in self.records if r.terminal),
                "byKind": {kind: dict(sorted(c.items())) for kind, c in reasons.items()},
                "succeededAfterUploadRetrying": retried,
            },
            "faults": {
                "agentKills": dict(sorted(f.agent_kills.items())),
                "s3Restarts": f.s3_restarts,
                "total": sum(f.agent_kills.values()) + f.s3_restarts,
                "errors": f.fault_errors,
            },
            "lost": len(violations),
            "violations": violations,
            "neverTerminal": never,
            "unexpectedFailures": unexpected,
            "notGivenBack": f.not_given_back,
            "restoredNotRunning": f.restored_not_running,
            "deletionsStuck": stuck,
            "harnessErrors": f.harness_errors,
            "durationSeconds": round(soak_seconds, 1),
        }


def report(result: dict[str, Any]) -> str:
    ops, fin, flt = result["operations"], result["finished"], result["faults"]
    lines = [
        "",
        f"operations started: {ops['started']} ({ops['checkpoints']} checkpoints, {ops['restores']} restores)"
        + ("; time bound reached" if result["timeBoundReached"] else ""),
        f"objects finished:   {fin['total']} (Succeeded after UploadRetrying: {fin['succeededAfterUploadRetrying']})",
        "",
        "| kind | phase/reason | count |",
        "|---|---|---|",
    ]
    for kind, counts in fin["byKind"].items():
        lines += [f"| {kind} | {reason} | {n} |" for reason, n in counts.items()]
    kills = ", ".join(f"{node} {n}" for node, n in flt["agentKills"].items()) or "none"
    lines += [
        "",
        f"faults injected:    {flt['total']} (agent SIGKILLs: {kills}; S3 restarts: {flt['s3Restarts']})",
        f"duration:           {result['durationSeconds']:.0f}s",
    ]
    for key, title in (
        ("unexpectedFailures", "failures whose reason the fault table of docs/failure-semantics.md does not give"),
        ("notGivenBack", "failed checkpoints whose container did not run again"),
        ("restoredNotRunning", "restores that Succeeded with the container not running"),
        ("deletionsStuck", "objects still there after their deletion"),
        ("harnessErrors", "errors of the soak itself"),
        ("neverTerminal", "objects that never became terminal"),
        ("violations", "invariant violations"),
    ):
        if result[key]:
            lines += ["", f"{title}:"] + [f"  - {item}" for item in result[key]]
    lines += ["", f"LOST: {result['lost']}"]
    return "\n".join(lines)


@contextlib.contextmanager
def environment(workdir: Path, keep: bool) -> Iterator[LocalEnv]:
    env = LocalEnv.up(workdir / "env", agent_settings=SETTINGS)
    try:
        yield env
    finally:
        env.down()
        # The logs are the evidence for whatever the figures say; the rest is gigabytes of state.
        shutil.copytree(workdir / "env" / "logs", workdir / "logs", dirs_exist_ok=True)
        if not keep:
            remove_workdir(workdir / "env")


def main() -> int:
    parser = argparse.ArgumentParser(prog="hack/soak/run", description=__doc__.splitlines()[0])
    parser.add_argument("--operations", type=int, default=200, help="checkpoints and restores to start")
    parser.add_argument(
        "--minutes",
        type=float,
        default=20,
        help="no operation starts after this; those in flight get their --deadline, then the final check runs",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and printed)")
    parser.add_argument("--parallel", type=int, default=3, help="chains in flight at once")
    parser.add_argument("--deadline", type=float, default=300, help="seconds an object may take to be terminal")
    parser.add_argument("--final-timeout", type=float, default=180, help="the final check's wait for terminal")
    parser.add_argument("--fault-min", type=float, default=5, help="shortest pause between faults, seconds")
    parser.add_argument("--fault-max", type=float, default=20, help="longest pause between faults, seconds")
    parser.add_argument("--s3-down-min", type=float, default=2, help="shortest S3 outage, seconds")
    parser.add_argument("--s3-down-max", type=float, default=8, help="longest S3 outage, seconds")
    parser.add_argument("--out", type=Path, help="figures as JSON (default: soak.json in the work directory)")
    parser.add_argument("--keep", action="store_true", help="keep the environment's state after the run")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    # A terminated soak still tears its environment down (the finally blocks run on SystemExit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="checkpointer-soak-"))
    out = args.out or workdir / "soak.json"
    print(f"soak: seed {args.seed}, work directory {workdir}", flush=True)
    began = time.monotonic()
    with environment(workdir, args.keep) as env:
        print(f"environment up in {time.monotonic() - began:.0f}s", flush=True)
        result = Soak(env, args).run()
    result["wallSeconds"] = round(time.monotonic() - began, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"figures: {out}\nlogs: {workdir / 'logs'}")
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
