"""A real Prometheus server that scrapes the local environment's controller and agents.

Debian's `prometheus` (hack/install.sh) on loopback, with a generated configuration: one target per
process of `LocalEnv.metrics_ports`, scraped every second, and optional rule files. Its storage is in
the environment's work directory, and it runs under the environment's supervisor, so `env.down()`
stops it too (or `Prometheus.stop()`).
"""

from __future__ import annotations

import json
import shutil
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from localenv.env import LocalEnv
from localenv.procs import LocalEnvError, Process, wait_until

SCRAPE_INTERVAL = "1s"


def config(targets: dict[str, int], rule_files: Sequence[Path] = ()) -> dict[str, Any]:
    """The configuration: one job, a target per process, labelled with the process's name."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": "checkpointer",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{port}"], "labels": {"process": name}}
                    for name, port in sorted(targets.items())
                ],
            }
        ],
    }


@dataclass
class Prometheus:
    url: str
    process: Process
    env: LocalEnv

    @classmethod
    def start(cls, env: LocalEnv, rule_files: Sequence[Path] = (), name: str = "prometheus") -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise LocalEnvError("prometheus is not installed: run hack/install.sh")
        workdir = env.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config(env.metrics_ports, rule_files)))
        port = env._new_port()
        argv = [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        process = env.supervisor.start(name, argv)
        server = cls(f"http://127.0.0.1:{port}", process, env)
        wait_until("prometheus ready", server.ready, timeout=30, interval=0.2, log=process.log)
        return server

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """The `data` of an answer of the HTTP API (/api/v1/...)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
            answer = json.loads(reply.read())
        if answer.get("status") != "success":
            raise LocalEnvError(f"prometheus {path}: {answer}")
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's vector: each element's labels and value."""
        return list(self.api("query", query=promql)["result"])

    def values(self, promql: str, by: Sequence[str]) -> dict[tuple[str, ...], float]:
        """An instant query's values by the labels `by`."""
        return {tuple(r["metric"].get(k, "") for k in by): float(r["value"][1]) for r in self.query(promql)}

    def stop(self) -> None:
        self.env.supervisor.stop(self.process.name)
