"""Orchestration overhead: grid wall time against the trials' own compute, in one run.

Runs a small grid for real (Ray Tune -> Ray Train -> DeepSpeed, local store), then reads
each trial's train_seconds + eval_seconds from the store and prints

  ratio    = grid wall time / (sum of trial compute / concurrency)   (1.0 = no overhead)
  overhead = (grid wall x concurrency - sum of trial compute) / trials   seconds per trial

Both ways a trial can train (resources.execution) run one after the other in this process,
`workers` (a Ray Train worker group per trial) first as the baseline, then `in_trial`.

Usage: python benchmarks/bench_overhead.py [--config configs/demo.yaml] [--trials 8]
                                           [--execution workers in_trial]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray

from tokenscale.config import Grid, grid_to_dict, load_grid, parse_grid
from tokenscale.orchestrator.driver import init_ray, run_grid
from tokenscale.sql import query
from tokenscale.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--trials", type=int, default=8, help="run only the first N grid points")
    parser.add_argument("--execution", nargs="+", default=["workers", "in_trial"], choices=["workers", "in_trial"],
                        help="resources.execution modes to run one after the other (the first is the baseline)")
    args = parser.parse_args()
    grid = load_grid(args.config)
    init_ray()
    for execution in args.execution:
        run(grid, args.trials, execution)
    ray.shutdown()


def run(grid: Grid, n_trials: int, execution: str) -> None:
    # the first N points, as their own grid (same sizes, same training)
    trials = grid.trials()[:n_trials]
    keep_llms = tuple(dict.fromkeys(t.llm for t in trials))
    keep_tokens = tuple(dict.fromkeys(t.visual_tokens for t in trials))
    resources = grid.resources.model_copy(update={"execution": execution})
    grid = parse_grid(grid_to_dict(grid.model_copy(update={
        "grid": f"bench-overhead-{execution}", "llms": keep_llms, "visual_tokens": keep_tokens, "resources": resources,
    })))  # validated again, as `tokenscale run` would
    n = len(grid.trials())
    concurrency = min(grid.max_concurrent_trials, n)

    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(tmp)
        started = time.perf_counter()
        summary = run_grid(grid, store, verbose=0)
        wall = time.perf_counter() - started
        _, rows = query(store, "select sum(s), count(*) from (select any_value(train_seconds) + any_value(eval_seconds) as s from results group by config_hash)")
        compute, done = rows[0]
    if not done:
        raise SystemExit(f"{execution}: no trial finished ({summary.errored} errored); see the log above")
    print(f"== execution: {execution} ==")
    print(f"grid: {n} trials, {concurrency} at a time, {summary.errored} errored")
    print(f"grid wall time:             {wall:8.1f} s")
    print(f"sum of trial compute:       {compute:8.1f} s  (train + eval, {done} trials)")
    print(f"ratio wall / (compute/{concurrency}):  {wall / (compute / concurrency):8.2f}")
    print(f"overhead per trial:         {(wall * concurrency - compute) / n:8.1f} s  (target <= 5 s)")
    keys = ("startup_seconds", "import_seconds", "worker_seconds", "train_seconds")
    per_trial = [m for m in summary.trial_metrics if all(k in m for k in keys)]
    if per_trial:
        mean = {k: sum(m[k] for m in per_trial) / len(per_trial) for k in keys}
        setup = mean["worker_seconds"] - mean["train_seconds"]
        print("mean per trial, outside training (eval and data/model setup together):")
        print(f"  Ray start-up (trial start -> train fn entered): {mean['startup_seconds']:6.1f} s")
        print(f"  imports in the worker:                          {mean['import_seconds']:6.1f} s")
        print(f"  data + model setup + eval + result write:       {setup:6.1f} s")


if __name__ == "__main__":
    main()
