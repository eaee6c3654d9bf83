"""A real two-node Ray cluster (`ray start --head` plus `ray start --address`) with the store on PostgreSQL.

Both nodes run on this machine as separate raylets with their own resources, which is what Ray's own
multi-node tests do. The study runs through the CLI with `--address`, exactly as on a user's cluster.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from procs import free_port

from tuner.core.status import SCORED
from tuner.store import Store

BIN = Path(sys.executable).parent
PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


class LocalCluster:
    """Ray nodes started with the `ray` CLI under a private temp dir, so teardown stops only them."""

    def __init__(self, tmp: Path, cache: Path) -> None:
        self.temp_dir = Path("/tmp") / f"rc{os.getpid()}{free_port()}"  # unix socket paths must stay short
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "TUNER_CACHE": str(cache)}
        self.env.pop("RAY_ADDRESS", None)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_ports: dict[str, int] = {}

    def _start(self, name: str, *args: str) -> None:
        ports = {flag: free_port() for flag in PORT_FLAGS}
        self.node_ports[name] = ports["--node-manager-port"]
        cmd = [str(BIN / "ray"), "start", "--num-cpus=1", "--num-gpus=0", f"--resources={{\"{name}\": 1}}",
               "--disable-usage-stats", *[f"{k}={v}" for k, v in ports.items()], *args]
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout + out.stderr

    def start(self) -> None:
        self._start("head", "--head", f"--port={self.port}", "--include-dashboard=false",
                    f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1")
        # Its own loopback address: a driver on 127.0.0.1 then attaches to the head, as on a real cluster.
        self._start("node2", f"--address={self.address}", "--node-ip-address=127.0.0.2")

    def processes(self, marker: str) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in p.info["cmdline"] or ()):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return found

    def kill_node(self, name: str) -> None:
        """Lose a node the hard way: its raylet and every process under it die at once."""
        (raylet,) = self.processes(f"--node_manager_port={self.node_ports[name]}")
        victims = [raylet, *raylet.children(recursive=True)]
        for p in victims:
            p.kill()
        psutil.wait_procs(victims, timeout=30)

    def stop(self) -> None:
        victims = self.processes(str(self.temp_dir))
        for raylet in [p for p in victims if p.is_running()]:
            victims += raylet.children(recursive=True)
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(victims, timeout=30)
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


@pytest.fixture
def cluster(tmp_path, cache_dir, bench):
    c = LocalCluster(tmp_path, cache_dir)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def cluster_spec(spec_file, tmp_path: Path, name: str, trials: int, epochs: tuple[int, int]) -> Path:
    """A micro study of one-CPU trials, two at a time: one per node."""
    return spec_file(tmp_path, name=name, budget={"trials": trials}, concurrency=2, sampler={"name": "tpe"},
                     resources={"cpus": 1},
                     search={"lr": {"low": 2e-4, "high": 1e-3}, "epochs": {"low": epochs[0], "high": epochs[1]}},
                     run={"eval_every": 4})


def run_cli(cluster: LocalCluster, spec: Path, url: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "tuner"), "study", "run", str(spec), "--address", cluster.address,
                             "--storage", url], env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_trials_run_on_both_nodes_and_losing_one_mid_study_fails_only_its_trial(tmp_path, cluster, pg_database,
                                                                              spec_file):
    """Two one-CPU nodes, two trials at a time: the first two run one on each node. Once both have finished
    (so trials were placed on both nodes) and the next two are running, the second node dies."""
    store = Store(pg_database)
    proc = run_cli(cluster, cluster_spec(spec_file, tmp_path, "two-nodes", trials=5, epochs=(2, 3)), pg_database)
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            rows = store.trials("two-nodes")
        except Exception:  # the study row is not there yet
            rows = []
        nodes = {r["result"].get("environment", {}).get("ray_node") for r in rows if r["status"] != "running"}
        if len(nodes - {None}) == 2 and sum(r["status"] == "running" for r in rows) == 2:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.3)
    else:
        pytest.fail("never saw finished trials on both nodes and two running")
    cluster.kill_node("node2")
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output
    rows = store.trials("two-nodes")
    # five trials and one retry of the lost one (its setting runs again on the surviving node): nothing lost
    assert [r["number"] for r in rows] == [1, 2, 3, 4, 5, 6], rows
    assert not [r for r in rows if r["status"] in ("running", "interrupted")]
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and "worker" in failed[0]["error"] and "actor" in failed[0]["error"].lower(), \
        [r["error"] for r in failed]
    assert "retrying" in failed[0]["error"], failed[0]["error"]
    assert [r["params"] for r in rows].count(failed[0]["params"]) == 2  # the retry ran the same setting
    assert all(r["status"] in SCORED for r in rows if r not in failed)
    assert store.study("two-nodes").status == "finished"


def test_ray_client_addresses_are_refused_before_anything_is_stored(tmp_path, cache_dir, spec_file):
    """ray:// would run Tune's loop (and the store writes) on the head, away from the driver: a clear no."""
    spec = cluster_spec(spec_file, tmp_path, "client", trials=1, epochs=(1, 1))
    db = tmp_path / "client.db"
    env = {**os.environ, "TUNER_CACHE": str(cache_dir)}
    for args, extra in (([f"--address=ray://127.0.0.1:{free_port()}"], {}), ([], {"RAY_ADDRESS": "ray://head:10001"})):
        out = subprocess.run([str(BIN / "tuner"), "study", "run", str(spec), "--storage", f"sqlite:///{db}", *args],
                             env={**env, **extra}, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Ray Client addresses (ray://) are not supported" in out.stderr, out.stderr
        assert "--address HEAD_IP:6379" in out.stderr and not db.exists()
