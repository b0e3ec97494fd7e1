"""The scaling law E(N, V) and its least-squares fit.

  product form (the paper's code): E = A * N^-alpha * V^-beta + D
  sum form (Chinchilla-style):     E = A * N^-alpha + B * V^-beta + D

N = LLM non-embedding parameters, V = visual tokens, E = error in [0, 1].
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import least_squares

FORMS = ("product", "sum")


class FitError(ValueError):
    """Points that cannot determine a law; the message says why."""


@dataclass(frozen=True)
class Law:
    form: str
    A: float
    alpha: float
    beta: float
    D: float
    B: float | None = None
    sse: float = float("nan")
    r2: float = float("nan")
    n_points: int = 0
    seconds: float = 0.0

    def predict(self, llm_params, visual_tokens) -> np.ndarray:
        n = np.asarray(llm_params, dtype=float)
        v = np.asarray(visual_tokens, dtype=float)
        if self.form == "product":
            return self.A * n ** -self.alpha * v ** -self.beta + self.D
        return self.A * n ** -self.alpha + self.B * v ** -self.beta + self.D

    def to_dict(self) -> dict:
        return asdict(self)


def check_points(llm_params, visual_tokens, error, form: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if form not in FORMS:
        raise FitError(f"form {form!r}: choose one of {', '.join(FORMS)}")
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
    n_params = 4 if form == "product" else 5
    if len(e) <= n_params:
        raise FitError(f"{len(e)} points cannot determine the {form} form's {n_params} parameters: need more than {n_params}")
    if len(np.unique(n)) < 2:
        raise FitError("all points have one LLM size: alpha (the LLM-size exponent) is undetermined")
    if len(np.unique(v)) < 2:
        raise FitError("all points have one visual-token count: beta (the token exponent) is undetermined")
    return n, v, e


def fit_law(llm_params, visual_tokens, error, form: str = "product") -> Law:
    """Bounded least squares from several starts; A, B >= 0, alpha, beta in [0, 3],
    0 <= D < min(error). N and V are scaled by their geometric means inside the fit so
    the amplitudes stay O(1), then mapped back."""
    started = time.perf_counter()
    n, v, e = check_points(llm_params, visual_tokens, error, form)
    n_ref, v_ref = np.exp(np.log(n).mean()), np.exp(np.log(v).mean())
    ln, lv = np.log(n / n_ref), np.log(v / v_ref)
    d_max = max(float(e.min()) - 1e-9, 1e-12)

    if form == "product":
        def model(p):
            return p[0] * np.exp(-p[1] * ln - p[2] * lv) + p[3]
        lower, upper = [0, 0, 0, 0], [np.inf, 3, 3, d_max]
        starts = [[max(e.mean() - d, 1e-6), a, b, d] for a in (0.05, 0.5, 1.5) for b in (0.05, 0.5, 1.5) for d in (0.0, 0.5 * d_max)]
    else:
        def model(p):
            return p[0] * np.exp(-p[1] * ln) + p[2] * np.exp(-p[3] * lv) + p[4]
        lower, upper = [0, 0, 0, 0, 0], [np.inf, 3, np.inf, 3, d_max]
        starts = [[max(e.mean() - d, 1e-6) / 2, a, max(e.mean() - d, 1e-6) / 2, b, d] for a in (0.05, 0.5, 1.5) for b in (0.05, 0.5, 1.5) for d in (0.0, 0.5 * d_max)]

    best = None
    for start in starts:
        start = np.clip(start, lower, [u if np.isfinite(u) else 1e6 for u in upper])
        result = least_squares(lambda p: model(p) - e, start, bounds=(lower, upper), method="trf", x_scale="jac")
        if best is None or result.cost < best.cost:
            best = result
    p = best.x
    sse = float(np.sum((model(p) - e) ** 2))
    total = float(np.sum((e - e.mean()) ** 2))
    r2 = 1 - sse / total if total > 0 else float("nan")
    if form == "product":
        law = Law("product", A=float(p[0] * n_ref ** p[1] * v_ref ** p[2]), alpha=float(p[1]), beta=float(p[2]), D=float(p[3]))
    else:
        law = Law("sum", A=float(p[0] * n_ref ** p[1]), alpha=float(p[1]), B=float(p[2] * v_ref ** p[3]), beta=float(p[3]), D=float(p[4]))
    return Law(**{**law.to_dict(), "sse": sse, "r2": r2, "n_points": len(e), "seconds": time.perf_counter() - started})


def optimal_visual_tokens(law: Law, text_tokens: float, v_min: float, v_max: float, flops: float | None = None) -> float:
    """The continuous compute-optimal V at fixed inference FLOPs C = 2 N (Q + V), clamped
    to [v_min, v_max].

    Product form: minimizing A N^-a V^-b with N = C / (2 (Q + V)) gives V* = b Q / (a - b),
    independent of C; if b >= a more tokens always pay, so V* = v_max. Sum form: the
    optimum depends on C (`flops`, required), found on a dense log grid of V."""
    if law.form == "product":
        if law.beta >= law.alpha:
            return float(v_max)
        return float(np.clip(law.beta * text_tokens / (law.alpha - law.beta), v_min, v_max))
    if flops is None:
        raise FitError("the sum form's optimal V depends on the FLOP budget: pass flops")
    grid = np.geomspace(v_min, v_max, 4000)
    n = flops / (2.0 * (text_tokens + grid))
    return float(grid[np.argmin(law.predict(n, grid))])
