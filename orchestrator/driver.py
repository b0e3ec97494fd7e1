"""The Ray Tune driver: one Tune trial per grid point, each a Ray Train TorchTrainer.

A trial whose result object is already in the store is never started (exactly-once on
rerun); the trial function writes its rows with one PUT keyed by the config hash, so a
retried trial overwrites instead of duplicating.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import train, tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from tokenscale.workers.train import train_loop_per_worker
from tokenscale.workers.trial import TrialConfig

from tokenscale.store import Store

from .grid import Grid


def ray_storage(path: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: S3 through pyarrow with the
    endpoint from the AWS environment, or a local directory."""
    if not path.startswith("s3://"):
        os.makedirs(path, exist_ok=True)
        return path, None
    from pyarrow import fs

    from tokenscale.store import s3_endpoint

    endpoint = s3_endpoint()
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint_override"] = endpoint
        options["scheme"] = "https" if endpoint.startswith("https") else "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return path[len("s3://") :], fs.S3FileSystem(**options)


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: train + evaluate one grid point, write its rows once."""
    trial = TrialConfig.from_dict(config["point"]["trial"])
    config_hash = config["point"]["config_hash"]  # computed once, by the driver
    store = Store(config["store"])
    if store.has_result(trial.grid, trial.compressor, config_hash):
        tune.report({"mean_score": float("nan"), "skipped": True})
        return
    resources = config["resources"]
    use_gpu = resources["gpus_per_worker"] > 0
    per_worker = {"CPU": resources["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = resources["gpus_per_worker"]
    storage_path, storage_fs = ray_storage(config["ray_storage"].rstrip("/") + "/train")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": config["point"]["trial"],
            "config_hash": config_hash,
            "store": store.uri,
            "threads_per_worker": max(1, int(resources["cpus_per_worker"])),
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=train.ScalingConfig(num_workers=resources["workers"], use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=train.RunConfig(
            name=f"{trial.llm.name}-v{trial.visual_tokens}-{trial.compressor}-s{trial.seed}-{config_hash[:6]}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=train.FailureConfig(max_failures=config["max_failures"]),
            callbacks=[TuneReportCallback()],  # Train's reports become this Tune trial's metrics
        ),
    )
    trainer.fit()  # raises if the trial failed past its retries
    if not store.has_result(trial.grid, trial.compressor, config_hash):
        raise RuntimeError(f"trial {config_hash} finished without writing its result object")


@dataclass
class GridSummary:
    grid: str
    trials: int
    already_done: int
    finished: int
    errored: int
    wall_seconds: float
    results: str

    def line(self) -> str:
        return (
            f"grid {self.grid}: {self.finished + self.already_done}/{self.trials} trials done "
            f"({self.already_done} already in the store), {self.errored} errored, "
            f"{self.wall_seconds:.0f}s wall; results in {self.results}"
        )


def init_ray() -> None:
    """Join the cluster when there is one (`ray job submit` sets RAY_ADDRESS), else start
    a local Ray bound to loopback."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")


def run_grid(grid: Grid, store: Store, verbose: int = 1, ray_storage_uri: str | None = None) -> GridSummary:
    """Run every trial of `grid` whose result is not in `store` yet.

    Ray's own experiment state (Tune's, for resume, and Train's checkpoints) goes to
    `ray_storage_uri`, by default `<store>/<grid>`, i.e. beside the results."""
    started = time.perf_counter()
    ray_root = (ray_storage_uri or store.join(grid.name)).rstrip("/")
    trials = grid.trials()
    pending = [t for t in trials if not store.has_result(t.grid, t.compressor, t.config_hash)]
    summary = GridSummary(grid.name, len(trials), len(trials) - len(pending), 0, 0, 0.0, store.results_glob(grid.name))
    if pending:
        init_ray()
        storage_path, storage_fs = ray_storage(ray_root)
        trainable = tune.with_resources(run_trial, {"CPU": 0.01})  # the trial only waits on its trainer
        tuner = tune.Tuner(
            trainable,
            param_space={
                "point": tune.grid_search([{"trial": t.to_dict(), "config_hash": t.config_hash} for t in pending]),
                "store": store.uri,
                "ray_storage": ray_root,
                "resources": {
                    "workers": grid.resources.workers,
                    "cpus_per_worker": grid.resources.cpus_per_worker,
                    "gpus_per_worker": grid.resources.gpus_per_worker,
                },
                "max_failures": grid.max_failures,
            },
            tune_config=tune.TuneConfig(max_concurrent_trials=grid.max_concurrent_trials),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=grid.max_failures),
                verbose=verbose,
            ),
        )
        results = tuner.fit()
        summary.errored = sum(1 for r in results if r.error is not None)
        summary.finished = len(pending) - summary.errored
    summary.wall_seconds = time.perf_counter() - started
    return summary
