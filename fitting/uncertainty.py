"""How uncertain a fitted law is: bootstrap draws and intervals, and a holdout check.

- `bootstrap_law`: percentile bootstrap of a law, every resample refitted with the law's
  own loss (squared or Huber) from a seed; its `LawCI` carries the intervals and the
  resampled fits themselves (`LawCI.draws`, a `law.Draws`), which `fit_grid` stores so the
  Serve app can compute prediction intervals without refitting.
- `holdout_error`: leave the largest LLM out, fit the rest, report the error on it.

Bootstrap resamples are refitted with the solver's profile machinery, vectorized over
resamples (count-weighted Gram matrices), so 200 resamples take well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .law import LOSSES, Draws, FitError, Law, n_parameters, percentile_interval
from .solve import (
    EXPONENT_MAX,
    Problem,
    box_lstsq,
    check_points,
    default_f_scale,
    descend,
    exponent_grid,
    fit_law,
    fit_problem,
    polish,
    weighted_profile,
)

BOOTSTRAP_GRID_SIZE = 13  # the cheap path used for each bootstrap resample


@dataclass(frozen=True)
class LawCI:
    """Percentile bootstrap intervals of a law (points resampled with replacement), and the
    resampled fits themselves (`draws`, the law's own parameters per resample)."""

    form: str
    level: float
    resamples: int
    failed: int  # resamples redrawn because they could not determine the law
    alpha: tuple[float, float]
    beta: tuple[float, float]
    D: tuple[float, float]
    ratio: tuple[float, float]  # alpha / beta
    draws: Draws = field(repr=False, compare=False)
    seed: int = 0
    loss: str = "squared"

    def error_interval(self, llm_params, visual_tokens) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): the percentile interval of the predicted error at each (N, V)."""
        return self.draws.error_interval(llm_params, visual_tokens, self.level)

    def to_dict(self) -> dict:
        return {
            "ci_level": self.level,
            "alpha_lo": self.alpha[0], "alpha_hi": self.alpha[1],
            "beta_lo": self.beta[0], "beta_hi": self.beta[1],
            "D_lo": self.D[0], "D_hi": self.D[1],
            "ratio_lo": self.ratio[0], "ratio_hi": self.ratio[1],
            "ci_resamples": self.resamples, "ci_seed": self.seed,
        }


def _bootstrap_fits(problem: Problem, draws: np.ndarray, size: int, warm: np.ndarray, iterations: int = 60) -> np.ndarray:
    """Squared-loss fits of all resamples at once, with no per-resample optimizer call.

    A resample is the full point set weighted by how often each point was drawn, so its
    normal equations are count-weighted Gram matrices. Each resample starts from the better
    of its best cell on a size x size exponent grid and the full-data fit's exponents
    (`warm`), then `descend` minimizes the profiled SSE over the exponents, the
    amplitudes being solved exactly at every trial point."""
    R = len(draws)
    points = len(problem.e)
    counts = np.stack([np.bincount(d, minlength=points) for d in draws]).astype(float)  # (R, P)
    drawn_min = np.where(counts > 0, problem.e, np.inf).min(axis=1)
    d_max = np.maximum(drawn_min - 1e-9, 0.0)
    ia, ib = problem.exponent_index
    g = exponent_grid(size)
    ga, gb = (np.append(x.ravel(), w) for x, w in zip(np.meshgrid(g, g, indexing="ij"), (warm[ia], warm[ib]), strict=True))
    # the start cells are shared by all resamples: their features are computed once and
    # the count-weighted Gram matrices of all (cell, resample) pairs come from one matmul
    F = problem.features(ga, gb)  # (cells, P, k)
    cells, _, k = F.shape
    G = np.matmul(counts, (F[..., :, None] * F[..., None, :]).reshape(cells, points, k * k)).reshape(cells, R, k, k)
    b = np.matmul(counts, F * problem.e[None, :, None])  # (cells, R, k)
    _, sse = box_lstsq(G, b, (counts @ problem.e**2)[None, :], d_max[None, :])
    best = np.argmin(sse, axis=0)
    a, b = descend(problem, counts, d_max, ga[best], gb[best], EXPONENT_MAX / (size - 1), iterations)
    coef, _ = weighted_profile(problem, counts, a[:, None], b[:, None], d_max)
    return problem.full_params(a, b, coef[:, 0])


def _identifiable(n_idx: np.ndarray, ln: np.ndarray, lv: np.ndarray, k: int) -> bool:
    ln, lv = ln[n_idx], lv[n_idx]
    if len(np.unique(ln)) < 2 or len(np.unique(lv)) < 2:
        return False
    return len(np.unique(np.stack([ln, lv]), axis=1).T) >= k


def bootstrap_law(
    llm_params,
    visual_tokens,
    error,
    form: str = "product",
    *,
    law: Law | None = None,
    resamples: int = 200,
    level: float = 0.90,
    seed: int = 0,
    loss: str = "squared",
    f_scale: float | None = None,
    grid_size: int = BOOTSTRAP_GRID_SIZE,
) -> LawCI:
    """Percentile bootstrap: resample the points with replacement (`seed`ed), refit each
    resample by the cheap vectorized path (`_bootstrap_fits`: a `grid_size`^2 exponent grid
    and the exponents of `law`, the full-data fit (fitted here when not given), as starts,
    then a compass search on the profiled SSE), and take the
    ((1 - level)/2, (1 + level)/2) percentiles. Resamples that cannot determine the law
    (one LLM size, one V, or fewer distinct points than parameters) are redrawn.

    With `loss="huber"` every resample is refitted with Huber's loss (the full-data fit's
    threshold), so the draws are the robust estimator's. `LawCI.draws` holds the resampled
    fits in the law's own parameters: `fit_grid` stores them beside the law. Fewer than
    resamples // 2 usable resamples give NaN intervals and no draws."""
    if not 0 < level < 1:
        raise FitError(f"level {level}: a confidence level in (0, 1), e.g. 0.9")
    if loss not in LOSSES:
        raise FitError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
    n, v, e = check_points(llm_params, visual_tokens, error, form)
    problem = Problem.from_points(n, v, e, form)
    if law is None:
        law = fit_law(n, v, e, form, loss=loss, f_scale=f_scale)
    warm = problem.from_law(law)
    if loss == "huber" and f_scale is None:
        # the threshold is part of the estimator: keep the full-data one for every resample
        f_scale = default_f_scale(problem, fit_problem(problem)[0])
    k = n_parameters(form)
    rng = np.random.default_rng(seed)
    draws, failed = [], 0
    while len(draws) < resamples and failed < 20 * resamples:
        index = rng.integers(0, len(e), len(e))
        if _identifiable(index, problem.ln, problem.lv, k):
            draws.append(index)
        else:
            failed += 1
    params = []
    if draws:
        params = list(_bootstrap_fits(problem, np.array(draws), grid_size, warm))
        if loss == "huber":
            # the robust objective has no exact profile: polish each resample separately
            params = [polish(problem.subset(d), p, "huber", f_scale, tol=1e-8) for d, p in zip(draws, params, strict=True)]
    samples = np.array(params).reshape(len(params), k)
    nan2 = (float("nan"), float("nan"))
    if len(params) < resamples // 2:
        return LawCI(form, level, 0, failed, nan2, nan2, nan2, nan2, problem.to_draws(samples[:0]), seed, loss)
    ia, ib = problem.exponent_index
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(samples[:, ib] > 0, samples[:, ia] / samples[:, ib], np.inf)
    columns = np.column_stack([samples[:, ia], samples[:, ib], samples[:, -1], ratio])
    lo, hi = percentile_interval(columns, level)
    pairs = [(float(a), float(b)) for a, b in zip(lo, hi, strict=True)]
    return LawCI(form, level, len(params), failed, *pairs, draws=problem.to_draws(samples), seed=seed, loss=loss)


def holdout_error(llm_params, visual_tokens, error, form: str = "product", *, loss: str = "squared") -> float:
    """Extrapolation check: fit without the largest LLM and return the mean absolute error
    of the predicted vs observed error over that LLM's points. NaN when there are fewer
    than 3 LLM sizes, or the rest cannot determine the law."""
    n, v, e = check_points(llm_params, visual_tokens, error, form)
    if len(np.unique(n)) < 3:
        return float("nan")
    held = n == n.max()
    try:
        law = fit_law(n[~held], v[~held], e[~held], form, loss=loss)
    except FitError:
        return float("nan")
    return float(np.mean(np.abs(law.predict(n[held], v[held]) - e[held])))
