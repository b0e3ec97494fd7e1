"""The least-squares fit of a scaling law (`fit_law`): the solver.

Bounds: A, B >= 0; 0 <= alpha, beta <= EXPONENT_MAX (3: a power law steeper than N^-3 is
far outside anything seen for LLM or token scaling, and the bound keeps the search space
compact so a grid can cover it); 0 <= D < min(error) (the irreducible error cannot exceed
an observed error).

How the fit finds the global optimum: for fixed exponents (alpha, beta) the model is linear
in the amplitudes and D, so the best amplitudes are a 2- or 3-variable box-constrained
linear least-squares problem. That problem is solved exactly for every cell of a coarse
(alpha, beta) grid at once (numpy, vectorized) by enumerating its active sets, which gives
the profile of the squared error over the exponents (41 x 41 cells, quadratically spaced
so they are dense at small exponents). The best few local minima of that profile are
then polished two ways, keeping the best: scipy's bounded least squares over all
parameters (amplitudes then re-solved exactly at the polished exponents), and a
vectorized descent on the profile itself (`descend`). Everything is deterministic.

Huber (`loss="huber"`) starts from the squared-loss optimum and the grid minima; its
objective is not profiled, so that fit is a multi-start local one.

The profile machinery (`Problem`, `box_lstsq`, `weighted_profile`, `descend`) is shared
with the bootstrap in `uncertainty`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

from .law import LOSSES, Draws, FitError, Law, check_form, n_parameters

EXPONENT_MAX = 3.0
GRID_SIZE = 41  # coarse grid points per exponent for the full fit


def check_points(llm_params, visual_tokens, error, form: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The points as float arrays, or a FitError saying why they cannot determine a law."""
    check_form(form)
    n, v, e = (np.asarray(x, dtype=float).ravel() for x in (llm_params, visual_tokens, error))
    if not (len(n) == len(v) == len(e)):
        raise FitError("llm_params, visual_tokens and error must have the same length")
    for name, x in (("llm_params", n), ("visual_tokens", v), ("error", e)):
        if not np.all(np.isfinite(x)):
            raise FitError(f"{name}: contains NaN or infinite values")
    if np.any(n <= 0) or np.any(v <= 0):
        raise FitError("llm_params and visual_tokens must be positive")
    if np.any(e < 0) or np.any(e > 1):
        raise FitError("error must lie in [0, 1] (error = 1 - normalized score)")
    k = n_parameters(form)
    if len(e) <= k:
        raise FitError(f"{len(e)} points cannot determine the {form} form's {k} parameters: need more than {k}")
    if len(np.unique(n)) < 2:
        raise FitError("all points have one LLM size: alpha (the LLM-size exponent) is undetermined")
    if len(np.unique(v)) < 2:
        raise FitError("all points have one visual-token count: beta (the token exponent) is undetermined")
    distinct = len(np.unique(np.stack([n, v]), axis=1).T)
    if distinct < k:
        raise FitError(
            f"only {distinct} distinct (llm_params, visual_tokens) pairs: the {form} form's {k} "
            f"parameters need at least {k} (repeated seeds of one point add no information about the shape)"
        )
    return n, v, e


# ---- the scaled problem --------------------------------------------------------------------


@dataclass
class Problem:
    """Points with N and V divided by their geometric means, so the features N^-alpha and
    V^-beta stay O(1) over the whole exponent range and the amplitudes are well scaled."""

    form: str
    ln: np.ndarray
    lv: np.ndarray
    e: np.ndarray
    n_ref: float
    v_ref: float
    d_max: float = field(init=False)

    def __post_init__(self) -> None:
        # D < min(error); when some error is (almost) 0, D is pinned at 0
        self.d_max = max(float(self.e.min()) - 1e-9, 0.0)

    @classmethod
    def from_points(cls, n: np.ndarray, v: np.ndarray, e: np.ndarray, form: str) -> Problem:
        n_ref, v_ref = float(np.exp(np.log(n).mean())), float(np.exp(np.log(v).mean()))
        return cls(form, np.log(n / n_ref), np.log(v / v_ref), e, n_ref, v_ref)

    def subset(self, index: np.ndarray) -> Problem:
        # same reference scales: bootstrap warm starts stay comparable with the full fit
        return Problem(self.form, self.ln[index], self.lv[index], self.e[index], self.n_ref, self.v_ref)

    # parameter vectors in scaled space: product [a, alpha, beta, d]; sum [a, alpha, b, beta, d]
    @property
    def exponent_index(self) -> tuple[int, int]:
        return (1, 2) if self.form == "product" else (1, 3)

    def lower_upper(self) -> tuple[np.ndarray, np.ndarray]:
        if self.form == "product":
            return np.array([0.0, 0.0, 0.0, 0.0]), np.array([np.inf, EXPONENT_MAX, EXPONENT_MAX, self.d_max])
        return (np.zeros(5), np.array([np.inf, EXPONENT_MAX, np.inf, EXPONENT_MAX, self.d_max]))

    def model(self, p: np.ndarray, ln=None, lv=None) -> np.ndarray:
        ln = self.ln if ln is None else ln
        lv = self.lv if lv is None else lv
        if self.form == "product":
            return p[0] * np.exp(-p[1] * ln - p[2] * lv) + p[3]
        return p[0] * np.exp(-p[1] * ln) + p[2] * np.exp(-p[3] * lv) + p[4]

    def jacobian(self, p: np.ndarray) -> np.ndarray:
        if self.form == "product":
            x = np.exp(-p[1] * self.ln - p[2] * self.lv)
            return np.column_stack([x, -p[0] * self.ln * x, -p[0] * self.lv * x, np.ones_like(x)])
        xn, xv = np.exp(-p[1] * self.ln), np.exp(-p[3] * self.lv)
        return np.column_stack([xn, -p[0] * self.ln * xn, xv, -p[2] * self.lv * xv, np.ones_like(xn)])

    def sse(self, p: np.ndarray) -> float:
        return float(np.sum((self.model(p) - self.e) ** 2))

    def to_law(self, p: np.ndarray, loss: str) -> Law:
        sse = self.sse(p)
        total = float(np.sum((self.e - self.e.mean()) ** 2))
        r2 = 1 - sse / total if total > 0 else float("nan")
        common = {"sse": sse, "r2": r2, "n_points": len(self.e), "loss": loss}
        if self.form == "product":
            return Law("product", A=float(p[0] * self.n_ref ** p[1] * self.v_ref ** p[2]), alpha=float(p[1]),
                       beta=float(p[2]), D=float(p[3]), **common)
        return Law("sum", A=float(p[0] * self.n_ref ** p[1]), alpha=float(p[1]), B=float(p[2] * self.v_ref ** p[3]),
                   beta=float(p[3]), D=float(p[4]), **common)

    def to_draws(self, params: np.ndarray) -> Draws:
        """Scaled parameter vectors (resamples, 4 or 5) as the law's own parameters."""
        p = np.asarray(params, dtype=float).reshape(-1, n_parameters(self.form))
        if self.form == "product":
            return Draws.from_columns("product", p[:, 0] * self.n_ref ** p[:, 1] * self.v_ref ** p[:, 2],
                                      p[:, 1], p[:, 2], p[:, 3])
        return Draws.from_columns("sum", p[:, 0] * self.n_ref ** p[:, 1], p[:, 1], p[:, 3], p[:, 4],
                                  B=p[:, 2] * self.v_ref ** p[:, 3])

    def from_law(self, law: Law) -> np.ndarray:
        if law.form == "product":
            return np.array([law.A * self.n_ref ** -law.alpha * self.v_ref ** -law.beta, law.alpha, law.beta, law.D])
        return np.array([law.A * self.n_ref ** -law.alpha, law.alpha, law.B * self.v_ref ** -law.beta, law.beta, law.D])

    # ---- exact amplitudes for given exponents (vectorized over cells) ------------------
    def features(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """(cells, points, k): the linear model's columns, D's column (ones) last."""
        a, b = alpha[:, None], beta[:, None]
        ones = np.ones((len(alpha), len(self.e)))
        if self.form == "product":
            return np.stack([np.exp(-a * self.ln - b * self.lv), ones], axis=2)
        return np.stack([np.exp(-a * self.ln), np.exp(-b * self.lv), ones], axis=2)

    def amplitudes(self, alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each (alpha, beta) cell the exact bounded least-squares amplitudes and D,
        and the SSE there. Returns (coefficients (cells, k), sse (cells,))."""
        F = self.features(alpha, beta)
        G = np.einsum("cpi,cpj->cij", F, F)
        return box_lstsq(G, np.einsum("cpi,p->ci", F, self.e), np.asarray(float(self.e @ self.e)), self.d_max)

    def full_params(self, alpha: np.ndarray, beta: np.ndarray, coef: np.ndarray) -> np.ndarray:
        """Scaled parameter vectors (cells, 4 or 5) from exponents and linear coefficients."""
        if self.form == "product":
            return np.column_stack([coef[:, 0], alpha, beta, coef[:, 1]])
        return np.column_stack([coef[:, 0], alpha, coef[:, 1], beta, coef[:, 2]])


def _solve_small(M: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched solve of 1x1, 2x2 or 3x3 systems by Cramer's rule: for these sizes plain
    arithmetic on whole arrays is several times faster than LAPACK's batched solve.
    A singular system gives inf/nan, which the caller treats as infeasible."""
    k = M.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if k == 1:
            return rhs / M[..., 0]
        if k == 2:
            det = M[..., 0, 0] * M[..., 1, 1] - M[..., 0, 1] * M[..., 1, 0]
            x0 = (rhs[..., 0] * M[..., 1, 1] - M[..., 0, 1] * rhs[..., 1]) / det
            x1 = (M[..., 0, 0] * rhs[..., 1] - rhs[..., 0] * M[..., 1, 0]) / det
            return np.stack([x0, x1], axis=-1)
        # inverse = [r1 x r2, r2 x r0, r0 x r1] (as columns) / det, r_i the rows of M
        cof = np.stack([np.cross(M[..., 1, :], M[..., 2, :]), np.cross(M[..., 2, :], M[..., 0, :]),
                        np.cross(M[..., 0, :], M[..., 1, :])], axis=-1)
        det = np.einsum("...i,...i->...", M[..., 0, :], cof[..., :, 0])
        return np.einsum("...ij,...j->...i", cof, rhs) / det[..., None]


def box_lstsq(G: np.ndarray, b: np.ndarray, ee: np.ndarray, d_max) -> tuple[np.ndarray, np.ndarray]:
    """min ||F c - e||^2 over c with amplitudes c[:-1] >= 0 and 0 <= c[-1] <= d_max, for a
    batch of problems given by their Gram matrices G = F'F (..., k, k), b = F'e (..., k)
    and ee = e'e (...); k = 2 or 3, D's column last. `d_max` is a scalar or (...).

    The problem is convex, so its optimum is the unconstrained optimum of some active set
    (each variable free, or fixed at one of its bounds). With k <= 3 there are at most
    2 * 2 * 3 = 12 such sets: solve every one, clip each solution into the box (which keeps
    it feasible and leaves the true optimum unchanged) and keep the lowest SSE, computed
    as e'e - 2 c'b + c'Gc so no residuals are formed per active set."""
    k = G.shape[-1]
    batch = G.shape[:-2]
    d_max = np.broadcast_to(np.asarray(d_max, dtype=float), batch)
    upper = np.concatenate([np.full(batch + (k - 1,), np.inf), d_max[..., None]], axis=-1)
    states = [("free", "low")] * (k - 1) + [("free", "low", "high")]
    best_c = np.zeros(batch + (k,))
    best_sse = np.full(batch, np.inf)
    eye = np.eye(k)
    for combo in itertools.product(*states):
        free = [i for i, s in enumerate(combo) if s == "free"]
        fixed = [i for i in range(k) if i not in free]
        c = np.zeros(batch + (k,))
        if combo[-1] == "high":
            c[..., -1] = d_max
        if free:
            rhs = b[..., free] - np.einsum("...ij,...j->...i", G[..., free, :][..., fixed], c[..., fixed])
            M = G[..., free, :][..., free]
            # a tiny ridge keeps exactly collinear columns (alpha = 0 makes N^-alpha a
            # constant, like D's column) solvable; those cells' optimum lies on an edge,
            # which another active set covers exactly
            ridge = 1e-12 * np.trace(M, axis1=-2, axis2=-1)[..., None, None] * eye[: len(free), : len(free)]
            c[..., free] = _solve_small(M + ridge, rhs)
        c = np.clip(c, 0.0, upper)
        sse = ee + np.sum(c * (np.einsum("...ij,...j->...i", G, c) - 2 * b), axis=-1)
        sse = np.where(np.isfinite(sse), np.maximum(sse, 0.0), np.inf)
        better = sse < best_sse
        best_sse = np.where(better, sse, best_sse)
        best_c = np.where(better[..., None], c, best_c)
    return best_c, best_sse


def exponent_grid(size: int) -> np.ndarray:
    """Grid over [0, EXPONENT_MAX], quadratically spaced: dense near 0, where measured
    exponents live (0.01 - 1), coarse near the bound."""
    return EXPONENT_MAX * np.linspace(0.0, 1.0, size) ** 2


def _grid_starts(problem: Problem, size: int, starts: int) -> tuple[np.ndarray, np.ndarray]:
    """Profile SSE over a size x size (alpha, beta) grid; returns the parameter vectors of
    up to `starts` grid local minima (best first) and their SSEs."""
    g = exponent_grid(size)
    alpha, beta = (x.ravel() for x in np.meshgrid(g, g, indexing="ij"))
    coef, sse = problem.amplitudes(alpha, beta)
    surface = sse.reshape(size, size)
    # a cell is a local minimum when no 8-neighbour is lower: one start per basin, so the
    # polish explores distinct valleys instead of neighbouring cells of one valley
    padded = np.pad(surface, 1, constant_values=np.inf)
    neighbours = np.stack([padded[1 + di: 1 + di + size, 1 + dj: 1 + dj + size]
                           for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)])
    minima = np.flatnonzero((surface <= neighbours.min(axis=0)).ravel())
    order = minima[np.argsort(sse[minima], kind="stable")][:starts]
    return problem.full_params(alpha[order], beta[order], coef[order]), sse[order]


def polish(problem: Problem, p0: np.ndarray, loss: str, f_scale: float, tol: float = 1e-12) -> np.ndarray:
    """Bounded least squares from p0 (trust-region reflective, analytic Jacobian)."""
    lower, upper = problem.lower_upper()
    free = lower < upper  # D is pinned at 0 when some error is 0
    p_fixed = np.where(free, p0, lower)

    def expand(q: np.ndarray) -> np.ndarray:
        p = p_fixed.copy()
        p[free] = q
        return p

    start = np.clip(p0[free], lower[free], upper[free])
    # least_squares wants a start strictly inside the box; nudge points on a finite bound
    span = np.where(np.isfinite(upper[free]), upper[free] - lower[free], 1.0)
    start = np.clip(start, lower[free] + 1e-10 * span, np.where(np.isfinite(upper[free]), upper[free] - 1e-10 * span, np.inf))
    result = least_squares(
        lambda q: problem.model(expand(q)) - problem.e,
        start,
        jac=lambda q: problem.jacobian(expand(q))[:, free],
        bounds=(lower[free], upper[free]),
        method="trf",
        loss="linear" if loss == "squared" else "huber",
        f_scale=f_scale,
        x_scale="jac",
        ftol=tol,
        xtol=tol,
        gtol=tol,
        max_nfev=200,
    )
    return expand(result.x)


def _reprofile(problem: Problem, p: np.ndarray) -> np.ndarray:
    """The exact bounded amplitudes at p's exponents: never worse in SSE than p."""
    i, j = problem.exponent_index
    coef, sse = problem.amplitudes(np.array([p[i]]), np.array([p[j]]))
    q = problem.full_params(np.array([p[i]]), np.array([p[j]]), coef)[0]
    return q if sse[0] <= problem.sse(p) else p


def _robust_cost(problem: Problem, p: np.ndarray, f_scale: float) -> float:
    r = np.abs(problem.model(p) - problem.e)
    return float(np.sum(np.where(r <= f_scale, r**2, 2 * f_scale * r - f_scale**2)))


def default_f_scale(problem: Problem, p: np.ndarray) -> float:
    """Huber's threshold: 1.345 robust standard deviations of the squared-loss residuals
    (1.4826 * MAD), the usual 95%-efficiency choice."""
    r = problem.model(p) - problem.e
    sigma = 1.4826 * float(np.median(np.abs(r - np.median(r))))
    return 1.345 * max(sigma, 1e-8)


def fit_problem(
    problem: Problem,
    loss: str = "squared",
    f_scale: float | None = None,
    grid_size: int = GRID_SIZE,
    starts: int = 4,
) -> tuple[np.ndarray, float]:
    """Scaled parameters of the best fit and the Huber f_scale used (nan for squared)."""
    candidates, _ = _grid_starts(problem, grid_size, starts)
    # two independent polishes of every grid minimum: scipy's bounded least squares in the
    # full parameter space (then the amplitudes re-solved exactly), and the profile descent
    # over the exponents alone (which cannot stall on an amplitude bound); keep the best
    polished = [_reprofile(problem, polish(problem, p0, "squared", 1.0)) for p0 in candidates]
    ia, ib = problem.exponent_index
    ones = np.ones((len(candidates), len(problem.e)))
    d_max = np.full(len(candidates), problem.d_max)
    a, b = descend(problem, ones, d_max, candidates[:, ia], candidates[:, ib], EXPONENT_MAX / (grid_size - 1), 80)
    coef, _ = weighted_profile(problem, ones, a[:, None], b[:, None], d_max)
    polished.extend(problem.full_params(a, b, coef[:, 0]))
    sses = [problem.sse(p) for p in [*candidates, *polished]]
    best = [*candidates, *polished][int(np.argmin(sses))]
    if loss == "squared":
        return best, float("nan")
    # Huber: the squared-loss optimum (global) and the grid minima start the robust polish;
    # the robust objective is not profiled on the grid, so this is a multi-start local fit
    scale = f_scale if f_scale is not None else default_f_scale(problem, best)
    robust, robust_cost = best, _robust_cost(problem, best, scale)
    for p0 in [best, *candidates]:
        p = polish(problem, p0, "huber", scale)
        cost = _robust_cost(problem, p, scale)
        if cost < robust_cost:
            robust, robust_cost = p, cost
    return robust, scale


def fit_law(
    llm_params,
    visual_tokens,
    error,
    form: str = "product",
    *,
    loss: str = "squared",
    f_scale: float | None = None,
    grid_size: int = GRID_SIZE,
    starts: int = 4,
) -> Law:
    """The law minimizing the squared error (or, with loss="huber", Huber's loss with
    threshold `f_scale`, by default 1.345 robust SDs of the squared-loss residuals) under
    the bounds in the module docstring. `grid_size` points per exponent for the coarse
    grid, `starts` grid local minima polished."""
    started = time.perf_counter()
    if loss not in LOSSES:
        raise FitError(f"loss {loss!r}: choose one of {', '.join(LOSSES)}")
    n, v, e = check_points(llm_params, visual_tokens, error, form)
    problem = Problem.from_points(n, v, e, form)
    p, _ = fit_problem(problem, loss, f_scale, grid_size, starts)
    law = problem.to_law(p, loss)
    return Law(**{**law.to_dict(), "seconds": time.perf_counter() - started})


# ---- the profile over the exponents, weighted (shared with the bootstrap) -------------------


def weighted_profile(
    problem: Problem, counts: np.ndarray, alpha: np.ndarray, beta: np.ndarray, d_max: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact bounded amplitudes and SSE for resample r (point weights counts[r]) at the
    exponents alpha[r, c], beta[r, c]: returns coef (R, C, k) and sse (R, C)."""
    R, C = alpha.shape
    F = problem.features(alpha.ravel(), beta.ravel()).reshape(R, C, len(problem.e), -1)
    Fw = F * counts[:, None, :, None]
    G = np.matmul(Fw.transpose(0, 1, 3, 2), F)  # (R, C, k, k)
    b = np.einsum("rcpi,p->rci", Fw, problem.e)
    ee = (counts @ problem.e**2)[:, None]
    return box_lstsq(G, b, ee, d_max[:, None])



def descend(
    problem: Problem, counts: np.ndarray, d_max: np.ndarray, a: np.ndarray, b: np.ndarray, step0: float, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorized minimization of each resample's profiled SSE over (alpha, beta) in the
    box. Each iteration evaluates a 3 x 3 stencil of half-width `step` around the current
    point; its central differences give a quadratic model whose Newton point (when the
    model is convex; trust-limited to 4 steps) is a tenth trial point. The best of the ten
    becomes the new point; the step grows after a stencil move (a pattern search that
    travels), follows the Newton move, and shrinks 4x when the centre stays best. The
    profile is C^1 (the bounds on the amplitudes do not depend on the exponents), so this
    converges to a local minimum; starts come from the grid, so it is the global one
    whenever the grid resolved its valley. Converged resamples drop out."""
    a, b = a.copy(), b.copy()
    step = np.full(len(a), step0)
    tol = 1e-13 * (counts @ problem.e**2)
    da, db = (x.ravel() for x in np.meshgrid([-1.0, 0.0, 1.0], [-1.0, 0.0, 1.0], indexing="ij"))
    centre = 4
    live = np.arange(len(a))
    for _ in range(iterations):
        live = live[step[live] >= 1e-9]
        if live.size == 0:
            break
        la, lb, ls = a[live], b[live], step[live]
        trial_a = np.clip(la[:, None] + ls[:, None] * da, 0.0, EXPONENT_MAX)
        trial_b = np.clip(lb[:, None] + ls[:, None] * db, 0.0, EXPONENT_MAX)
        _, f = weighted_profile(problem, counts[live], trial_a, trial_b, d_max[live])
        f2 = f.reshape(-1, 3, 3)
        h2 = ls**2
        ga = (f2[:, 2, 1] - f2[:, 0, 1]) / (2 * ls)
        gb = (f2[:, 1, 2] - f2[:, 1, 0]) / (2 * ls)
        haa = (f2[:, 2, 1] - 2 * f2[:, 1, 1] + f2[:, 0, 1]) / h2
        hbb = (f2[:, 1, 2] - 2 * f2[:, 1, 1] + f2[:, 1, 0]) / h2
        hab = (f2[:, 2, 2] - f2[:, 2, 0] - f2[:, 0, 2] + f2[:, 0, 0]) / (4 * h2)
        det = haa * hbb - hab**2
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            na = -(hbb * ga - hab * gb) / det
            nb = -(haa * gb - hab * ga) / det
            convex = (haa > 0) & (det > 0) & np.isfinite(na) & np.isfinite(nb)
            na, nb = np.where(convex, na, 0.0), np.where(convex, nb, 0.0)
            shrink = np.minimum(1.0, 4 * ls / np.maximum(np.hypot(na, nb), 1e-300))
        newton_a = np.clip(la + na * shrink, 0.0, EXPONENT_MAX)
        newton_b = np.clip(lb + nb * shrink, 0.0, EXPONENT_MAX)
        _, fn = weighted_profile(problem, counts[live], newton_a[:, None], newton_b[:, None], d_max[live])
        all_a = np.column_stack([trial_a, newton_a])
        all_b = np.column_stack([trial_b, newton_b])
        all_f = np.column_stack([f, fn])
        # the centre wins ties and improvements below rounding level (1e-13 of the total
        # sum of squares), so a flat or noise-level direction shrinks the step instead of
        # wandering with a growing one
        all_f[:, centre] -= tol[live]
        pick = np.argmin(all_f, axis=1)
        rows = np.arange(live.size)
        moved = np.hypot(all_a[rows, pick] - la, all_b[rows, pick] - lb)
        a[live], b[live] = all_a[rows, pick], all_b[rows, pick]
        step[live] = np.where(pick == centre, ls / 4, np.where(pick == 9, np.clip(moved / 2, ls / 8, 2 * ls), 2 * ls))
    return a, b
