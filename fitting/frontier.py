"""The compute-optimal choice: for a FLOP budget and query length, which grid candidate
(LLM, visual tokens, compressor) has the lowest predicted error, and the continuous
optimum V* (and N*) of a law at a budget.

Every cost is `tokenscale.costs.inference_flops`, priced with the candidate's own
compressor (a query-conditioned one, QueCC, pays 2·N·Q more). numpy only, like `law`: the
Serve app answers with these functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tokenscale.costs import inference_flops, llm_params_within

from .law import Draws, FitError, Law


@dataclass(frozen=True)
class Candidate:
    llm: str
    llm_params: int  # N: what inference pays for (declared, else counted total)
    visual_tokens: int
    compressor: str
    llm_params_non_embedding: int | None = None  # None in stores written before the column

    def flops(self, text_tokens: float, generated_tokens: float = 0.0) -> float:
        """Inference FLOPs per query (`tokenscale.costs.inference_flops` with this
        candidate's compressor)."""
        return float(inference_flops(self.llm_params, text_tokens, self.visual_tokens, generated_tokens,
                                     compressor=self.compressor))

    def law_params(self, law: Law) -> float:
        """This candidate's N as `law` reads it (the column it was fitted on); NaN when the
        results did not record that column."""
        n = getattr(self, law.llm_params_column, None)
        return float(n) if n is not None else math.nan


def candidates(results) -> list[Candidate]:
    """The distinct (LLM, V, compressor) of a results table (pyarrow), sorted by N, V, name."""
    rows = results.select(["llm", "llm_params", "visual_tokens", "compressor", "llm_params_non_embedding"]).to_pylist()
    return sorted({Candidate(**r) for r in rows}, key=lambda c: (c.llm_params, c.visual_tokens, c.compressor))


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    predicted_error: float
    flops: float
    optimal_visual_tokens: float


class BudgetError(ValueError):
    """No candidate fits the budget."""


def candidate_costs(candidates: Sequence[Candidate], text_tokens: float, generated_tokens: float = 0.0) -> np.ndarray:
    """Each candidate's inference FLOPs per query, as an array (one `inference_flops` call
    per compressor)."""
    if isinstance(candidates, Menu):
        return candidates.costs(text_tokens, generated_tokens)
    return Menu.of({}, candidates).costs(text_tokens, generated_tokens)


def predicted_errors(laws: Mapping[str, Law], candidates: Sequence[Candidate]) -> np.ndarray:
    """Each candidate's error predicted by its compressor's law (inf where it cannot be
    predicted: no law, or no N of the law's column)."""
    out = np.full(len(candidates), np.inf)
    for compressor, law in laws.items():
        index = [i for i, c in enumerate(candidates) if c.compressor == compressor]
        if index:
            n = np.array([candidates[i].law_params(law) for i in index])
            v = np.array([candidates[i].visual_tokens for i in index], dtype=float)
            with np.errstate(all="ignore"):
                out[index] = law.predict(n, v)
    return np.where(np.isfinite(out), out, np.inf)


def draw_errors(draws: Mapping[str, Draws], laws: Mapping[str, Law], candidates: Sequence[Candidate]) -> np.ndarray:
    """(draws, candidates): each candidate's error under each joint bootstrap draw of its
    compressor's law. Draw i of every compressor's law are taken together; the count is
    the smallest number of draws among them (0 when a law has none)."""
    count = min((len(draws[c]) if draws.get(c) is not None else 0 for c in laws), default=0)
    out = np.full((count, len(candidates)), np.inf)
    if count == 0:
        return out
    for compressor, law in laws.items():
        index = [i for i, c in enumerate(candidates) if c.compressor == compressor]
        if index:
            n = np.array([candidates[i].law_params(law) for i in index])
            v = np.array([candidates[i].visual_tokens for i in index], dtype=float)
            out[:, index] = draws[compressor].head(count).predict(n, v)
    return np.where(np.isfinite(out), out, np.inf)


@dataclass(frozen=True, eq=False)
class Menu(Sequence):
    """The candidates that have a law in `laws`, priced and predicted once, as arrays: what
    `choose` and `frontier` work from. They build one per call from a list of candidates;
    a caller answering many budgets over the same laws (the Serve app) builds it once and
    passes it in place of the list."""

    laws: Mapping[str, Law]
    candidates: tuple[Candidate, ...]
    errors: np.ndarray  # predicted by each candidate's compressor's law; inf: cannot be predicted
    groups: tuple[tuple[str, np.ndarray, np.ndarray, np.ndarray], ...]  # (compressor, index, N, V)

    @classmethod
    def of(cls, laws: Mapping[str, Law], candidates: Sequence[Candidate]) -> Menu:
        """`laws` empty: every candidate, unpredicted (for pricing alone)."""
        usable = tuple(c for c in candidates if not laws or c.compressor in laws)
        groups = []
        for compressor in sorted({c.compressor for c in usable}):
            index = np.array([i for i, c in enumerate(usable) if c.compressor == compressor])
            groups.append((compressor, index, np.array([usable[i].llm_params for i in index], dtype=float),
                           np.array([usable[i].visual_tokens for i in index], dtype=float)))
        errors = predicted_errors(laws, usable) if laws else np.full(len(usable), np.inf)
        return cls(laws, usable, errors, tuple(groups))

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i):
        return self.candidates[i]

    def costs(self, text_tokens: float, generated_tokens: float = 0.0) -> np.ndarray:
        """Each candidate's inference FLOPs per query (`inference_flops`, its compressor's)."""
        out = np.empty(len(self.candidates))
        for compressor, index, n, v in self.groups:
            out[index] = inference_flops(n, text_tokens, v, generated_tokens, compressor=compressor)
        return out

    def token_range(self) -> tuple[int, int]:
        tokens = [c.visual_tokens for c in self.candidates] or [1]
        return min(tokens), max(tokens)


def _menu(laws: Mapping[str, Law], candidates: Sequence[Candidate]) -> Menu:
    if isinstance(candidates, Menu) and (candidates.laws is laws or candidates.laws == laws):
        return candidates
    return Menu.of(laws, candidates.candidates if isinstance(candidates, Menu) else candidates)


def pick(errors: np.ndarray, costs: np.ndarray, flops: float) -> np.ndarray:
    """The choice rule: per row of `errors` ((rows, candidates)), the index of the lowest
    error among the candidates costing at most `flops`, ties to the cheaper (then to the
    earlier candidate); -1 for a row where none fits (or none can be predicted)."""
    errors = np.atleast_2d(errors)
    order = np.argsort(costs, kind="stable")
    masked = np.where(costs[order] <= flops, errors[:, order], np.inf)
    best = np.argmin(masked, axis=1)  # the first minimum: the cheapest among equal errors
    found = np.isfinite(masked[np.arange(len(masked)), best])
    return np.where(found, order[best], -1)


def choose(
    laws: Mapping[str, Law],
    candidates: Sequence[Candidate],
    flops: float,
    text_tokens: float,
    generated_tokens: float = 0.0,
) -> Choice:
    """Best candidate within `flops`, judged by the law of its compressor (`laws` maps
    compressor -> law for one task family). Ties go to the cheaper candidate.
    `candidates`: a list, or a `Menu` of them built once for these laws."""
    menu = _menu(laws, candidates)
    if not menu.candidates:
        raise BudgetError("no candidate has a fitted law")
    costs = menu.costs(text_tokens, generated_tokens)
    if not (costs <= flops).any():
        raise BudgetError(
            f"flops={flops:.3g} is below the cheapest candidate's cost ({costs.min():.3g} FLOPs "
            f"at text_tokens={text_tokens:g}); give at least that"
        )
    i = int(pick(menu.errors, costs, flops)[0])
    if i < 0:
        raise BudgetError(f"no candidate within flops={flops:.3g} has a predictable error")
    best = menu.candidates[i]
    v_min, v_max = menu.token_range()
    v_star = optimal_visual_tokens(laws[best.compressor], text_tokens, v_min, v_max, flops=flops,
                                   generated_tokens=generated_tokens, compressor=best.compressor)
    return Choice(best, float(menu.errors[i]), float(costs[i]), v_star)


def choice_shares(errors: np.ndarray, costs: np.ndarray, flops: float) -> np.ndarray:
    """Per candidate, the share of the rows of `errors` ((draws, candidates): e.g.
    `draw_errors`) in which `choose`'s rule picks it within `flops`: how often the choice
    holds up under the laws' uncertainty. NaN without rows."""
    if len(errors) == 0:
        return np.full(errors.shape[1], np.nan)
    picked = pick(errors, costs, flops)
    return np.bincount(picked[picked >= 0], minlength=errors.shape[1]) / len(errors)


def frontier(
    laws: Mapping[str, Law], candidates: Sequence[Candidate], text_tokens: float, generated_tokens: float = 0.0
) -> list[Choice]:
    """The Pareto frontier over the candidates (a list, or a `Menu` of them for these
    laws): each point is cheaper than every point with a lower predicted error. Sorted by
    cost."""
    menu = _menu(laws, candidates)
    costs = menu.costs(text_tokens, generated_tokens)
    points, best_error = [], np.inf
    v_min, v_max = menu.token_range()
    for i in np.lexsort((menu.errors, costs)):
        cand, cost, error = menu.candidates[i], float(costs[i]), float(menu.errors[i])
        if error < best_error:
            best_error = error
            v_star = optimal_visual_tokens(laws[cand.compressor], text_tokens, v_min, v_max, flops=cost,
                                           generated_tokens=generated_tokens, compressor=cand.compressor)
            points.append(Choice(cand, error, cost, v_star))
    return points


# ---- the continuous optimum ------------------------------------------------------------------


def fixed_tokens(text_tokens: float, generated_tokens: float = 0.0, compressor: str | None = None) -> float:
    """The tokens a query pays for besides V: its cost is 2·N·(fixed_tokens + V)
    (`inference_flops` is linear in V with slope 2·N)."""
    return float(inference_flops(1.0, text_tokens, 0.0, generated_tokens, compressor=compressor)) / 2.0


def optimal_visual_tokens(
    law: Law,
    text_tokens: float,
    v_min: float,
    v_max: float,
    flops: float | None = None,
    *,
    generated_tokens: float = 0.0,
    compressor: str | None = None,
) -> float:
    """The continuous compute-optimal V at fixed inference FLOPs C = 2 N (q + V), with q =
    `fixed_tokens(text_tokens, generated_tokens, compressor)` (Q + G, plus Q again for a
    query-conditioned compressor), clamped to [v_min, v_max].

    Product form: minimizing A N^-a V^-b with N = C / (2 (q + V)) gives
    d/dV [a log(q+V) - b log V] = 0, i.e. V* = b q / (a - b), independent of C; if b >= a
    more tokens always pay, so V* = v_max. Sum form: the optimum depends on C (`flops`,
    required); E(V) = A (C/2)^-a (q+V)^a + B V^-b + D, whose derivative has the sign of
    log(a A (C/2)^-a) + (a-1) log(q+V) + (b+1) log V - log(b B), strictly increasing in V
    (its V-derivative is ((a+b) V + (b+1) q) / (V (q+V)) > 0): one sign change, found by
    bisection in log V to machine precision."""
    q = fixed_tokens(text_tokens, generated_tokens, compressor)
    if law.form == "product":
        if law.beta >= law.alpha:
            return float(v_max)
        return float(np.clip(law.beta * q / (law.alpha - law.beta), v_min, v_max))
    if flops is None:
        raise FitError("the sum form's optimal V depends on the FLOP budget: pass flops")
    if v_max <= v_min:
        return float(v_min)
    a, b, big_a, big_b = float(law.alpha), float(law.beta), float(law.A), float(law.B)
    if b <= 0 or big_b <= 0:
        return float(v_min)  # tokens buy nothing: the fewest leave the most N
    if a <= 0 or big_a <= 0:
        return float(v_max)  # N buys nothing: spend it all on tokens
    constant = math.log(a * big_a) - a * math.log(flops / 2.0) - math.log(b * big_b)

    def slope_sign(log_v: float) -> float:
        return constant + (a - 1.0) * math.log(q + math.exp(log_v)) + (b + 1.0) * log_v

    lo, hi = math.log(v_min), math.log(v_max)
    if slope_sign(lo) >= 0:
        return float(v_min)
    if slope_sign(hi) <= 0:
        return float(v_max)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if slope_sign(mid) < 0:
            lo = mid
        else:
            hi = mid
    return float(min(max(math.exp(0.5 * (lo + hi)), v_min), v_max))


def optimal_curve(
    law: Law,
    text_tokens: float,
    flops,
    v_min: float,
    v_max: float,
    n_min: float | None = None,
    n_max: float | None = None,
    generated_tokens: float = 0.0,
    compressor: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The continuous compute-optimal frontier of one law: for each budget C in `flops`,
    the (N*, V*, E*) minimizing E(N, V) subject to inference_flops(N, Q, V, G, compressor)
    = C, V in [v_min, v_max] and, when given, N in [n_min, n_max]. Without N bounds V* is
    `optimal_visual_tokens` (exact); with them the feasible V range shrinks and V* is found
    on a 2048-point log grid of it (a curve for plots). Budgets with no feasible (N, V)
    give NaN."""
    c = np.atleast_1d(np.asarray(flops, dtype=float))
    out_v = np.full(c.shape, np.nan)
    if n_min is None and n_max is None:
        for i, budget in enumerate(c):
            out_v[i] = optimal_visual_tokens(law, text_tokens, v_min, v_max, flops=budget,
                                             generated_tokens=generated_tokens, compressor=compressor)
    else:
        lo_n = n_min if n_min is not None else 0.0
        hi_n = n_max if n_max is not None else np.inf
        grid = np.geomspace(v_min, v_max, 2048)
        n = llm_params_within(c[:, None], text_tokens, grid[None, :], generated_tokens, compressor)  # (budgets, V)
        feasible = (n >= lo_n) & (n <= hi_n)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            err = np.where(feasible, law.predict(n, grid[None, :]), np.inf)
        best = np.argmin(err, axis=1)
        ok = np.isfinite(err[np.arange(len(c)), best])
        out_v[ok] = grid[best[ok]]
    out_n = llm_params_within(c, text_tokens, out_v, generated_tokens, compressor)
    return out_n, out_v, np.asarray(law.predict(out_n, out_v), dtype=float)
