"""`hack/bench/run`: one invocation measures the data path, the restore path, the control plane,
schedules at scale and what metrics cost; `hack/bench/run PART` measures one of them alone.

Writes _output/bench/results.json and _output/bench/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench import controlplane, datapath, metrics_cost, schedules
from localenv.env import LocalEnv
from localenv.procs import REPO_ROOT


def _f(value: Any, digits: int = 2) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _range(row: dict[str, Any], key: str, digits: int = 2) -> str:
    """The spread of a figure as "min-max" (its median is in the table already)."""
    s = row.get("spread", {}).get(key)
    if not s or s["min"] != s["min"]:
        return ""
    return f" ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def _host(row: dict[str, Any]) -> str:
    """Load, CPU wait and I/O stall over the row's counted runs, all configurations together."""
    ranges = list(row.get("host", {}).values())

    def span(key: str, scale: float, digits: int) -> str:
        values = [v for r in ranges for v in r.get(key, [])]
        return f"{min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f}" if values else "-"

    return f"{span('load1', 1, 1)} | {span('cpuWait', 100, 0)} | {span('ioFull', 100, 0)}"


def markdown(results: dict[str, Any]) -> str:
    warmup = results.get("warmup", 0)
    lines = [
        f"Measured {results['date']} on {results['machine']['cpus']} cores, kernel {results['machine']['kernel']}; "
        f"medians of {results['repeats']} rounds (min-max in brackets; c/a's from the ratios within each round), "
        f"{warmup} warm-up round(s) per size discarded, page cache settled before each run: "
        f"{results.get('settle', '-')}"
        + (
            f", then waited for less than {quiet:.0%} of the CPUs busy."
            if (quiet := results.get("quietBelow"))
            else "."
        ),
        "",
    ]
    lines += [
        "| size | compression | link to S3 | (a) floor s | (b) baseline s (upload) | (c) checkpointer s | c/a | b/c "
        "| size / zstd -3 | agent peak RSS MiB | CRIU frozen ms (a / c) | restore baseline s "
        "| restore checkpointer s | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["datapath"]:
        lines.append(
            f"| {r['sizeMiB']} MiB | {r['compression']} | {r['link']} "
            f"| {_f(r['floorSeconds'])}{_range(r, 'floorSeconds')} "
            f"| {_f(r['baselineSeconds'])} ({_f(r['baselineUploadSeconds'])}) "
            f"| {_f(r['checkpointerSeconds'])}{_range(r, 'checkpointerSeconds')} "
            f"| {_f(r['c_over_a'])}{_range(r, 'c_over_a')} | {_f(r['b_over_c'])} "
            f"| {_f(r['size_over_zstd3'], 3)} | {_f(r['agentPeakRssMiB'], 0)}{_range(r, 'agentPeakRssMiB', 0)} "
            f"| {_f(r['frozenFloorMs'], 0)} / {_f(r['frozenCheckpointerMs'], 0)} "
            f"| {_f(r['restoreBaselineSeconds'])} | {_f(r['restoreCheckpointerSeconds'])} "
            f"| {_f(r['restore_baseline_over_checkpointer'])} |"
        )
    lines += [
        "",
        "Host during the counted runs (load average at their start; % of their time some task waited "
        "for a CPU, and all tasks for I/O):",
        "",
        "| size | compression | link to S3 | load | CPU wait % | I/O stall % |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["datapath"]:
        lines.append(f"| {r['sizeMiB']} MiB | {r['compression']} | {r['link']} | {_host(r)} |")
    if any("baseCheckpointerSeconds" in r for r in results["datapath"]):
        lines += [
            "",
            f"Against the baseline revision {results.get('baselineRev')} (its controller and agent, in the same "
            "rounds; new/base from the medians, min-max of the ratios within each round):",
            "",
            "| size | compression | link to S3 | (c) new s | (c) base s | new/base | c/a new | c/a base "
            "| agent peak RSS new MiB | base MiB | new/base |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["datapath"]:
            if "baseCheckpointerSeconds" not in r:
                continue
            base_ca = r["spread"]["baseC_over_a"]
            lines.append(
                f"| {r['sizeMiB']} MiB | {r['compression']} | {r['link']} "
                f"| {_f(r['checkpointerSeconds'])}{_range(r, 'checkpointerSeconds')} "
                f"| {_f(r['baseCheckpointerSeconds'])}{_range(r, 'baseCheckpointerSeconds')} "
                f"| {_f(r['c_over_base'], 3)}{_range(r, 'c_over_base', 3)} "
                f"| {_f(r['c_over_a'])} | {_f(r['baseCheckpointerSeconds'] / r['floorSeconds'])}"
                f" ({base_ca['min']:.2f}-{base_ca['max']:.2f}) "
                f"| {_f(r['agentPeakRssMiB'], 0)} | {_f(r['baseAgentPeakRssMiB'], 0)} "
                f"| {_f(r['rss_over_base'], 3)} |"
            )
    if any("encryptedSeconds" in r for r in results["datapath"]):
        lines += [
            "",
            "With encryption (age, to one X25519 recipient), in the same rounds as c: c into a storage with "
            "`encryption`, against c into the default storage (min-max of the ratios within each round):",
            "",
            "| size | compression | link to S3 | (c) s | (c) encrypted s | encrypted/c | agent peak RSS MiB "
            "| encrypted MiB | encrypted/plain size |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["datapath"]:
            if "encryptedSeconds" not in r:
                continue
            lines.append(
                f"| {r['sizeMiB']} MiB | {r['compression']} | {r['link']} "
                f"| {_f(r['checkpointerSeconds'])}{_range(r, 'checkpointerSeconds')} "
                f"| {_f(r['encryptedSeconds'])}{_range(r, 'encryptedSeconds')} "
                f"| {_f(r['cEncrypted_over_c'], 3)}{_range(r, 'cEncrypted_over_c', 3)} "
                f"| {_f(r['agentPeakRssMiB'], 0)}{_range(r, 'agentPeakRssMiB', 0)} "
                f"| {_f(r['encryptedAgentPeakRssMiB'], 0)}{_range(r, 'encryptedAgentPeakRssMiB', 0)} "
                f"| {_f(r['encryptedSize_over_size'], 4)} |"
            )
    if results.get("controlplane"):
        lines += [
            "",
            "Control plane (agents use an instant runtime: no podman, it returns at once):",
            "",
            "| objects | nodes | creators | create/s | p50 to Scheduled s | p99 to Scheduled s | p50 to pickup s "
            "| p99 to pickup s | controller RSS MiB (peak) | agent RSS MiB (median / max) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in results["controlplane"]:
            lines.append(
                f"| {c['objects']} | {c['nodes']} | {c['creators']} | {_f(c['createdPerSecond'], 0)} "
                f"| {_f(c['toScheduledP50'])} "
                f"| {_f(c['toScheduledP99'])} | {_f(c['toPickupP50'])} | {_f(c['toPickupP99'])} "
                f"| {_f(c['controllerRssMiB'], 0)} ({_f(c['controllerPeakRssMiB'], 0)}) "
                f"| {_f(c['agentRssMiBMedian'], 0)} / {_f(c['agentRssMiBMax'], 0)} |"
            )
    lines += schedules_markdown(results.get("schedules") or [])
    lines += metrics_cost_markdown(results.get("metricsCost") or {})
    return "\n".join(lines) + "\n"


def _p(stats: dict[str, float], key: str) -> str:
    return _f(stats.get(key), 2)


def schedules_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "Schedules at scale (every schedule `* * * * *`, retention keepLast; instant agents). Lateness from the "
        "scheduled time to the checkpoint's creation, as its first event reached a watch and as its "
        "creationTimestamp says (whole seconds, rounded down; negative: created ahead of its time), and to "
        "pickup, the agent's own startTime; p50 / p99 / max in seconds. Warm-up runs are shown, not counted:",
        "",
        "| schedules | nodes | namespaces | run (UTC) | created / expected | to creation (watch) "
        "| to creationTimestamp | to pickup |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def three(stats: dict[str, float]) -> str:
        return f"{_p(stats, 'p50')} / {_p(stats, 'p99')} / {_p(stats, 'max')}"

    for row in rows:
        for run in row["perRun"]:
            lines.append(
                f"| {row['schedules']} | {row['nodes']} | {row['namespaces']} "
                f"| {run['scheduledTime'][11:19]}{' (warm-up)' if run.get('warmUp') else ''} "
                f"| {run['created']} / {row['expectedPerRun']} | {three(run['toCreated'])} "
                f"| {three(run.get('toCreationTimestamp', {}))} | {three(run['toPickup'])} |"
            )
        lines.append(
            f"| {row['schedules']} | {row['nodes']} | {row['namespaces']} | all {row['runs']} "
            f"| {row['createdAll']} / {row['runs'] * row['expectedPerRun']} | {three(row['toCreated'])} "
            f"| {three(row.get('toCreationTimestamp', {}))} | {three(row['toPickup'])} |"
        )
    lines += [
        "",
        "| schedules | controller RSS MiB peak / after the runs | controller CPU s per run | API writes per checkpoint "
        "| checkpoints at the end (keepLast) | most for one schedule | host load / CPU busy % / CPU wait % |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        host = row.get("host") or {}
        lines.append(
            f"| {row['schedules']} | {_f(row['controllerPeakRssMiB'], 0)} / {_f(row['controllerRssMiBAfter'], 0)} "
            f"| {_f(row['controllerCpuSecondsPerRun'], 1)} | {_f(row['apiWritesPerCheckpoint'])} "
            f"| {row['objectsAtEnd']} ({row['keepLast']} each) | {row['objectsPerScheduleMax']} "
            f"| {_f(host.get('load1'), 1)} / {_f(host.get('cpuBusy', float('nan')) * 100, 0)} "
            f"/ {_f(host.get('cpuWait', float('nan')) * 100, 0)} |"
        )
    return lines


def metrics_cost_markdown(cost: dict[str, Any]) -> list[str]:
    if not cost:
        return []

    def line(what: str, figure: str, r: dict[str, Any], rounds: int, digits: int = 2) -> str:
        s = r["spread"]["on_over_off"]
        return (
            f"| {what} | {figure} | {_f(r['off'], digits)}{_range(r, 'off', digits)} "
            f"| {_f(r['on'], digits)}{_range(r, 'on', digits)} | {_f(r['on_over_off'], 3)} "
            f"({_f(s['min'], 3)}-{_f(s['max'], 3)}) | {rounds} |"
        )

    lines = [
        "",
        "What metrics cost: the same figures with `CHECKPOINTER_METRICS_PORT=0` and with metrics on (every "
        "process's /metrics scraped at Prometheus' interval), in interleaved rounds; on/off from the medians, "
        "per-round range in brackets:",
        "",
        "| part | figure | metrics off | metrics on | on/off | rounds |",
        "|---|---|---|---|---|---|",
    ]
    if cp := cost.get("controlPlane"):
        what = f"control plane, {cp['objects']} objects, {cp['nodes']} nodes, {cp['creators']} creator(s)"
        lines.append(line(what, "p99 to pickup s", cp["toPickupP99"], cp["rounds"]))
        lines.append(line(what, "p50 to pickup s", cp["toPickupP50"], cp["rounds"]))
        lines.append(line(what, "controller peak RSS MiB", cp["controllerPeakRssMiB"], cp["rounds"], 0))
        for key, figure in (("controllerCpuSeconds", "controller CPU s"), ("agentsCpuSeconds", "agents' CPU s")):
            if key in cp:
                lines.append(line(what, figure, cp[key], cp["rounds"], 1))
    if dp := cost.get("dataPath"):
        what = f"data path, {dp['sizeMiB']} MiB {dp['compression']}, {dp['link']}"
        lines.append(line(what, "(c) checkpointer s", dp["checkpointerSeconds"], dp["rounds"]))
        lines.append(line(what, "agent peak RSS MiB", dp["agentPeakRssMiB"], dp["rounds"], 0))
    return lines


PARTS = ("datapath", "controlplane", "schedules", "metrics-cost")


def main() -> int:
    parser = argparse.ArgumentParser(prog="hack/bench/run", description=__doc__)
    parser.add_argument(
        "part", nargs="?", choices=PARTS, help="measure this part alone (default: all of them, as narrowed below)"
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 4096], help="workload sizes in MiB")
    parser.add_argument("--compressions", nargs="+", default=["zstd", "gzip", "none"])
    parser.add_argument(
        "--links",
        nargs="*",
        default=["2gbit", "1gbit"],
        help="rates of the link to S3 (tc's units) to measure zstd over, after loopback",
    )
    parser.add_argument("--repeats", type=int, default=3, help="counted rounds of a, b and c per row")
    parser.add_argument(
        "--warmup", type=int, default=1, help="rounds run and discarded before the first row of every size"
    )
    parser.add_argument(
        "--settle",
        choices=["sync", "drop", "none"],
        default="sync",
        help="before every timed run: write back dirty pages (sync), and also drop the page cache (drop)",
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        # The environment itself keeps the host under a tenth busy between runs.
        default=0.15,
        metavar="FRACTION",
        help="before every timed run, wait (up to 1 min) until less than this fraction of the CPUs is busy (0: never)",
    )
    parser.add_argument(
        "--baseline-rev",
        metavar="REV",
        help="also run c in every round with the controller and agent of this git revision (from a worktree)",
    )
    parser.add_argument("--restore", action=argparse.BooleanOptionalAction, default=True, help="the restore path")
    parser.add_argument(
        "--encryption",
        action="store_true",
        help="also run c in every round into a storage that encrypts (age), over loopback",
    )
    parser.add_argument("--objects", type=int, nargs="*", default=[200, 1000], help="control plane: N objects")
    parser.add_argument("--nodes", type=int, default=50, help="control plane: simulated nodes")
    parser.add_argument(
        "--creators", type=int, nargs="+", default=[1, 8], help="control plane: client threads creating the objects"
    )
    parser.add_argument("--schedules", type=int, default=1000, help="schedules: N CheckpointSchedules (0: none)")
    parser.add_argument("--schedule-runs", type=int, default=3, help="schedules: minutes of runs counted")
    parser.add_argument("--schedule-namespaces", type=int, default=4, help="schedules: namespaces they spread over")
    parser.add_argument(
        "--metrics-rounds", type=int, default=3, help="metrics cost: interleaved rounds of off and on (0: none)"
    )
    parser.add_argument("--metrics-objects", type=int, default=1000, help="metrics cost: control-plane objects")
    parser.add_argument("--metrics-creators", type=int, default=1, help="metrics cost: control-plane creators")
    parser.add_argument("--metrics-size", type=int, default=1024, help="metrics cost: data-path size in MiB (0: none)")
    parser.add_argument(
        "--scrape-seconds", type=float, default=15, help="metrics cost: scrape interval with metrics on (0: none)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "_output" / "bench")
    args = parser.parse_args()
    if args.part:
        # One part alone: the others measure nothing.
        args.sizes = args.sizes if args.part == "datapath" else []
        args.objects = args.objects if args.part == "controlplane" else []
        args.schedules = args.schedules if args.part == "schedules" else 0
        args.metrics_rounds = args.metrics_rounds if args.part == "metrics-cost" else 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": datapath.os_info(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "settle": args.settle,
        "quietBelow": args.quiet_below,
        "baselineRev": args.baseline_rev,
        "datapath": [],
        "controlplane": [],
        "schedules": [],
        "metricsCost": {},
    }

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "results.md").write_text(markdown(results))

    workdir = Path(tempfile.mkdtemp(prefix="checkpointer-bench-"))
    try:
        if args.sizes:
            # Both agents use the CLI runtime: podman streams its export into a FIFO, where the REST
            # API first writes it to a temporary file. The S3 server's filesystem has room for an
            # archive, its parts and the baseline's at the largest size.
            agent_settings = {"CHECKPOINTER_PODMAN_MODE": "cli"}
            with contextlib.ExitStack() as stack:
                base = stack.enter_context(datapath.baseline_tree(args.baseline_rev)) if args.baseline_rev else None
                stack.enter_context(datapath.reflink_filesystem(workdir / "data" / "s3", 8 + max(args.sizes) // 256))
                env = LocalEnv.up(workdir / "data", ["node-a", "node-b"], agent_settings=agent_settings)
                try:
                    encrypted = stack.enter_context(datapath.encrypting_storage(env)) if args.encryption else None
                    bench = datapath.DataPath(
                        env,
                        args.repeats,
                        warmup=args.warmup,
                        settle=args.settle,
                        quiet_below=args.quiet_below,
                        agent_settings=agent_settings,
                        baseline=base,
                        encrypted_storage=encrypted,
                    )
                    for size in args.sizes:
                        for row in bench.measure(size, args.compressions, args.links, restore=args.restore):
                            results["datapath"].append(row.summary())
                            save()
                finally:
                    # The components' logs stay with the results, for a figure that needs explaining.
                    shutil.copytree(env.supervisor.log_dir, args.out / "logs", dirs_exist_ok=True)
                    env.down()
        if args.objects:
            env = LocalEnv.up(workdir / "control", [], operator=False)
            try:
                env.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": controlplane.NAMESPACE}})
                env.start_controller()
                pids = controlplane.start_agents(env, args.nodes)
                for count in args.objects:
                    for creators in args.creators:
                        results["controlplane"].append(controlplane.run(env, count, args.nodes, pids, creators))
                    print(json.dumps(results["controlplane"][-1]), flush=True)
                    save()
            finally:
                # The components' logs stay with the results, for a figure that needs explaining.
                shutil.copytree(env.supervisor.log_dir, args.out / "logs", dirs_exist_ok=True)
                env.down()
        if args.schedules:
            env = LocalEnv.up(workdir / "schedules", [], operator=False)
            try:
                fired = schedules.run(env, args.schedules, args.nodes, args.schedule_namespaces, args.schedule_runs)
                results["schedules"].append(fired)
                print(json.dumps({k: v for k, v in fired.items() if k != "perRun"}), flush=True)
                save()
            finally:
                shutil.copytree(env.supervisor.log_dir, args.out / "logs-schedules", dirs_exist_ok=True)
                env.down()
        if args.metrics_rounds:
            cost = results["metricsCost"]
            if args.metrics_objects:
                env = LocalEnv.up(workdir / "metrics-control", [], operator=False)
                try:
                    cost["controlPlane"] = metrics_cost.control_plane(
                        env,
                        args.metrics_rounds,
                        args.metrics_objects,
                        args.nodes,
                        args.metrics_creators,
                        args.scrape_seconds,
                        args.quiet_below,
                    )
                    save()
                finally:
                    shutil.copytree(env.supervisor.log_dir, args.out / "logs-metrics-control", dirs_exist_ok=True)
                    env.down()
            if args.metrics_size:
                cost["dataPath"] = metrics_cost.data_path(
                    workdir / "metrics-data",
                    args.out,
                    args.metrics_rounds,
                    args.warmup,
                    args.metrics_size,
                    args.settle,
                    args.quiet_below,
                    args.scrape_seconds,
                )
                save()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    save()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
