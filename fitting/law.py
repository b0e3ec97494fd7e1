"""The scaling law E(N, V) and its prediction: what a fitted law says, without fitting.

  product form (the paper's code): E = A * N^-alpha * V^-beta + D
  sum form (Chinchilla-style):     E = A * N^-alpha + B * V^-beta + D

N = LLM parameters (the results column the law was fitted on, `Law.llm_params_column`:
`llm_params`, the paper's N, by default), V = visual tokens, E = error in [0, 1].

numpy only: the Serve app imports this module (and `frontier`) to answer from stored laws
and their stored bootstrap draws, never the solver (`solve`) or the bootstrap
(`uncertainty`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tokenscale.costs import FORMS

N_COLUMN = "llm_params"  # the results column a law is fitted on unless told otherwise
LOSSES = ("squared", "huber")  # what a law can be fitted (and bootstrapped) with


class FitError(ValueError):
    """Points that cannot determine a law; the message says why."""


def n_parameters(form: str) -> int:
    return 4 if form == "product" else 5


def predict(form: str, A, alpha, beta, D, B, llm_params, visual_tokens) -> np.ndarray:
    """E(N, V) of the `form` law with these parameters. Everything broadcasts: scalars give
    one law, parameter arrays of shape (draws, 1) against points of shape (points,) give
    every draw's prediction at every point."""
    n = np.asarray(llm_params, dtype=float)
    v = np.asarray(visual_tokens, dtype=float)
    if form == "product":
        return A * n**-alpha * v**-beta + D
    return A * n**-alpha + B * v**-beta + D


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
    loss: str = "squared"
    llm_params_column: str = N_COLUMN  # which N the law was fitted on (and so predicts from)

    def predict(self, llm_params, visual_tokens) -> np.ndarray:
        return predict(self.form, self.A, self.alpha, self.beta, self.D, self.B, llm_params, visual_tokens)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The ((1 - level)/2, (1 + level)/2) percentiles of `samples` along axis 0."""
    # inverted_cdf: no interpolation between order statistics, so an infinite ratio
    # (beta = 0 in a resample) gives inf instead of inf - inf = nan
    q = [(1 - level) / 2, (1 + level) / 2]
    lo, hi = np.quantile(samples, q, axis=0, method="inverted_cdf")
    return lo, hi


@dataclass(frozen=True)
class Draws:
    """A law's joint bootstrap parameter draws, one entry per resample (B is NaN in the
    product form): what `tokenscale fit` stores in draws.parquet beside the law, so that
    prediction intervals, and decisions under uncertainty, come from the fit's own
    resamples."""

    form: str
    A: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    D: np.ndarray
    B: np.ndarray

    def __len__(self) -> int:
        return len(self.A)

    @classmethod
    def from_columns(cls, form: str, A, alpha, beta, D, B=None) -> Draws:
        arrays = [np.asarray(x, dtype=float).ravel() for x in (A, alpha, beta, D)]
        # B of the product form: NaN (stored as null)
        b = np.full(len(arrays[0]), np.nan) if B is None else np.asarray(B, dtype=float).ravel()
        return cls(form, *arrays, b)

    def head(self, count: int) -> Draws:
        """The first `count` draws."""
        return Draws(self.form, self.A[:count], self.alpha[:count], self.beta[:count], self.D[:count], self.B[:count])

    def predict(self, llm_params, visual_tokens) -> np.ndarray:
        """(draws, *shape): each draw's predicted error at each (N, V) (broadcast together)."""
        n, v = np.broadcast_arrays(np.asarray(llm_params, dtype=float), np.asarray(visual_tokens, dtype=float))
        col = [x[:, None] for x in (self.A, self.alpha, self.beta, self.D, self.B)]
        with np.errstate(all="ignore"):
            out = predict(self.form, col[0], col[1], col[2], col[3], col[4], n.ravel(), v.ravel())
        return out.reshape((len(self),) + n.shape)

    def error_interval(self, llm_params, visual_tokens, level: float) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): the percentile interval of the predicted error at each (N, V), at least
        1-d; NaN without draws."""
        n, v = np.broadcast_arrays(np.atleast_1d(np.asarray(llm_params, dtype=float)),
                                   np.atleast_1d(np.asarray(visual_tokens, dtype=float)))
        if len(self) == 0:
            nan = np.full(n.shape, np.nan)
            return nan, nan.copy()
        return percentile_interval(self.predict(n, v), level)


def law_from_row(row: dict) -> Law:
    """The `Law` of one laws-parquet row (columns of LAW_SCHEMA)."""
    return Law(row["form"], A=row["A"], alpha=row["alpha"], beta=row["beta"], D=row["D"], B=row["B"],
               sse=row["sse"], r2=row["r2"], n_points=row["n_points"], loss=row.get("loss") or "squared",
               llm_params_column=row.get("llm_params_column") or N_COLUMN)


def laws_from_table(table) -> list[tuple[dict, Law]]:
    """Law rows read back from the store (a pyarrow table), each with its `Law`."""
    return [(row, law_from_row(row)) for row in table.to_pylist()]


def check_form(form: str) -> str:
    if form not in FORMS:
        raise FitError(f"form {form!r}: choose one of {', '.join(FORMS)}")
    return form
