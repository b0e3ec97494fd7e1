"""The answers the Serve app gives, computed from the laws and draws in the store.

Kept free of Ray and HTTP so it can be reasoned about (and tested) on its own; `app.py`
puts it behind FastAPI + Ray Serve. It only reads and answers: the laws, their bootstrap
draws (`tokenscale fit` stores both) and the results (for the candidates and /trials) are
read from the store, and nothing is fitted or resampled here -- this module imports
`fitting.law` (prediction) and `fitting.frontier` (the choice), never the solver or the
bootstrap.

Everything that does not depend on the query is computed once per (re)load in
`load_snapshot`: per (task family, compressor filter, form) the candidates, their
predicted errors, the interval of each prediction over the law's stored draws, and the
(draws x candidates) predictions behind `optimal_share`; per task family the trials ranked
by observed error. `Advisor.optimal` is then `fitting.frontier.choose` on ~100 candidates
plus a few vector operations, microseconds next to Ray Serve's milliseconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenscale.costs import FORMS, llm_params_within
from tokenscale.fitting.frontier import (
    BudgetError,
    Candidate,
    Choice,
    Menu,
    candidates,
    choice_shares,
    choose,
    draw_errors,
    frontier,
)
from tokenscale.fitting.law import Draws, Law, laws_from_table
from tokenscale.store import Store

log = logging.getLogger("ray.serve")

# Accepted ranges of the query parameters, shared by the validation here and the API docs.
MAX_FLOPS = 1e30  # ~1e6 x the largest single-query inference budget anyone runs
MAX_TOKENS = 1e7  # text or generated tokens per query
MAX_TOP = 100
CI_METHOD = (
    "percentile interval of the predicted error over the law's bootstrap draws, as `tokenscale fit` "
    "stored them (draws.parquet: refitted with the law's own loss, from the fit's seed), at the "
    "law's ci_level"
)


class BadRequest(ValueError):
    """The request cannot be answered as asked; the message says what is accepted."""


class NotReady(LookupError):
    """The store has no fitted laws (for the grid asked) yet: nothing to answer from."""


def finite_or_none(x: Any) -> float | None:
    """JSON has no NaN/inf (and Starlette refuses to render them): unknown -> null."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def jsonable(value: Any) -> Any:
    """Rows from parquet as JSON: NaN/inf -> null, timestamps -> ISO 8601, numpy -> Python."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return finite_or_none(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


# ---- the snapshot: everything precomputed at (re)load ---------------------------------------


@dataclass(frozen=True)
class Options:
    """The candidates one (task, compressor filter, form) chooses among, in the order of
    `fitting.frontier.candidates`, with what `choose` does not give: each prediction's
    interval over the stored draws and the (draws x candidates) predictions."""

    candidates: tuple[Candidate, ...]
    menu: Menu  # the candidates priced and predicted for `choose` / `frontier`, once
    error_lo: np.ndarray
    error_hi: np.ndarray
    draw_errors: np.ndarray  # (draws, candidates); no rows without draws
    laws: dict[str, Law]  # compressor -> law
    ci_level: float | None
    index: dict[Candidate, int] = field(repr=False)


@dataclass
class Snapshot:
    grid: str
    laws: dict[tuple[str, str, str], tuple[dict, Law]]  # (task_family, compressor, form)
    candidates: list[Candidate]
    loaded_at: float
    fitted_at: str
    draws: dict[tuple[str, str, str], Draws | None] = field(default_factory=dict)
    options: dict[tuple[str, str | None, str], Options] = field(default_factory=dict)
    trials: dict[str, list[dict]] = field(default_factory=dict)  # task -> best first
    fingerprint: tuple = ()

    def preferred_form(self, task: str) -> str:
        """The form the fit marks better (`preferred`) for most of the task's compressors
        (ties and laws fitted before the mark: the first of FORMS)."""
        votes = {form: 0 for form in FORMS}
        for (family, _, form), (row, _) in self.laws.items():
            if family == task and row.get("preferred"):
                votes[form] += 1
        return max(FORMS, key=lambda form: (votes[form], -FORMS.index(form)))


def laws_fingerprint(store: Store, grid: str | None = None) -> tuple:
    """A cheap identity of the laws object(s) a snapshot is built from, (grid, version...)
    per laws.parquet (`Store.laws_versions`: a stat or a HEAD), so the reload loop can poll
    often without reading any parquet. A fit writes its draws before its laws, so a new
    fingerprint means the draws of those laws are in place too."""
    return store.laws_versions(grid)


def load_snapshot(
    store: Store,
    grid: str | None = None,
    *,
    cis: bool = True,
    fingerprint: tuple | None = None,
) -> Snapshot | None:
    """The newest fitted grid (or `grid`), with every query-independent number precomputed;
    None while the store has no laws (for `grid`) yet. `cis=False` skips reading the draws
    (the CI and share fields are then null). `fingerprint`: the caller's
    `laws_fingerprint`, taken before reading (so a write racing the read is seen next poll)."""
    if fingerprint is None:
        fingerprint = laws_fingerprint(store, grid)
    table = store.read_laws(grid)
    rows = [(row, law) for row, law in laws_from_table(table) if _servable(row, law)]
    if not rows:
        return None
    # ISO strings order UTC timestamps chronologically and tolerate a missing one
    chosen = grid or max(rows, key=lambda r: str(r[0]["fitted_at"] or ""))[0]["grid"]
    rows = [r for r in rows if r[0]["grid"] == chosen]
    laws = {(row["task_family"], row["compressor"], row["form"]): (row, law) for row, law in rows}
    newest = max((row["fitted_at"] for row, _ in rows), key=lambda t: str(t or ""))
    fitted_at = jsonable(newest) if newest is not None else ""
    results = store.read_results(chosen)
    # a row without the candidate's identity cannot be priced or predicted: leave it out
    for name in ("llm", "llm_params", "visual_tokens", "compressor", "task_family"):
        results = results.filter(pc.is_valid(results[name]))
    results = results.filter(pc.and_(pc.greater(results["llm_params"], 0), pc.greater(results["visual_tokens"], 0)))
    cands = candidates(results)
    draws = _law_draws(store.read_draws(chosen), laws) if cis else dict.fromkeys(laws)
    return Snapshot(
        grid=chosen,
        laws=laws,
        candidates=cands,
        loaded_at=time.time(),
        fitted_at=fitted_at,
        draws=draws,
        options=_options(laws, draws, cands),
        trials=_rank_trials(results),
        fingerprint=fingerprint,
    )


def _servable(row: dict, law: Law) -> bool:
    """A law row the service can use: named, of a known form, all parameters finite."""
    if not all(isinstance(row.get(k), str) for k in ("grid", "task_family", "compressor", "form")) or law.form not in FORMS:
        log.warning("tokenscale: skipping a law row without grid/task/compressor/form: %s", row)
        return False
    params = [law.A, law.alpha, law.beta, law.D] + ([law.B] if law.form == "sum" else [])
    if not all(isinstance(x, int | float) and math.isfinite(x) for x in params):
        log.warning("tokenscale: skipping law %s/%s/%s: non-finite parameters", row["task_family"], row["compressor"], row["form"])
        return False
    return True


def _law_draws(table: pa.Table, laws: dict) -> dict[tuple[str, str, str], Draws | None]:
    """Each law's bootstrap draws from the store's draws table: those of the same fit
    (same fitted_at) and as many as the law row says its CIs used; None (null CIs) for a
    law without them (fitted before draws were stored, or a refit landing mid-read: the
    next poll reloads)."""
    out: dict[tuple[str, str, str], Draws | None] = dict.fromkeys(laws)
    if table.num_rows == 0:
        return out
    columns = {name: table[name].to_pylist() for name in ("task_family", "compressor", "form", "fitted_at")}
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(columns["task_family"], columns["compressor"], columns["form"], columns["fitted_at"], strict=True)):
        groups.setdefault(key, []).append(i)
    numbers = {name: table[name].to_numpy(zero_copy_only=False) for name in ("draw", "A", "B", "alpha", "beta", "D")}
    for key, (row, law) in laws.items():
        index = groups.get((*key, row["fitted_at"]))
        expected = row.get("ci_resamples")
        if not index:
            continue
        if expected is not None and len(index) != expected:
            log.warning("tokenscale: %s has %d stored draws, its law says %s: no CIs for it", "/".join(key), len(index), expected)
            continue
        index = np.array(index)[np.argsort(numbers["draw"][index], kind="stable")]
        out[key] = Draws.from_columns(law.form, *(numbers[name][index].astype(float) for name in ("A", "alpha", "beta", "D")),
                                      B=numbers["B"][index].astype(float) if law.form == "sum" else None)
    return out


def _options(laws: dict, draws: dict, cands: list[Candidate]) -> dict[tuple[str, str | None, str], Options]:
    out: dict[tuple[str, str | None, str], Options] = {}
    for task, form in sorted({(k[0], k[2]) for k in laws}):
        by_compressor = {k[1]: law for k, (_, law) in laws.items() if k[0] == task and k[2] == form}
        levels = {k[1]: finite_or_none(row.get("ci_level")) for k, (row, _) in laws.items() if k[0] == task and k[2] == form}
        for compressor in [None, *sorted(by_compressor)]:
            laws_here = by_compressor if compressor is None else {compressor: by_compressor[compressor]}
            subset = tuple(c for c in cands if c.compressor in laws_here)
            lo, hi = np.full(len(subset), np.nan), np.full(len(subset), np.nan)
            used = set()
            for name, law in laws_here.items():
                d, level = draws.get((task, name, form)), levels.get(name)
                index = [i for i, c in enumerate(subset) if c.compressor == name]
                if d is None or not len(d) or level is None or not 0 < level < 1 or not index:
                    continue
                n = np.array([subset[i].law_params(law) for i in index])
                v = np.array([subset[i].visual_tokens for i in index], dtype=float)
                lo[index], hi[index] = d.error_interval(n, v, level)
                used.add(level)
            present = {name: draws.get((task, name, form)) for name in laws_here}
            out[(task, compressor, form)] = Options(
                candidates=subset,
                menu=Menu.of(laws_here, subset),
                error_lo=lo,
                error_hi=hi,
                draw_errors=draw_errors(present, laws_here, subset),
                laws=laws_here,
                ci_level=used.pop() if len(used) == 1 else None,
                index={c: i for i, c in enumerate(subset)},
            )
    return out


_TRIAL_KEYS = ["task_family", "config_hash", "trial_id", "llm", "llm_params", "visual_tokens", "compressor", "seed"]


def _rank_trials(results: pa.Table) -> dict[str, list[dict]]:
    """Per task family, each trial's mean error over the family's benchmarks, best first
    (ties: cheaper inference first, then config hash so the order is stable)."""
    if results.num_rows == 0:
        return {}
    grouped = results.group_by(_TRIAL_KEYS, use_threads=False).aggregate([
        ("error", "mean"), ("score", "mean"), ("benchmark", "count_distinct"),
        ("inference_flops", "mean"), ("n_examples", "sum"), ("finished_at", "max"),
    ])
    out: dict[str, list[dict]] = {}
    for r in grouped.to_pylist():
        error = finite_or_none(r["error_mean"])
        if error is None:
            continue  # a trial without an error cannot be ranked
        out.setdefault(r["task_family"], []).append({
            "trial_id": r["trial_id"],
            "config_hash": r["config_hash"],
            "llm": r["llm"],
            "llm_params": r["llm_params"],
            "visual_tokens": r["visual_tokens"],
            "compressor": r["compressor"],
            "seed": r["seed"],
            "mean_error": error,
            "mean_score": finite_or_none(r["score_mean"]),
            "benchmarks": r["benchmark_count_distinct"],
            "examples": r["n_examples_sum"],
            "inference_flops": finite_or_none(r["inference_flops_mean"]),
            "finished_at": jsonable(r["finished_at_max"]),
        })
    for trials in out.values():
        inf = float("inf")
        trials.sort(key=lambda t: (t["mean_error"], t["inference_flops"] if t["inference_flops"] is not None else inf,
                                   t["config_hash"] or ""))
        for rank, t in enumerate(trials, 1):
            t["rank"] = rank
    return out


# ---- the answers ---------------------------------------------------------------------------------


def _accepted(values: Iterable[str]) -> str:
    values = sorted(values)
    return ", ".join(values) if values else "(none)"


def check_number(name: str, value: Any, *, low: float, high: float, low_inclusive: bool, example: str) -> float:
    """A finite number in range, or BadRequest saying what is accepted (bool is not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise BadRequest(f"{name} must be a number, got {type(value).__name__}: {example}")
    x = float(value)
    above = x >= low if low_inclusive else x > low
    if not math.isfinite(x) or not above or x > high:
        bracket = "[" if low_inclusive else "("
        raise BadRequest(f"{name}={value!r} is out of range: accepted is a finite number in {bracket}{low:g}, {high:g}], {example}")
    return x


def _check_token_counts(text_tokens: float, generated_tokens: float) -> tuple[float, float]:
    text_tokens = check_number("text_tokens", text_tokens, low=0.0, high=MAX_TOKENS, low_inclusive=True,
                               example="the query's text tokens, 0 for a cached query")
    generated_tokens = check_number("generated_tokens", generated_tokens, low=0.0, high=MAX_TOKENS,
                                    low_inclusive=True, example="tokens generated per answer, default 0")
    return text_tokens, generated_tokens


def _runner_up(opts: Options, costs: np.ndarray, flops: float, chosen: int, shares: np.ndarray) -> int | None:
    """The index of the candidate, other than `chosen`, that is the choice in the most stored
    draws at this budget (ties, and answers without draws: the lower predicted error, then
    the cheaper); None when no other candidate within the budget has a predicted error."""
    errors = opts.menu.errors
    others = np.flatnonzero((costs <= flops) & np.isfinite(errors))
    others = others[others != chosen]
    if others.size == 0:
        return None
    share = np.nan_to_num(shares[others], nan=0.0)
    return int(others[np.lexsort((others, costs[others], errors[others], -share))[0]])


def _candidate_fields(opts: Options, i: int, costs: np.ndarray) -> dict:
    """A candidate as an answer names it: identity, predicted error with its CI, cost."""
    c = opts.candidates[i]
    return {
        "llm": c.llm,
        "llm_params": int(c.llm_params),
        "visual_tokens": int(c.visual_tokens),
        "compressor": c.compressor,
        "predicted_error": finite_or_none(opts.menu.errors[i]),
        "predicted_error_lo": finite_or_none(opts.error_lo[i]),
        "predicted_error_hi": finite_or_none(opts.error_hi[i]),
        "flops": float(costs[i]),
    }


class Advisor:
    """Answers from one snapshot; immutable, so the app swaps a new one in atomically."""

    def __init__(self, snapshot: Snapshot):
        self.snapshot = snapshot
        self._tasks = sorted({k[0] for k in snapshot.laws})

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def _options_for(self, task: Any, compressor: Any, form: Any) -> Options:
        if form not in FORMS:
            raise BadRequest(f"unknown form {form!r}: accepted values are {', '.join(FORMS)}")
        if not isinstance(task, str) or task not in self._tasks:
            raise BadRequest(f"unknown task {task!r}: accepted values are {_accepted(self._tasks)}")
        opts = self.snapshot.options.get((task, None, form))
        if opts is None:
            forms = {k[2] for k in self.snapshot.laws if k[0] == task}
            raise BadRequest(f"no {form!r} law for task {task!r}: accepted forms for it are {_accepted(forms)}")
        if compressor is not None:
            if not isinstance(compressor, str) or compressor not in opts.laws:
                raise BadRequest(f"unknown compressor {compressor!r} for task {task!r}: accepted values are {_accepted(opts.laws)}")
            opts = self.snapshot.options[(task, compressor, form)]
        if not opts.candidates:
            raise BadRequest(f"the grid {self.snapshot.grid!r} has no trained candidate for task {task!r} with a fitted law")
        return opts

    def _point(self, opts: Options, choice: Choice, budget: float, text_tokens: float, generated_tokens: float,
               share: float | None) -> dict:
        c = choice.candidate
        i = opts.index[c]
        v_star = choice.optimal_visual_tokens
        # the continuous optimum's N at this budget: the N that spends it at V*
        n_star = llm_params_within(budget, text_tokens, v_star, generated_tokens, c.compressor) if math.isfinite(v_star) else None
        return {
            "llm": c.llm,
            "llm_params": int(c.llm_params),
            "visual_tokens": int(c.visual_tokens),
            "compressor": c.compressor,
            "predicted_error": finite_or_none(choice.predicted_error),
            "predicted_error_lo": finite_or_none(opts.error_lo[i]),
            "predicted_error_hi": finite_or_none(opts.error_hi[i]),
            "optimal_share": finite_or_none(share),
            "flops": float(choice.flops),
            "optimal_visual_tokens": finite_or_none(v_star),
            "optimal_llm_params": finite_or_none(n_star),
        }

    def optimal(
        self,
        flops: float,
        text_tokens: float = 0.0,
        task: str = "reasoning",
        compressor: str | None = None,
        form: str | None = None,
        generated_tokens: float = 0.0,
    ) -> dict:
        """The candidate with the lowest predicted error among those costing at most `flops`
        per query (ties: the cheaper), as `fitting.frontier.choose` picks it, with the
        prediction's CI over the stored draws, the share of those draws in which it is the
        choice (`optimal_share`, also as `p_optimal`), the runner-up (the other candidate
        chosen in the most draws) with its share, and the continuous optimum (V*, N*) at
        this budget."""
        flops = check_number("flops", flops, low=0.0, high=MAX_FLOPS, low_inclusive=False,
                             example="the inference budget per query in FLOPs, e.g. 2e12")
        text_tokens, generated_tokens = _check_token_counts(text_tokens, generated_tokens)
        form = form or self.snapshot.preferred_form(task)  # no form asked: the better-fitting one
        opts = self._options_for(task, compressor, form)
        try:
            choice = choose(opts.laws, opts.menu, flops, text_tokens, generated_tokens)
        except BudgetError as err:
            raise BadRequest(str(err)) from None
        costs = opts.menu.costs(text_tokens, generated_tokens)
        shares = choice_shares(opts.draw_errors, costs, flops)
        chosen = opts.index[choice.candidate]
        runner_up = _runner_up(opts, costs, flops, chosen, shares)
        return {
            **self._header(opts, task, form, text_tokens, generated_tokens),
            "budget_flops": flops,
            **self._point(opts, choice, flops, text_tokens, generated_tokens, shares[chosen]),
            # the decision's own certainty: how often the bootstrap refits agree with it, and
            # the alternative they favour most (optimal_share above is the same number)
            "p_optimal": finite_or_none(shares[chosen]),
            "runner_up": None if runner_up is None else _candidate_fields(opts, runner_up, costs),
            "runner_up_p_optimal": None if runner_up is None else finite_or_none(shares[runner_up]),
        }

    def frontier(
        self,
        task: str = "reasoning",
        text_tokens: float = 0.0,
        compressor: str | None = None,
        form: str | None = None,
        generated_tokens: float = 0.0,
    ) -> dict:
        """The Pareto frontier of the candidates (`fitting.frontier.frontier`), cheapest
        first, each point with its prediction CI, the share of draws in which it is the
        choice at its own cost, and the continuous optimum at its cost."""
        text_tokens, generated_tokens = _check_token_counts(text_tokens, generated_tokens)
        form = form or self.snapshot.preferred_form(task)
        opts = self._options_for(task, compressor, form)
        costs = opts.menu.costs(text_tokens, generated_tokens)
        points = [
            self._point(opts, choice, choice.flops, text_tokens, generated_tokens,
                        choice_shares(opts.draw_errors, costs, choice.flops)[opts.index[choice.candidate]])
            for choice in frontier(opts.laws, opts.menu, text_tokens, generated_tokens)
        ]
        return {**self._header(opts, task, form, text_tokens, generated_tokens), "points": points}

    def _header(self, opts, task: str, form: str, text_tokens: float, generated_tokens: float) -> dict:
        """What every answer states about itself: which laws, which question."""
        return {
            "grid": self.snapshot.grid,
            "fitted_at": self.snapshot.fitted_at,
            "task": task,
            "form": form,
            "text_tokens": text_tokens,
            "generated_tokens": generated_tokens,
            "ci_level": opts.ci_level,
        }

    def laws(self) -> dict:
        """The fitted laws as stored (parameter CIs, level and number of draws included),
        each saying whether its draws were loaded (`draws_loaded`)."""
        out = []
        for key, (row, _) in sorted(self.snapshot.laws.items()):
            draws = self.snapshot.draws.get(key)
            out.append(jsonable({**row, "draws_loaded": 0 if draws is None else len(draws)}))
        return {"grid": self.snapshot.grid, "fitted_at": self.snapshot.fitted_at, "laws": out}

    def trials(self, task: str = "reasoning", top: int = 10) -> dict:
        """The `top` trials with the lowest mean error over the task family's benchmarks."""
        if isinstance(top, bool) or not isinstance(top, int | np.integer) or not 1 <= top <= MAX_TOP:
            raise BadRequest(f"top={top!r}: accepted is an integer from 1 to {MAX_TOP}")
        ranked = self.snapshot.trials
        if not isinstance(task, str) or task not in ranked:
            raise BadRequest(f"unknown task {task!r}: accepted values are {_accepted(ranked)}")
        return {"grid": self.snapshot.grid, "task": task, "top": int(top), "trials": ranked[task][: int(top)]}

    def candidates(self) -> list[dict]:
        return [asdict(c) for c in self.snapshot.candidates]
