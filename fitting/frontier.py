"""The compute-optimal choice: for a FLOP budget and query length, which grid candidate
(LLM, visual tokens, compressor) has the lowest predicted error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .law import Law, optimal_visual_tokens


@dataclass(frozen=True)
class Candidate:
    llm: str
    llm_params: int
    visual_tokens: int
    compressor: str

    def flops(self, text_tokens: float, generated_tokens: float = 0.0) -> float:
        """Inference FLOPs of the LLM per query: 2 N (Q + V + G)."""
        return 2.0 * self.llm_params * (text_tokens + self.visual_tokens + generated_tokens)


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    predicted_error: float
    flops: float
    optimal_visual_tokens: float


class BudgetError(ValueError):
    """No candidate fits the budget."""


def choose(
    laws: dict[str, Law],
    candidates: list[Candidate],
    flops: float,
    text_tokens: float,
    generated_tokens: float = 0.0,
) -> Choice:
    """Best candidate within `flops`, judged by the law of its compressor (`laws` maps
    compressor -> law for one task family). Ties go to the cheaper candidate."""
    usable = [c for c in candidates if c.compressor in laws]
    if not usable:
        raise BudgetError("no candidate has a fitted law")
    costs = np.array([c.flops(text_tokens, generated_tokens) for c in usable])
    fits = costs <= flops
    if not fits.any():
        raise BudgetError(
            f"flops={flops:.3g} is below the cheapest candidate's cost ({costs.min():.3g} FLOPs "
            f"at text_tokens={text_tokens:g}); give at least that"
        )
    errors = np.array([float(laws[c.compressor].predict(c.llm_params, c.visual_tokens)) for c in usable])
    order = np.lexsort((costs, np.where(fits, errors, np.inf)))
    best = usable[order[0]]
    law = laws[best.compressor]
    tokens = [c.visual_tokens for c in usable]
    v_star = optimal_visual_tokens(law, text_tokens, min(tokens), max(tokens), flops=flops, generated_tokens=generated_tokens)
    return Choice(best, float(errors[order[0]]), float(costs[order[0]]), v_star)


def frontier(
    laws: dict[str, Law], candidates: list[Candidate], text_tokens: float, generated_tokens: float = 0.0
) -> list[Choice]:
    """The Pareto frontier over the candidates: each point is cheaper than every point with
    a lower predicted error. Sorted by cost."""
    usable = [c for c in candidates if c.compressor in laws]
    scored = sorted(
        (
            (c.flops(text_tokens, generated_tokens), float(laws[c.compressor].predict(c.llm_params, c.visual_tokens)), c)
            for c in usable
        ),
        key=lambda t: (t[0], t[1]),
    )
    points, best_error = [], np.inf
    tokens = [c.visual_tokens for c in usable] or [1]
    for cost, error, cand in scored:
        if error < best_error:
            best_error = error
            v_star = optimal_visual_tokens(
                laws[cand.compressor], text_tokens, min(tokens), max(tokens), flops=cost, generated_tokens=generated_tokens
            )
            points.append(Choice(cand, error, cost, v_star))
    return points


def optimal_curve(
    law: Law,
    text_tokens: float,
    flops,
    v_min: float,
    v_max: float,
    n_min: float | None = None,
    n_max: float | None = None,
    generated_tokens: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The continuous compute-optimal frontier of one law: for each budget C in `flops`,
    the (N*, V*, E*) minimizing E(N, V) subject to 2 N (Q + G + V) = C, V in [v_min, v_max]
    and, when given, N in [n_min, n_max]. Without N bounds V* is `optimal_visual_tokens`
    (exact); with them the feasible V range shrinks and V* is found on a 2048-point log grid
    of it (a curve for plots). Budgets with no feasible (N, V) give NaN."""
    c = np.atleast_1d(np.asarray(flops, dtype=float))
    q = text_tokens + generated_tokens
    out_v = np.full(c.shape, np.nan)
    if n_min is None and n_max is None:
        for i, budget in enumerate(c):
            out_v[i] = optimal_visual_tokens(law, text_tokens, v_min, v_max, flops=budget, generated_tokens=generated_tokens)
    else:
        lo_n = n_min if n_min is not None else 0.0
        hi_n = n_max if n_max is not None else np.inf
        grid = np.geomspace(v_min, v_max, 2048)
        n = c[:, None] / (2.0 * (q + grid[None, :]))  # (budgets, V)
        feasible = (n >= lo_n) & (n <= hi_n)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            err = np.where(feasible, law.predict(n, grid[None, :]), np.inf)
        best = np.argmin(err, axis=1)
        ok = np.isfinite(err[np.arange(len(c)), best])
        out_v[ok] = grid[best[ok]]
    out_n = c / (2.0 * (q + out_v))
    return out_n, out_v, np.asarray(law.predict(out_n, out_v), dtype=float)
