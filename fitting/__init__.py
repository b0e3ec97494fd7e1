"""Scaling-law fits E(N, V) and the compute-optimal frontier.

- `law`: the law and its prediction: `Law`, `FitError`, `predict`, `Draws` (a law's
  bootstrap parameter draws and the prediction intervals they give), `laws_from_table`.
  numpy only.
- `solve`: the solver, `fit_law` (global bounded least squares, optional Huber).
- `uncertainty`: `bootstrap_law` (CIs and the resampled fits, `LawCI.draws`, refitted with
  the law's loss), `holdout_error` (leave the largest LLM out).
- `frontier`: `choose` (best grid candidate within a FLOP budget), `choice_shares` (how
  often each candidate is the choice across the draws), `frontier` (Pareto set of the
  candidates), `optimal_visual_tokens` and `optimal_curve` (the continuous optimum at a
  budget). numpy only; costs from `tokenscale.costs.inference_flops`.
- `grid_fit`: `fit_grid` (every law of a grid from the store, written back as parquet with
  its draws).
- `plots`: `write_plots` (PNG figures into the store).

The Serve app imports `law` and `frontier` only: never `solve` or `uncertainty` (SciPy's
optimizers).
"""
