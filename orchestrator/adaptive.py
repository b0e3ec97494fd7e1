"""`tokenscale run GRID --adaptive`: the grid's cells in the order that settles the decision.

The strategy is fitting.adaptive's (a space-filling start per compressor, then the cells
that most reduce the uncertainty of "which candidate is optimal" per unit of training
cost, until the top candidate is optimal in >= 95% of the bootstrap draws at every FLOP
budget and query length of interest). This module is its oracle: each batch is an
ordinary `run_grid` over those cells (Tune trials under the same store contract, as many
at a time as `max_concurrent_trials`), and the store is the loop's memory: what is done is
what has a result object, so a stopped run picks up where it was (`tokenscale resume`
continues the loop, not the whole grid: `run --adaptive` leaves a marker beside the grid).

A cell is (LLM, V, compressor) with all its seeds; its error per task family is the mean
over the family's benchmarks and seeds, as the laws are fitted. Each family is its own
decision: a batch is the union of what the families' steps ask for, and the run stops
when every family's decision is settled, when every cell has run, or after `max_trials`
cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenscale.config import Grid, GridError, TrialConfig, check_tracking, planned_llm_params
from tokenscale.fitting.adaptive import Settings, initial_design, next_step
from tokenscale.fitting.frontier import Candidate
from tokenscale.store import Store

MARKER = "adaptive.json"  # beside grid.yaml: this grid runs adaptively (and its max_trials)


@dataclass
class AdaptiveSummary:
    grid: str
    cells_total: int
    cells_run: int = 0  # cells with results when the loop ended
    batches: list[list[str]] = field(default_factory=list)  # trial ids started, per batch
    stopped: str = ""  # settled | max_trials | exhausted | errored
    p_optimal_min: dict[str, float] = field(default_factory=dict)  # per task family, at the last fit
    errored: int = 0

    def line(self) -> str:
        shares = ", ".join(f"{family} {p:.2f}" for family, p in sorted(self.p_optimal_min.items()))
        return (
            f"grid {self.grid} (adaptive): {self.cells_run}/{self.cells_total} cells run in {len(self.batches)} "
            f"batch(es), stopped: {self.stopped}" + (f"; least settled decision's p_optimal: {shares}" if shares else "")
        )


def cells(grid: Grid) -> dict[Candidate, list[TrialConfig]]:
    """The grid's cells, each with its trials (one per seed). N is the planned parameter
    count (`llms[].params`, else counted from the config / checkpoint's config.json)."""
    out: dict[Candidate, list[TrialConfig]] = {}
    for trial in grid.trials():
        params = planned_llm_params(trial.llm)
        if params is None:
            raise GridError(
                f"llms: the adaptive grid prices cells by N, but {trial.llm.name!r} has no known size; "
                f"declare llms[].params"
            )
        cell = Candidate(trial.llm.name, int(round(params)), trial.visual_tokens, trial.compressor)
        out.setdefault(cell, []).append(trial)
    return out


def measured(store: Store, grid: Grid, table: dict[Candidate, list[TrialConfig]]) -> dict[str, dict[Candidate, float]]:
    """Per task family: the cells whose trials all have results -> the mean error over the
    family's benchmarks and the cell's seeds."""
    done = {c for c, trials in table.items() if all(store.has_result(t.grid, t.compressor, t.config_hash) for t in trials)}
    if not done:
        return {}
    results = store.read_results(grid.name).to_pylist()
    by_hash = {t.config_hash: c for c, trials in table.items() if c in done for t in trials}
    sums: dict[tuple[str, Candidate], list[float]] = {}
    for row in results:
        cell = by_hash.get(row["config_hash"])
        if cell is not None:
            sums.setdefault((row["task_family"], cell), []).append(float(row["error"]))
    out: dict[str, dict[Candidate, float]] = {}
    for (family, cell), errors in sums.items():
        out.setdefault(family, {})[cell] = sum(errors) / len(errors)
    return out


def cells_done(by_family: dict[str, dict[Candidate, float]]) -> set[Candidate]:
    return {c for errors in by_family.values() for c in errors}


def next_cells(table: dict[Candidate, list[TrialConfig]], by_family: dict[str, dict[Candidate, float]], slots: int,
               settings: Settings) -> tuple[list[Candidate], str, dict[str, float]]:
    """The next batch of cells given what is `measured` (the rest of the initial design,
    then at most `slots`), why (initial | acquire | settled | exhausted), and each family's
    least settled decision's p_optimal."""
    candidates = list(table)
    done = cells_done(by_family)
    # the space-filling start is one batch (nothing is fitted before it is complete; Tune
    # runs its cells `max_concurrent_trials` at a time); then `slots` cells a batch
    start = [c for c in initial_design(candidates, settings.form, settings.train_text_tokens) if c not in done]
    if start:
        return start, "initial", {}
    chosen: list[Candidate] = []
    reasons, shares = set(), {}
    for family, errors in sorted(by_family.items()):
        step = next_step(candidates, errors, settings, batch_size=slots)
        reasons.add(step.reason)
        if step.assessment is not None:
            shares[family] = step.assessment.p_optimal_min
        chosen += [c for c in step.batch if c not in chosen]
    if not chosen:
        return [], ("settled" if reasons == {"settled"} else "exhausted"), shares
    return chosen[:slots], ("initial" if "initial" in reasons else "acquire"), shares


def run_adaptive_grid(grid: Grid, store: Store, *, max_trials: int | None = None, verbose: int = 1,
                      ray_storage_uri: str | None = None, settings: Settings | None = None) -> AdaptiveSummary:
    """Run `grid` adaptively (see the module's doc); `max_trials` caps the cells run."""
    from .driver import run_grid, save_grid

    settings = settings or Settings()
    check_tracking(grid)  # before the marker and the first batch
    table = cells(grid)
    save_grid(grid, store)
    store.put_bytes(store.join(grid.name, MARKER), json.dumps({"max_trials": max_trials}).encode())
    summary = AdaptiveSummary(grid.name, len(table))
    slots = max(1, grid.max_concurrent_trials)
    while True:
        by_family = measured(store, grid, table)  # the store, read once a batch
        summary.cells_run = len(cells_done(by_family))
        left = None if max_trials is None else max_trials - summary.cells_run
        if left is not None and left <= 0:
            summary.stopped = "max_trials"
            break
        batch, reason, summary.p_optimal_min = next_cells(table, by_family, slots, settings)
        batch = batch if left is None else batch[:left]
        if not batch:
            summary.stopped = reason
            break
        hashes = {t.config_hash for c in batch for t in table[c]}
        summary.batches.append([t.trial_id for c in batch for t in table[c]])
        if verbose:
            print(f"adaptive batch {len(summary.batches)} ({reason}): "
                  + ", ".join(f"{c.llm} V={c.visual_tokens} {c.compressor}" for c in batch), flush=True)
        result = run_grid(grid, store, verbose, ray_storage_uri, only=hashes)
        if result.errored:
            summary.errored, summary.stopped = result.errored, "errored"
            summary.cells_run = len(cells_done(measured(store, grid, table)))
            break
    return summary


def saved_adaptive(store: Store, name: str) -> dict[str, Any] | None:
    """The `run --adaptive` marker of a grid in the store, or None."""
    key = store.join(name, MARKER)
    return json.loads(store.get_bytes(key)) if store.exists(key) else None
