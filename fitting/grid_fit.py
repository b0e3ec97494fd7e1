"""Fit every (task_family, compressor, form) law of a grid from its results in the store,
and store each law with its bootstrap draws."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.stats import chi2

from tokenscale.costs import FORMS
from tokenscale.store import LAW_N_COLUMNS, Store

from .law import LOSSES, N_COLUMN, FitError, Law
from .solve import EXPONENT_MAX, fit_law
from .uncertainty import LawCI, bootstrap_law, holdout_error


def check_n_column(results: pa.Table, n_column: str) -> None:
    """`n_column` is one of LAW_N_COLUMNS and filled in every result row, or a FitError
    saying which rows lack it and what to do."""
    if n_column not in LAW_N_COLUMNS:
        raise FitError(f"n_column {n_column!r}: choose one of {', '.join(LAW_N_COLUMNS)}")
    missing = results[n_column].null_count if n_column in results.column_names else results.num_rows
    if missing:
        raise FitError(
            f"{missing} of {results.num_rows} result rows have no {n_column} (written before that column "
            f"existed): fit on another N (--n-column {N_COLUMN}), or re-run those trials"
        )


def law_points(
    results: pa.Table, n_column: str = N_COLUMN
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(task_family, compressor) -> (N, V, E): error averaged over a family's benchmarks
    and over seeds, one point per (LLM, V), as the paper does; N from `n_column`."""
    # single-threaded and sorted: the points' order (and so the seeded bootstrap) is stable
    grouped = results.group_by(["task_family", "compressor", n_column, "visual_tokens"], use_threads=False).aggregate(
        [("error", "mean")]
    )
    grouped = grouped.sort_by([(n_column, "ascending"), ("visual_tokens", "ascending")])
    points: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for key in {(f, c) for f, c in zip(grouped["task_family"].to_pylist(), grouped["compressor"].to_pylist(), strict=True)}:
        mask = pc.and_(pc.equal(grouped["task_family"], key[0]), pc.equal(grouped["compressor"], key[1]))
        part = grouped.filter(mask)
        points[key] = (
            part[n_column].to_numpy().astype(float),
            part["visual_tokens"].to_numpy().astype(float),
            part["error_mean"].to_numpy().astype(float),
        )
    return points


# A family is flat when a constant explains its points as well as their eval noise allows:
# the chi-square of the constant (weighted mean) against that noise is not significant at
# this level. The law's exponents then rank the grid by noise, not by N or V.
FLAT_P = 0.05


def eval_variance(results: pa.Table, point: list[str]) -> dict[tuple, float | None]:
    """The eval-noise variance of each point, a point being one value of the `point` columns
    (its error the mean over its rows), keyed by that value; None where a row of it has no
    `n_examples`.

    A score in [0, 1] with mean p over n examples has variance at most p(1-p)/n (Bhatia-
    Davis; exactly so for exact match), taken per (point, benchmark). Seeds share one eval
    set, so their noise is correlated: their variances are averaged, not divided by the
    number of seeds (an upper bound). Benchmarks have their own eval sets: the point,
    a mean over B of them, has the sum of their variances / B^2. Training noise across
    seeds is not in it."""
    error = pc.max_element_wise(pc.min_element_wise(pc.cast(results["error"], pa.float64()), 1.0), 0.0)
    n_examples = pc.cast(results["n_examples"], pa.float64())
    table = pa.table({
        **{column: results[column] for column in point}, "benchmark": results["benchmark"],
        "var": pc.divide(pc.multiply(error, pc.subtract(1.0, error)), n_examples),
        "valid": pc.fill_null(pc.greater(n_examples, 0.0), False),
    })
    per_benchmark = table.group_by([*point, "benchmark"], use_threads=False).aggregate([("var", "mean"), ("valid", "all")])
    grouped = per_benchmark.group_by(point, use_threads=False).aggregate(
        [("var_mean", "sum"), ("var_mean", "count"), ("valid_all", "all")]
    )
    return {
        tuple(row[c] for c in point): row["var_mean_sum"] / row["var_mean_count"] ** 2 if row["valid_all_all"] else None
        for row in grouped.to_pylist()
    }


def eval_noise(
    results: pa.Table, n_column: str = N_COLUMN, points: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
) -> dict[tuple[str, str], np.ndarray | None]:
    """(task_family, compressor) -> the eval-noise variance (`eval_variance`) of each
    `law_points` point, in its order (`points`: those already computed from `results`);
    None where a point has none. Leaving training noise out can only make a family look
    less flat than it is."""
    variance = eval_variance(results, ["task_family", "compressor", n_column, "visual_tokens"])
    noise: dict[tuple[str, str], np.ndarray | None] = {}
    for key, (n, v, _) in (points if points is not None else law_points(results, n_column)).items():
        values = [variance[(*key, int(n_i), int(v_i))] for n_i, v_i in zip(n, v, strict=True)]
        noise[key] = None if any(x is None for x in values) else np.array(values, dtype=float)
    return noise


def flatness(e: np.ndarray, variance: np.ndarray | None) -> tuple[float, int, float] | None:
    """(chi2, dof, p) of a constant error against the points' eval-noise variances: a large p
    says the points vary no more than their noise (None without the variances, or where a
    variance is 0, as for a score of exactly 0 or 1 everywhere)."""
    if variance is None or len(e) < 2 or not np.all(variance > 0):
        return None
    weight = 1.0 / variance
    mean = float(np.sum(weight * e) / np.sum(weight))
    statistic = float(np.sum(weight * (e - mean) ** 2))
    dof = len(e) - 1
    return statistic, dof, float(chi2.sf(statistic, dof))


def fit_grid(
    store: Store,
    grid: str,
    *,
    loss: str = "squared",
    resamples: int = 200,
    level: float = 0.90,
    seed: int = 0,
    n_column: str = N_COLUMN,
    holdout_llms: Collection[str] = (),
) -> tuple[list[dict], list[str]]:
    """Fit and write the grid's laws, one per (task_family, compressor, form), each with
    percentile-bootstrap CIs (`resamples`, `level`, `seed`, refitted with `loss`) and the
    leave-largest-LLM-out holdout error, N taken from the results column `n_column`
    (`llm_params`, the paper's N, or `llm_params_non_embedding`). Writes the laws'
    bootstrap draws to `Store.draws_key(grid)` first, then the laws to
    `Store.laws_key(grid)` (the object the Serve app watches), each in one write, both
    stamped with the same `fitted_at`. Returns (law rows, messages about laws not fitted).

    `holdout_llms` (the grid's `llms[].holdout`) are left out of every fit; each law's
    prediction for their points, with its bootstrap interval, is written beside the laws
    against what they scored (`Store.heldout_key`, the `heldout` SQL view)."""
    if loss not in LOSSES:
        raise FitError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
    results = store.read_results(grid)
    if results.num_rows == 0:
        raise FitError(f"grid {grid!r} has no results in {store.uri}: run it first")
    check_n_column(results, n_column)
    held = pc.is_in(results["llm"], value_set=pa.array(sorted(holdout_llms), pa.string()))
    heldout_points = heldout_table(results.filter(held), n_column)
    results = results.filter(pc.invert(held))
    if results.num_rows == 0:
        raise FitError(f"every LLM with results in grid {grid!r} is held out ({', '.join(sorted(holdout_llms))}): none left to fit")
    rows, draws, skipped, heldout = [], [], [], []
    now = datetime.now(timezone.utc)
    points = law_points(results, n_column)
    noise = eval_noise(results, n_column, points)
    for (family, compressor), (n, v, e) in sorted(points.items()):
        flat = flatness(e, noise.get((family, compressor)))
        for form in FORMS:
            try:
                law = replace(fit_law(n, v, e, form, loss=loss), llm_params_column=n_column)
            except FitError as err:
                skipped.append(f"{family}/{compressor}/{form}: {err}")
                continue
            ci = bootstrap_law(n, v, e, form, law=law, resamples=resamples, level=level, seed=seed, loss=loss)
            holdout = holdout_error(n, v, e, form, loss=loss)
            rows.append(law_row(grid, family, compressor, law, n, v, now, ci=ci, holdout=holdout, e=e, flat=flat))
            draws.extend(draw_rows(grid, family, compressor, ci, now))
            for llm, n_held, v_held, observed in heldout_points.get((family, compressor), []):
                low, high = ci.error_interval(np.array([n_held]), np.array([v_held]))
                heldout.append({
                    "grid": grid, "task_family": family, "compressor": compressor, "form": form, "llm": llm,
                    "llm_params": int(n_held), "visual_tokens": int(v_held), "observed_error": observed,
                    "predicted_error": float(law.predict(np.array([n_held]), np.array([v_held]))[0]),
                    "predicted_lo": float(low[0]), "predicted_hi": float(high[0]), "fitted_at": now,
                })
    mark_preferred(rows)
    if rows:
        store.write_draws(grid, draws)
        if heldout or store.exists(store.heldout_key(grid)):  # a refit without holdouts clears the old ones
            store.write_heldout(grid, heldout)
        store.write_laws(grid, rows)
    return rows, skipped


def exponents_identified(row: dict) -> bool:
    """Whether a law row's exponents are identified by its points: neither alpha nor beta at a
    bound of the fit nor with a CI spanning the box (D at a bound alone leaves them readable)."""
    return not any(name in row["identification"] for name in ("alpha", "beta"))


def is_flat(row: dict) -> bool:
    """Whether a law row's points are flat (`flatness`), as its `identification` records it."""
    return any(note.startswith("flat: ") for note in row["identification"].split("; "))


def mark_preferred(rows: list[dict]) -> None:
    """Per (task_family, compressor), `preferred` on the form that fits better: one whose
    exponents are identified over one whose are not (an exponent at its bound of 3 ranks the
    configs by an artifact of the fit), then the lower leave-largest-LLM-out holdout error
    (a law that extrapolates in N is the point), then the higher r2."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task_family"], row["compressor"]), []).append(row)
    for group in groups.values():
        def rank(row: dict) -> tuple[bool, float, float]:
            holdout = row["holdout_error"]
            return (not exponents_identified(row), holdout if np.isfinite(holdout) else np.inf, -row["r2"])

        best = min(group, key=rank)
        for row in group:
            row["preferred"] = row is best


def identification(law: Law, ci: LawCI | None, e: np.ndarray, flat: tuple[float, int, float] | None = None) -> str:
    """Why the law's parameters are not identified by the data ("" when they are): an
    exponent or D at a bound of the fit (0 or EXPONENT_MAX; D at 0 or at the smallest
    error), an exponent whose bootstrap CI spans nearly the whole [0, EXPONENT_MAX] box,
    or points that are flat (`flatness`: p >= FLAT_P), whatever the exponents came out as."""
    notes = []
    for name, value in (("alpha", law.alpha), ("beta", law.beta)):
        if value <= 1e-6:
            notes.append(f"{name} at its bound 0")
        elif value >= EXPONENT_MAX - 1e-6:
            notes.append(f"{name} at its bound {EXPONENT_MAX:g}")
    if law.D <= 1e-9:
        notes.append("D at its bound 0")
    elif law.D >= float(np.min(e)) * (1 - 1e-6):
        notes.append("D at its bound (the smallest error)")
    if ci is not None:
        for name, (low, high) in (("alpha", ci.alpha), ("beta", ci.beta)):
            if high - low >= 0.9 * EXPONENT_MAX:
                notes.append(f"{name}'s CI [{low:.2g}, {high:.2g}] spans the whole box")
    if flat is not None and flat[2] >= FLAT_P:
        statistic, dof, p = flat
        notes.append(
            f"flat: the error varies no more than its eval noise (chi2 {statistic:.1f} on {dof} dof, p = {p:.2f}), "
            "so neither alpha nor beta is identified"
        )
    return "; ".join(notes)


def heldout_table(results: pa.Table, n_column: str = N_COLUMN) -> dict[tuple[str, str], list[tuple[str, float, float, float]]]:
    """(task_family, compressor) -> [(llm, N, V, mean error)] of held-out LLMs' results,
    averaged as `law_points` averages (over a family's benchmarks and the seeds)."""
    out: dict[tuple[str, str], list[tuple[str, float, float, float]]] = {}
    if results.num_rows == 0:
        return out
    grouped = results.group_by(["task_family", "compressor", "llm", n_column, "visual_tokens"], use_threads=False).aggregate(
        [("error", "mean")]
    ).sort_by([("task_family", "ascending"), ("compressor", "ascending"), (n_column, "ascending"), ("visual_tokens", "ascending")])
    for row in grouped.to_pylist():
        out.setdefault((row["task_family"], row["compressor"]), []).append(
            (row["llm"], float(row[n_column]), float(row["visual_tokens"]), float(row["error_mean"]))
        )
    return out


def draw_rows(grid: str, family: str, compressor: str, ci: LawCI, fitted_at: datetime) -> list[dict]:
    """A law's bootstrap draws as draws-parquet rows (DRAW_SCHEMA), one per resample."""
    d = ci.draws
    return [
        {
            "grid": grid, "task_family": family, "compressor": compressor, "form": d.form, "draw": i,
            "A": float(d.A[i]), "B": float(d.B[i]) if d.form == "sum" else None, "alpha": float(d.alpha[i]),
            "beta": float(d.beta[i]), "D": float(d.D[i]), "fitted_at": fitted_at,
        }
        for i in range(len(d))
    ]


def law_row(
    grid: str,
    family: str,
    compressor: str,
    law: Law,
    n: np.ndarray,
    v: np.ndarray,
    fitted_at: datetime,
    *,
    ci: LawCI | None = None,
    holdout: float = float("nan"),
    e: np.ndarray | None = None,
    flat: tuple[float, int, float] | None = None,
) -> dict:
    """One laws-parquet row (LAW_SCHEMA); `flat` is the points' `flatness`."""
    nan = float("nan")
    intervals = ci.to_dict() if ci is not None else {
        "ci_level": nan, "alpha_lo": nan, "alpha_hi": nan, "beta_lo": nan, "beta_hi": nan,
        "D_lo": nan, "D_hi": nan, "ratio_lo": nan, "ratio_hi": nan, "ci_resamples": 0, "ci_seed": None,
    }
    return {
        "grid": grid,
        "task_family": family,
        "compressor": compressor,
        "form": law.form,
        "A": law.A,
        "B": law.B,
        "alpha": law.alpha,
        "beta": law.beta,
        "D": law.D,
        "sse": law.sse,
        "r2": law.r2,
        "n_points": law.n_points,
        "alpha_lo": intervals["alpha_lo"],
        "alpha_hi": intervals["alpha_hi"],
        "beta_lo": intervals["beta_lo"],
        "beta_hi": intervals["beta_hi"],
        "holdout_error": float(holdout),
        "min_llm_params": int(n.min()),
        "max_llm_params": int(n.max()),
        "min_visual_tokens": int(v.min()),
        "max_visual_tokens": int(v.max()),
        "fitted_at": fitted_at,
        "D_lo": intervals["D_lo"],
        "D_hi": intervals["D_hi"],
        "ratio_lo": intervals["ratio_lo"],
        "ratio_hi": intervals["ratio_hi"],
        "ci_level": intervals["ci_level"],
        "ci_resamples": intervals["ci_resamples"],
        "ci_seed": intervals["ci_seed"],
        "loss": law.loss,
        "llm_params_column": law.llm_params_column,
        "identification": identification(law, ci, e, flat) if e is not None else "",
        "preferred": False,  # set over the group by mark_preferred
    }
