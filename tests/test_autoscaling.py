"""Autoscaling on one machine: Ray's fake multi-node provider with a GPU worker type at
min 0. A grid whose trials need that type makes the autoscaler add nodes, the trials run
there, and the idle nodes go away afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import ray
from conftest import tiny_grid

from tokenscale.config import parse_grid
from tokenscale.orchestrator.driver import run_grid
from tokenscale.store import Store

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def cluster_config() -> dict:
    """The fake provider's config (as Ray's fake_multi_node example), with one GPU worker type."""
    return {
        "cluster_name": "tokenscale-fake",
        "max_workers": 2,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu-worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


def stop_cluster(markers: list[str]) -> None:
    """Kill this cluster's processes only (not `ray stop`, which ends every Ray here)."""
    victims = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if any(m in cmdline for m in markers) and proc.pid != os.getpid():
            victims.append(proc)
    for proc in victims:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=20)


def test_grid_on_gpu_worker_type_scales_up_then_down(tmp_path, monkeypatch):
    temp_dir = tempfile.mkdtemp(prefix="rtfake", dir="/tmp")
    config_file = tmp_path / "cluster.json"
    config_file.write_text(json.dumps(cluster_config()))
    port = 6379  # the fake provider starts its nodes with `ray start --address=<head>:6379`
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a throwaway cluster on this machine only; the fake nodes it spawns don't get the token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"})
    subprocess.run(
        [RAY, "start", "--head", f"--autoscaling-config={config_file}", f"--port={port}", "--num-cpus=2",
         "--num-gpus=0", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120,
    )
    grid = parse_grid(tiny_grid(
        "autoscale", llms=1, visual_tokens=(1, 4), max_concurrent_trials=2,
        resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1, "backend": "gloo",
                   "node_types": [{"cpus": 1, "gpus": 1}]},  # the fake GPUs have no CUDA behind them
    ))
    store = Store.open(str(tmp_path / "store"))
    seen_gpu_nodes = []
    try:
        ray.init(address=f"127.0.0.1:{port}")
        assert gpu_nodes() == 0, "min_workers is 0: no GPU node before there is work"
        import threading

        def watch() -> None:
            while not done.is_set():
                seen_gpu_nodes.append(gpu_nodes())
                time.sleep(1)

        done = threading.Event()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        summary = run_grid(grid, store, verbose=0)
        done.set()
        watcher.join(timeout=5)
        assert summary.errored == 0 and summary.finished == 2, summary
        assert max(seen_gpu_nodes) >= 1, "the autoscaler added GPU nodes for the trials"
        deadline = time.time() + 120
        while gpu_nodes() and time.time() < deadline:
            time.sleep(2)
        assert gpu_nodes() == 0, "idle GPU nodes are removed"
    finally:
        ray.shutdown()
        stop_cluster([temp_dir, f"127.0.0.1:{port}"])
    assert store.read_results("autoscale").num_rows == 2 * 2
