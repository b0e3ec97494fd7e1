"""Fit every (task_family, compressor, form) law of a grid from its results in the store."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tokenscale.store import Store

from .frontier import Candidate
from .law import FORMS, FitError, Law, LawCI, bootstrap_law, fit_law, holdout_error


def law_points(results: pa.Table) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(task_family, compressor) -> (N, V, E): error averaged over a family's benchmarks
    and over seeds, one point per (LLM, V), as the paper does."""
    # single-threaded and sorted: the points' order (and so the seeded bootstrap) is stable
    grouped = results.group_by(["task_family", "compressor", "llm_params", "visual_tokens"], use_threads=False).aggregate(
        [("error", "mean")]
    )
    grouped = grouped.sort_by([("llm_params", "ascending"), ("visual_tokens", "ascending")])
    points: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for key in {(f, c) for f, c in zip(grouped["task_family"].to_pylist(), grouped["compressor"].to_pylist(), strict=True)}:
        mask = pc.and_(pc.equal(grouped["task_family"], key[0]), pc.equal(grouped["compressor"], key[1]))
        part = grouped.filter(mask)
        points[key] = (
            part["llm_params"].to_numpy().astype(float),
            part["visual_tokens"].to_numpy().astype(float),
            part["error_mean"].to_numpy().astype(float),
        )
    return points


def candidates(results: pa.Table) -> list[Candidate]:
    rows = results.select(["llm", "llm_params", "visual_tokens", "compressor"]).to_pylist()
    return sorted({Candidate(**r) for r in rows}, key=lambda c: (c.llm_params, c.visual_tokens, c.compressor))


def fit_grid(
    store: Store,
    grid: str,
    *,
    loss: str = "squared",
    resamples: int = 200,
    level: float = 0.90,
    seed: int = 0,
) -> tuple[list[dict], list[str]]:
    """Fit and write the grid's laws, one per (task_family, compressor, form), each with
    percentile-bootstrap CIs (`resamples`, `level`, `seed`) and the leave-largest-LLM-out
    holdout error; returns (law rows, messages about laws not fitted)."""
    results = store.read_results(grid)
    if results.num_rows == 0:
        raise FitError(f"grid {grid!r} has no results in {store.uri}: run it first")
    rows, skipped = [], []
    now = datetime.now(timezone.utc)
    for (family, compressor), (n, v, e) in sorted(law_points(results).items()):
        for form in FORMS:
            try:
                law = fit_law(n, v, e, form, loss=loss)
            except FitError as err:
                skipped.append(f"{family}/{compressor}/{form}: {err}")
                continue
            ci = bootstrap_law(n, v, e, form, law=law, resamples=resamples, level=level, seed=seed, loss=loss)
            holdout = holdout_error(n, v, e, form, loss=loss)
            rows.append(law_row(grid, family, compressor, law, n, v, now, ci=ci, holdout=holdout))
    if rows:
        store.write_laws(grid, rows)
    return rows, skipped


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
) -> dict:
    """One laws-parquet row. Keys beyond LAW_SCHEMA (D and alpha/beta CIs, the CI level,
    the loss) ride along for JSON output; pyarrow drops them when the row is written."""
    nan = float("nan")
    intervals = ci.to_dict() if ci is not None else {
        "ci_level": nan, "alpha_lo": nan, "alpha_hi": nan, "beta_lo": nan, "beta_hi": nan,
        "D_lo": nan, "D_hi": nan, "ratio_lo": nan, "ratio_hi": nan,
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
        "loss": law.loss,
    }


def laws_from_table(table: pa.Table) -> list[tuple[dict, Law]]:
    """Law rows read back from the store, each with its `Law`."""
    out = []
    for row in table.to_pylist():
        law = Law(row["form"], A=row["A"], alpha=row["alpha"], beta=row["beta"], D=row["D"], B=row["B"],
                  sse=row["sse"], r2=row["r2"], n_points=row["n_points"], loss=row.get("loss") or "squared")
        out.append((row, law))
    return out
