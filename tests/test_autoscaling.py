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
from conftest import free_port, stop_processes, tiny_grid, wait_for_port

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


def stop_cluster(head: subprocess.Popen) -> None:
    """Stop this cluster only: the `ray start --block` process we started leads its own
    process group, which holds the head's daemons and the fake nodes the autoscaler spawned;
    every descendant is collected by pid first, in case one left the group."""
    try:
        family = [head_proc := psutil.Process(head.pid), *head_proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    stop_processes(family, group=head.pid)
    head.wait(timeout=10)


def test_grid_on_gpu_worker_type_scales_up_then_down(tmp_path, monkeypatch):
    temp_dir = tempfile.mkdtemp(prefix="rtfake", dir="/tmp")
    config_file = tmp_path / "cluster.json"
    port = free_port()  # the fake provider's nodes join the head at `gcs_address`
    config = cluster_config()
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_file.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a throwaway cluster on this machine only; the fake nodes it spawns don't get the token
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_AUTH_MODE": "disabled"})
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--autoscaling-config={config_file}", f"--port={port}", "--num-cpus=2",
         "--num-gpus=0", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    grid = parse_grid(tiny_grid(
        "autoscale", llms=1, visual_tokens=(1, 4), max_concurrent_trials=2,
        resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1, "backend": "gloo",
                   "node_types": [{"cpus": 1, "gpus": 1}]},  # the fake GPUs have no CUDA behind them
    ))
    store = Store.open(str(tmp_path / "store"))
    seen_gpu_nodes = []
    try:
        wait_for_port(port, timeout=120)
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
        stop_cluster(head)
    assert store.read_results("autoscale").num_rows == 2 * 2
