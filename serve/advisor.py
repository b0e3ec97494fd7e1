"""The answers the Serve app gives, computed from the laws and results in the store.

Kept free of Ray and HTTP so it can be reasoned about (and tested) on its own; `app.py`
puts it behind FastAPI + Ray Serve.

Everything that does not depend on the query is computed once per (re)load in
`load_snapshot`: per (task family, compressor filter, form) the candidates' N, V, predicted
error and its bootstrap interval as numpy arrays, and per task family the trials ranked by
observed error. `Advisor.optimal` is then a handful of vector operations on ~100-element
arrays plus V*, so an answer costs microseconds next to Ray Serve's milliseconds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenscale.fitting.frontier import Candidate, frontier
from tokenscale.fitting.grid_fit import candidates, law_points, laws_from_table
from tokenscale.fitting.law import Law, optimal_visual_tokens
from tokenscale.store import Store, s3_endpoint

try:  # bootstrap CIs came with a later fitting; without them the CI fields are null
    from tokenscale.fitting.law import bootstrap_law
except ImportError:  # pragma: no cover - depends on the fitting version installed
    bootstrap_law = None

log = logging.getLogger("ray.serve")

FORMS = ("product", "sum")
# Accepted ranges of the query parameters, shared by the validation here and the API docs.
MAX_FLOPS = 1e30  # ~1e6 x the largest single-query inference budget anyone runs
MAX_TOKENS = 1e7  # text or generated tokens per query
MAX_TOP = 100
CI_RESAMPLES = 200  # fit_grid's defaults, so the prediction CI matches the fit's
CI_LEVEL = 0.90
CI_SEED = 0
CI_METHOD = "percentile bootstrap over the grid's (N, V) points"


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
    """The candidates one (task, compressor filter, form) chooses among, as arrays in the
    order of `fitting.grid_fit.candidates` (ties then resolve as `fitting.frontier.choose`
    resolves them)."""

    candidates: tuple[Candidate, ...]
    llm_params: np.ndarray
    visual_tokens: np.ndarray
    error: np.ndarray
    error_lo: np.ndarray
    error_hi: np.ndarray
    laws: dict[str, Law]  # compressor -> law
    ci_level: float | None
    v_min: float
    v_max: float
    index: dict[Candidate, int] = field(repr=False)


@dataclass
class Snapshot:
    grid: str
    laws: dict[tuple[str, str, str], tuple[dict, Law]]  # (task_family, compressor, form)
    candidates: list[Candidate]
    loaded_at: float
    fitted_at: str
    law_cis: dict[tuple[str, str, str], Any] = field(default_factory=dict)  # LawCI or None
    options: dict[tuple[str, str | None, str], Options] = field(default_factory=dict)
    trials: dict[str, list[dict]] = field(default_factory=dict)  # task -> best first
    fingerprint: tuple = ()


def laws_fingerprint(store: Store, grid: str | None = None) -> tuple:
    """A cheap identity of the laws object(s) a snapshot is built from: (grid, version...)
    per laws.parquet, from a stat (local) or a HEAD (S3), so the reload loop can poll often
    without reading any parquet. Every write of laws is one atomic rename / one PUT, so a
    refit always changes it (new inode and mtime; new ETag and LastModified)."""
    if store.is_s3:
        return _s3_fingerprint(store, grid)
    root = Path(store.uri)
    if grid:
        grids = [grid]
    else:
        grids = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    out = []
    for g in grids:
        try:
            st = Path(store.laws_key(g)).stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        out.append((g, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _s3_fingerprint(store: Store, grid: str | None) -> tuple:
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=s3_endpoint())
    bucket, _, prefix = store.uri[len("s3://"):].partition("/")
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    if grid:
        grids = [grid]
    else:
        # one LIST with a delimiter names the grids without listing every result object
        grids = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base, Delimiter="/"):
            grids += [p["Prefix"][len(base):].strip("/") for p in page.get("CommonPrefixes", [])]
    out = []
    for g in sorted(grids):
        try:
            head = client.head_object(Bucket=bucket, Key=f"{base}{g}/laws/laws.parquet")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                continue
            raise
        out.append((g, head.get("ETag"), str(head.get("LastModified")), head.get("ContentLength")))
    return tuple(out)


def load_snapshot(
    store: Store,
    grid: str | None = None,
    *,
    ci_resamples: int = CI_RESAMPLES,
    ci_level: float = CI_LEVEL,
    fingerprint: tuple | None = None,
) -> Snapshot | None:
    """The newest fitted grid (or `grid`), with every query-independent number precomputed;
    None while the store has no laws (for `grid`) yet. `fingerprint`: the caller's
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
    law_cis = _law_cis(laws, results, ci_resamples, ci_level)
    return Snapshot(
        grid=chosen,
        laws=laws,
        candidates=cands,
        loaded_at=time.time(),
        fitted_at=fitted_at,
        law_cis=law_cis,
        options=_options(laws, law_cis, cands),
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


def _law_cis(laws: dict, results: pa.Table, resamples: int, level: float) -> dict:
    """The bootstrap of each law, recomputed from the store's results: the laws parquet
    keeps the parameter intervals but not the resampled fits, and the interval of a
    *prediction* needs those. Same resamples, level and seed as `fit_grid`'s defaults and
    the stored law as the warm start, so it reproduces the fit's intervals when the results
    are the ones the law was fitted on. A law it cannot bootstrap gets None (null CIs)."""
    if bootstrap_law is None or resamples <= 0:
        return dict.fromkeys(laws)
    try:
        points = law_points(results) if results.num_rows else {}
    except Exception:  # odd results must not stop the laws being served
        log.exception("tokenscale: cannot group results for the prediction CIs")
        points = {}
    out = {}
    for key, (row, law) in laws.items():
        task, compressor, form = key
        out[key] = None
        if (task, compressor) not in points:
            continue
        row_level = finite_or_none(row.get("ci_level"))  # a fitting that stores its level wins
        try:
            n, v, e = points[(task, compressor)]
            # law_points' order follows a multithreaded group_by, i.e. varies run to run;
            # the seeded resampling draws point *indices*, so fix the order (N, then V)
            order = np.lexsort((v, n))
            n, v, e = n[order], v[order], e[order]
            out[key] = bootstrap_law(n, v, e, form, law=law, resamples=resamples,
                                     level=row_level if row_level and 0 < row_level < 1 else level, seed=CI_SEED)
        except Exception as err:  # e.g. FitError: too few points to resample
            log.warning("tokenscale: no prediction CI for %s: %s", "/".join(key), err)
    return out


def _error_interval(ci: Any, n: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    nan = np.full(len(n), np.nan)
    if ci is None or not hasattr(ci, "error_interval") or len(n) == 0:
        return nan, nan.copy()
    try:
        lo, hi = ci.error_interval(n, v)
        return np.asarray(lo, dtype=float).reshape(len(n)), np.asarray(hi, dtype=float).reshape(len(n))
    except Exception:
        log.exception("tokenscale: error_interval failed")
        return nan, nan.copy()


def _options(laws: dict, law_cis: dict, cands: list[Candidate]) -> dict[tuple[str, str | None, str], Options]:
    out: dict[tuple[str, str | None, str], Options] = {}
    for task, form in sorted({(k[0], k[2]) for k in laws}):
        by_compressor = {k[1]: law for k, (_, law) in laws.items() if k[0] == task and k[2] == form}
        usable = [c for c in cands if c.compressor in by_compressor]
        n = np.array([c.llm_params for c in usable], dtype=float)
        v = np.array([c.visual_tokens for c in usable], dtype=float)
        error = np.full(len(usable), np.nan)
        lo, hi = np.full(len(usable), np.nan), np.full(len(usable), np.nan)
        levels = set()
        for compressor, law in by_compressor.items():
            mask = np.array([c.compressor == compressor for c in usable], dtype=bool)
            if not mask.any():
                continue
            with np.errstate(all="ignore"):
                error[mask] = law.predict(n[mask], v[mask])
            ci = law_cis.get((task, compressor, form))
            lo[mask], hi[mask] = _error_interval(ci, n[mask], v[mask])
            if ci is not None:
                levels.add(float(ci.level))
        # a prediction that is not a number can never be "best"; keep it out of argmin
        error = np.where(np.isfinite(error), error, np.inf)
        level = levels.pop() if len(levels) == 1 else None
        for compressor in [None, *sorted(by_compressor)]:
            keep = np.array([compressor is None or c.compressor == compressor for c in usable], dtype=bool)
            subset = tuple(c for c, k in zip(usable, keep, strict=True) if k)
            laws_here = by_compressor if compressor is None else {compressor: by_compressor[compressor]}
            tokens = v[keep]
            out[(task, compressor, form)] = Options(
                candidates=subset,
                llm_params=n[keep],
                visual_tokens=tokens,
                error=error[keep],
                error_lo=lo[keep],
                error_hi=hi[keep],
                laws=laws_here,
                ci_level=level,
                v_min=float(tokens.min()) if len(tokens) else 1.0,
                v_max=float(tokens.max()) if len(tokens) else 1.0,
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

    def _point(self, opts: Options, i: int, cost: float, v_star: float, budget: float, q: float) -> dict:
        c = opts.candidates[i]
        return {
            "llm": c.llm,
            "llm_params": int(c.llm_params),
            "visual_tokens": int(c.visual_tokens),
            "compressor": c.compressor,
            "predicted_error": finite_or_none(opts.error[i]),
            "predicted_error_lo": finite_or_none(opts.error_lo[i]),
            "predicted_error_hi": finite_or_none(opts.error_hi[i]),
            "flops": float(cost),
            "optimal_visual_tokens": finite_or_none(v_star),
            # the continuous optimum's N at this budget: C = 2 N (Q + G + V*)
            "optimal_llm_params": finite_or_none(budget / (2.0 * (q + v_star))) if math.isfinite(v_star) else None,
        }

    def optimal(
        self,
        flops: float,
        text_tokens: float = 0.0,
        task: str = "reasoning",
        compressor: str | None = None,
        form: str = "product",
        generated_tokens: float = 0.0,
    ) -> dict:
        """The candidate with the lowest predicted error among those costing at most `flops`
        per query (ties: the cheaper), as `fitting.frontier.choose` picks it, with the
        prediction's CI and the continuous optimum (V*, N*) at this budget."""
        flops = check_number("flops", flops, low=0.0, high=MAX_FLOPS, low_inclusive=False,
                             example="the inference budget per query in FLOPs, e.g. 2e12")
        text_tokens, generated_tokens = _check_token_counts(text_tokens, generated_tokens)
        opts = self._options_for(task, compressor, form)
        q = text_tokens + generated_tokens
        costs = 2.0 * opts.llm_params * (q + opts.visual_tokens)
        fits = costs <= flops
        if not fits.any():
            raise BadRequest(
                f"flops={flops:.3g} is below the cheapest candidate's cost ({costs.min():.3g} FLOPs "
                f"at text_tokens={text_tokens:g}); give at least that"
            )
        i = int(np.lexsort((costs, np.where(fits, opts.error, np.inf)))[0])
        law = opts.laws[opts.candidates[i].compressor]
        v_star = optimal_visual_tokens(law, text_tokens, opts.v_min, opts.v_max, flops=flops, generated_tokens=generated_tokens)
        return {
            **self._header(opts, task, form, text_tokens, generated_tokens),
            "budget_flops": flops,
            **self._point(opts, i, costs[i], v_star, flops, q),
        }

    def frontier(
        self,
        task: str = "reasoning",
        text_tokens: float = 0.0,
        compressor: str | None = None,
        form: str = "product",
        generated_tokens: float = 0.0,
    ) -> dict:
        """The Pareto frontier of the candidates (`fitting.frontier.frontier`), cheapest
        first, each point with its prediction CI and the continuous optimum at its cost."""
        text_tokens, generated_tokens = _check_token_counts(text_tokens, generated_tokens)
        opts = self._options_for(task, compressor, form)
        q = text_tokens + generated_tokens
        points = [
            self._point(opts, opts.index[choice.candidate], choice.flops, choice.optimal_visual_tokens, choice.flops, q)
            for choice in frontier(opts.laws, list(opts.candidates), text_tokens, generated_tokens)
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
        """The fitted laws as stored (parameter CIs included), with the intervals the store
        does not keep (D, alpha/beta ratio, level) filled in from the recomputed bootstrap."""
        out = []
        for key, (row, _) in sorted(self.snapshot.laws.items()):
            item = dict(row)
            ci = self.snapshot.law_cis.get(key)
            if ci is not None:
                for name, value in ci.to_dict().items():
                    if finite_or_none(item.get(name)) is None:
                        item[name] = value
                item["ci_resamples"] = int(ci.resamples)
            out.append(jsonable(item))
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
