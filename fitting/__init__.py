"""Scaling-law fits E(N, V) and the compute-optimal frontier.

- `law`: `fit_law` (global bounded least squares, optional Huber), `bootstrap_law` (CIs),
  `holdout_error` (leave the largest LLM out), `optimal_visual_tokens`.
- `frontier`: `choose` (best grid candidate within a FLOP budget), `frontier` (Pareto
  set of the candidates), `optimal_curve` (continuous optimum per budget).
- `grid_fit`: `fit_grid` (every law of a grid from the store, written back as parquet).
- `plots`: `write_plots` (PNG figures into the store).
"""
