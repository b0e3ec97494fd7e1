"""The Ray Tune driver: one Tune trial per grid point, each a Ray Train TorchTrainer
worker group (`execution: workers`) or, for one CPU-only worker, the same train loop in
the Tune trial's own reused process (`execution: in_trial`).

Every Ray piece of a trial lives here: the Tune function, the Ray Train worker function,
and the adapters that give the Ray-free train loop (tokenscale.workers.train) its
`report`, `latest_checkpoint`, rank and world size from Ray Train or Tune.

A trial whose result object is already in the store is never started (exactly-once on
rerun); the trial function writes its rows with one PUT keyed by the config hash, so a
retried trial overwrites instead of duplicating.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
import yaml
from ray import train, tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from tokenscale.config import Grid, TrialConfig, check_tracking, grid_to_dict
from tokenscale.store import Store
from tokenscale.workers import cpu_kernel_env

from .status import GRID_FILE, TUNE_NAME, load_saved_grid, ray_storage

KEEP_CHECKPOINTS = 2  # a trial's last two checkpoints: the newest may be cut short by a kill

# How often Ray Train's controller polls its workers (Train V2 reads it from the environment of
# the process that calls `fit` and passes it on). A worker's `train.report` waits until the
# controller has taken its previous report off a one-deep queue, which it does only when it
# polls (default every 2 s): a worker then reports at most once per poll. Measured here (a tiny
# trial, one gloo worker, `report_every: 10`): 2.0 s per 10 steps at the default, against
# ~0.2 s for the same steps in the Tune trial's own process. Polling 8x as often costs the
# controller one small RPC per worker per poll; it also notices a dead worker sooner.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_SECONDS = 0.25


def _tune_trial_name(trial: Any) -> str:
    """Tune's name (and directory) of a trial: the grid point's TrialConfig.trial_id,
    computed by the driver when it built the point."""
    return trial.config["point"]["trial_id"]


def ray_train_report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
    """The train loop's `report` in a Ray Train worker."""
    train.report(metrics, checkpoint=train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _tune_report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
    """The train loop's `report` in the Tune trial's own process (in_trial)."""
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)


def _latest_checkpoint(get_checkpoint: Callable[[], Any], stack: contextlib.ExitStack) -> Callable[[], str | None]:
    """The train loop's `latest_checkpoint`: Ray's checkpoint (Train's or Tune's) of a
    retried trial as a local directory, which stays there until `stack` closes."""

    def latest_checkpoint() -> str | None:
        checkpoint = get_checkpoint()
        return None if checkpoint is None else stack.enter_context(checkpoint.as_directory())

    return latest_checkpoint


def _with_timing(report: Callable[..., None], timing: dict[str, float]) -> Callable[..., None]:
    """`report` that adds where the trial's wall time went to the final metrics (the ones
    with `train_seconds`), for benchmarks/bench_overhead.py."""

    def timed_report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        if "train_seconds" in metrics:
            metrics = {
                **metrics,
                "startup_seconds": timing["entered"] - timing["trial_started"],
                "import_seconds": timing["imported"] - timing["entered"],
                "worker_seconds": time.time() - timing["imported"],
            }
        report(metrics, checkpoint_dir)

    return timed_report


def _train(config: dict[str, Any], report: Callable[..., None], get_checkpoint: Callable[[], Any], rank: int, world_size: int) -> None:
    """The train loop with Ray's hooks. Its import is deferred so that a Tune trial process
    that only waits on its worker group never pays for importing torch/DeepSpeed."""
    entered = time.time()
    from tokenscale.workers.train import train_loop_per_worker

    timing = {"trial_started": config["trial_started"], "entered": entered, "imported": time.time()}
    with contextlib.ExitStack() as stack:
        train_loop_per_worker(
            config["trial"],
            report=_with_timing(report, timing),
            latest_checkpoint=_latest_checkpoint(get_checkpoint, stack),
            rank=rank,
            world_size=world_size,
            store=config["store"],
            config_hash=config["config_hash"],
            backend=config["backend"],
            threads=config["threads_per_worker"],
        )


def ray_train_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: runs in each worker of the trial's group, which
    Ray Train set up (process group included); its checkpoints are Train's."""
    context = train.get_context()
    _train(config, ray_train_report, train.get_checkpoint, context.get_world_rank(), context.get_world_size())


def train_in_trial(config: dict[str, Any]) -> None:
    """`execution: in_trial`: the same training, as a world of one, in the Tune trial's own
    process, which Tune reuses for the next trial (reuse_actors): no worker group to start,
    no imports to repeat. Tune persists the trial's checkpoints with the trial and hands the
    last back to a retried trial; Tune's FailureConfig bounds the retries."""
    _train(config, _tune_report, tune.get_checkpoint, 0, 1)


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: train + evaluate one grid point, write its rows once."""
    trial = TrialConfig.model_validate(config["point"]["trial"])
    config_hash = config["point"]["config_hash"]  # computed once, by the driver
    store = Store(config["store"])
    if store.has_result(trial.grid, trial.compressor, config_hash):
        tune.report({"mean_score": float("nan"), "skipped": True})
        return
    resources = config["point"]["resources"]
    loop_config = {
        "trial": trial,  # decoded once, here; Ray Train pickles it to its workers
        "config_hash": config_hash,
        "store": store.uri,
        "threads_per_worker": max(1, int(resources["cpus_per_worker"])),
        "backend": resources["backend"],
        "trial_started": time.time(),  # for the overhead breakdown in the metrics
    }
    if resources["execution"] == "in_trial":
        train_in_trial(loop_config)
    else:
        # a value already in the trial process's environment wins (a local Ray inherits the
        # driver's; on a cluster, set it in the job's runtime_env env_vars)
        os.environ.setdefault(TRAIN_POLL_ENV, str(TRAIN_POLL_SECONDS))
        storage_path, storage_fs = ray_storage(config["ray_storage"].rstrip("/") + "/train")
        trainer = TorchTrainer(
            ray_train_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend=resources["backend"]),
            scaling_config=train.ScalingConfig(
                num_workers=resources["workers"],
                use_gpu=resources["gpus_per_worker"] > 0,
                resources_per_worker=worker_bundle(resources),
                placement_strategy=resources["placement_strategy"],
            ),
            run_config=train.RunConfig(
                name=trial.trial_id,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                # Retries belong to Tune alone: a worker group that fails ends this Tune trial,
                # whose retry builds this trainer again under the same name, and Train restores
                # the run from its last checkpoint. Retrying here too would multiply the
                # attempts: (1 + k)^2 starts of a multi-GPU job on a deterministic error.
                failure_config=train.FailureConfig(max_failures=0),
                checkpoint_config=train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
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
    trial_metrics: list[dict] = field(default_factory=list)  # last metrics Tune saw per trial
    restored_from: str = ""  # `resume`: the Tune experiment it restored (empty: ran afresh)
    adaptive: str = ""  # `resume` of an adaptive run: how its loop ended

    def line(self) -> str:
        restored = f"; restored Tune's experiment from {self.restored_from}" if self.restored_from else ""
        if self.adaptive:
            return self.adaptive + (f"; {self.errored} errored" if self.errored else "")
        return (
            f"grid {self.grid}: {self.finished + self.already_done}/{self.trials} trials done "
            f"({self.already_done} already in the store), {self.errored} errored, "
            f"{self.wall_seconds:.0f}s wall; results in {self.results}{restored}"
        )


def init_ray(spare_cpu: bool = True, address: str | None = None) -> None:
    """Start or join Ray, and which one is explicit:

    - `address`, else RAY_ADDRESS (`ray job submit` sets it for its entrypoint; `tokenscale
      run|resume|demo|serve --address ADDRESS` sets it): join that cluster (its GCS
      `host:port`, `auto` for the head a `ray start` recorded on this machine, `ray://...`);
    - else (or `local`) a private local Ray for this process alone: `address="local"`, so
      neither a live head that `ray start` recorded in Ray's temp dir, nor the stale record
      of a dead one, nor any other Ray running on the machine is joined (with no address,
      `ray.init` would join the recorded head and refuse our `num_cpus`)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    if address != "local":
        ray.init(address=address, log_to_driver=True)
    else:
        # spare_cpu: one logical CPU more than the machine has, for trials that train in a
        # worker group: each Tune trial process holds 0.01 CPU while it waits on it, and
        # without the spare unit two such slivers leave 1.98 CPUs, so the second 1-CPU
        # worker would wait for the first trial to end. In-trial trials hold a whole CPU
        # each and need no spare (it would let one more trial train than there are cores).
        # every process of this Ray (trials, Train workers) computes with the same CPU
        # kernels on any x86-64 machine (tokenscale.workers.CPU_KERNEL_ENV); a cluster joined
        # by address keeps its own environment (its trials run on GPUs)
        ray.init(
            address="local",
            num_cpus=(os.cpu_count() or 1) + int(spare_cpu),
            include_dashboard=False,
            log_to_driver=True,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": cpu_kernel_env()},
        )


def save_grid(grid: Grid, store: Store) -> str:
    """The grid as run, beside its results: `resume` and `status` read it back."""
    key = store.join(grid.name, GRID_FILE)
    data = yaml.safe_dump(grid_to_dict(grid), sort_keys=False).encode()
    if not store.exists(key) or store.get_bytes(key) != data:  # unchanged: no write
        store.put_bytes(key, data)
    return key


def worker_bundle(resources: dict[str, Any]) -> dict[str, float]:
    """What one worker holds: its CPUs, and its GPUs when it asks for any."""
    bundle = {"CPU": float(resources["cpus_per_worker"])}
    if resources["gpus_per_worker"]:
        bundle["GPU"] = float(resources["gpus_per_worker"])
    return bundle


def trial_resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """What the Tune trial's process holds: the whole worker when it trains in-trial, else
    a sliver, since it only waits on its Ray Train worker group."""
    resources = config["point"]["resources"]
    if resources["execution"] != "in_trial":
        return tune.PlacementGroupFactory([{"CPU": 0.01}])
    return tune.PlacementGroupFactory([worker_bundle(resources)])


def tracking_callbacks(grid: Grid) -> list[Any]:
    """Ray Tune's own logger callbacks for the grid's `tracking:` section, one run per trial
    in each tracker. They run in the driver (W&B's in an actor on the driver's node) and see
    what Tune sees: the trial's config (`point`: the TrialConfig, its hash and resources) and
    its reports (progress, then the final metrics: mean_score, losses, timings). Secrets are
    never passed: the trackers read them from the environment."""
    callbacks: list[Any] = []
    wandb = grid.tracking.wandb
    if wandb is not None:
        from ray.air.integrations.wandb import WandbLoggerCallback

        init: dict[str, Any] = {}
        if wandb.mode is not None:  # the grid's mode wins; Ray's API-key check reads WANDB_MODE
            os.environ["WANDB_MODE"] = wandb.mode
        mode = wandb.mode or os.environ.get("WANDB_MODE")
        if mode:  # to wandb.init itself: the logging actor's environment may not be ours
            init["mode"] = mode
        if wandb.entity is not None:
            init["entity"] = wandb.entity
        if wandb.dir is not None:
            # absolute: the logging actor works in the trial's folder
            init["dir"] = os.path.abspath(os.path.expanduser(wandb.dir))
            os.makedirs(init["dir"], exist_ok=True)
        callbacks.append(WandbLoggerCallback(project=wandb.project, group=wandb.group or grid.name, **init))
    mlflow = grid.tracking.mlflow
    if mlflow is not None:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        if mlflow.scheme == "file":
            # MLflow 3 refuses its folder store unless told; a file URI in the grid tells it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        callbacks.append(MLflowLoggerCallback(
            tracking_uri=mlflow.tracking_uri, experiment_name=mlflow.experiment_name or grid.name,
            tags={"tokenscale.grid": grid.name},
        ))
    return callbacks


def _tuner_args(grid: Grid, store: Store, ray_root: str, verbose: int) -> tuple[Any, Any]:
    # Tune's newer console output ignores custom reporters; ours shows llm / V / compressor.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(run_trial, trial_resources)
    run_config = tune.RunConfig(
        name=TUNE_NAME,
        storage_path=ray_storage(ray_root)[0],
        storage_filesystem=ray_storage(ray_root)[1],
        failure_config=tune.FailureConfig(max_failures=grid.max_failures),  # attempts = max_failures + 1
        checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        verbose=verbose,
        progress_reporter=progress_reporter(),
        callbacks=tracking_callbacks(grid),
    )
    return trainable, run_config


def _uses_worker_groups(grid: Grid, trials: list[TrialConfig]) -> bool:
    return any(grid.resources.for_llm(t.llm)["execution"] == "workers" for t in trials)


def run_grid(
    grid: Grid, store: Store, verbose: int = 1, ray_storage_uri: str | None = None, only: set[str] | None = None,
) -> GridSummary:
    """Run every trial of `grid` whose result is not in `store` yet (of those whose config
    hash is in `only`, when given: an adaptive batch).

    Ray's own experiment state (Tune's, for resume, and Train's checkpoints) goes to
    `ray_storage_uri`, by default `<store>/<grid>`, i.e. beside the results."""
    started = time.perf_counter()
    check_tracking(grid)  # a tracker's missing package is told before anything starts
    ray_root = (ray_storage_uri or store.join(grid.name)).rstrip("/")
    trials = grid.trials()
    pending = [
        t for t in trials
        if (only is None or t.config_hash in only) and not store.has_result(t.grid, t.compressor, t.config_hash)
    ]
    summary = GridSummary(grid.name, len(trials), len(trials) - len(pending), 0, 0, 0.0, store.results_glob(grid.name))
    save_grid(grid, store)
    if pending:
        init_ray(spare_cpu=_uses_worker_groups(grid, pending))
        trainable, run_config = _tuner_args(grid, store, ray_root, verbose)
        tuner = tune.Tuner(
            trainable,
            param_space={
                "point": tune.grid_search([
                    {
                        "trial": t.to_dict(),
                        "config_hash": t.config_hash,
                        "trial_id": t.trial_id,
                        "resources": grid.resources.for_llm(t.llm),
                    }
                    for t in pending
                ]),
                "store": store.uri,
                "ray_storage": ray_root,
                "max_failures": grid.max_failures,
            },
            # reuse_actors: a finished trial's process runs the next trial (no new process)
            tune_config=tune.TuneConfig(
                max_concurrent_trials=grid.max_concurrent_trials,
                reuse_actors=True,
                trial_name_creator=_tune_trial_name,
                trial_dirname_creator=_tune_trial_name,
            ),
            run_config=run_config,
        )
        _collect(tuner.fit(), summary)
    summary.wall_seconds = time.perf_counter() - started
    return summary


def _track_as_saved(tuner: Any, callbacks: list[Any]) -> None:
    """A restored Tuner runs with the RunConfig pickled when the experiment began; its
    trackers become the saved grid's (what `resume` reads), so a grid's `tracking:` edited
    since, or an experiment begun before it had one, logs as the grid now says."""
    local = getattr(tuner, "_local_tuner", None)  # Ray 2.60; a Ray Client tuner keeps the pickled ones
    if local is not None:
        local.get_run_config().callbacks = callbacks


def _collect(results: Any, summary: GridSummary) -> None:
    summary.trial_metrics = [dict(r.metrics or {}) for r in results]
    summary.errored = sum(1 for r in results if r.error is not None)
    # every trial Tune ran was missing from the store when the grid started; one that found
    # its result on a retry (it died after its write) finished in this run all the same
    summary.finished = sum(1 for r in results if r.error is None)


def resume_grid(store: Store, name: str, verbose: int = 1, ray_storage_uri: str | None = None) -> GridSummary:
    """Finish a grid after the driver died or trials errored.

    Restores the Tune experiment from the store (unfinished and errored trials resume,
    from their last checkpoint where they have one); a trial whose result object is
    already in the store returns at once without training. Without saved Tune state
    (the driver died before Tune wrote any), the grid simply runs again, which starts only
    the trials missing from the store."""
    started = time.perf_counter()
    grid = load_saved_grid(store, name)
    check_tracking(grid)
    from .adaptive import run_adaptive_grid, saved_adaptive

    adaptive = saved_adaptive(store, grid.name)
    if adaptive is not None:  # `run --adaptive`: the loop goes on from what the store holds
        outcome = run_adaptive_grid(grid, store, max_trials=adaptive.get("max_trials"), verbose=verbose,
                                    ray_storage_uri=ray_storage_uri)
        trials = grid.trials()
        done = sum(store.has_result(t.grid, t.compressor, t.config_hash) for t in trials)
        return GridSummary(grid.name, len(trials), 0, done, outcome.errored, time.perf_counter() - started,
                           store.results_glob(grid.name), adaptive=outcome.line())
    ray_root = (ray_storage_uri or store.join(grid.name)).rstrip("/")
    path, fs = ray_storage(f"{ray_root}/{TUNE_NAME}")
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        return run_grid(grid, store, verbose, ray_storage_uri)
    trials = grid.trials()
    missing = [t for t in trials if not store.has_result(t.grid, t.compressor, t.config_hash)]
    summary = GridSummary(grid.name, len(trials), len(trials) - len(missing), 0, 0, 0.0, store.results_glob(grid.name))
    if missing:
        init_ray(spare_cpu=_uses_worker_groups(grid, missing))
        trainable, run_config = _tuner_args(grid, store, ray_root, verbose)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
        _track_as_saved(tuner, run_config.callbacks)
        summary.restored_from = f"{ray_root}/{TUNE_NAME}"
        _collect(tuner.fit(), summary)
        # cells the saved experiment never had (the grid grew: an LLM, a token budget or a
        # compressor added to the YAML): a run of the grid starts exactly those
        if summary.errored == 0 and any(not store.has_result(t.grid, t.compressor, t.config_hash) for t in trials):
            grown = run_grid(grid, store, verbose, ray_storage_uri)
            summary.errored = grown.errored
            summary.trial_metrics += grown.trial_metrics
    summary.finished = summary.trials - summary.already_done - summary.errored
    summary.wall_seconds = time.perf_counter() - started
    return summary


def progress_reporter() -> Any:
    """Tune's live table: trial, status, LLM, V, compressor and the last metric."""
    return tune.CLIReporter(
        parameter_columns={
            "point/trial/llm/name": "llm",
            "point/trial/visual_tokens": "V",
            "point/trial/compressor": "compressor",
            "point/trial/seed": "seed",
        },
        metric_columns={"mean_score": "mean score", "stage2_loss": "loss", "train_seconds": "train s"},
        max_report_frequency=15,
        sort_by_metric=False,
    )
