"""The law fit vs the authors' brute-force grid search, on the same synthetic points.

    .venv/bin/python benchmarks/bench_fit.py                # < 1 min on one core
    .venv/bin/python benchmarks/bench_fit.py --paper-grid   # their 50x100x100x10 grid, 20% searched (minutes)

The authors (arXiv 2411.03312, scaling_law_code/objective.py) fit E = A N^-a V^-b + D by
building a 4-D grid over (A, alpha, beta, D) with np.linspace ranges chosen by hand around
the answer, shuffling it, and scoring each grid point with a pure-Python double loop over
(N, V) (N in billions), stopping after 20% of the grid. That is re-implemented here as is,
with the same ranges; by default with 41 points per exponent, the resolution of
`fit_law`'s coarse (alpha, beta) grid, fewer on A and D, and the whole grid searched.
`fit_law` searches far wider bounds (alpha, beta in [0, 3], A >= 0, 0 <= D < min error),
solving A and D exactly per exponent cell, then polishing. Both SSEs are printed, and the
time ratio (more portable across machines than seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tokenscale.fitting.solve import GRID_SIZE, fit_law

N_BILLIONS = [0.5, 1.8, 4, 7]  # the paper's Qwen-1.5 sizes, in their units
TOKENS = [1, 4, 16, 36, 64, 144, 576]
TRUTH = {"A": 0.45, "alpha": 0.077, "beta": 0.015, "D": 0.14}  # their reported exponents


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, default=0.004, help="SD of the noise added to the errors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, nargs=4, default=[20, GRID_SIZE, GRID_SIZE, 10], metavar=("A", "ALPHA", "BETA", "D"),
                        help="brute-force points per axis (default: 20 41 41 10)")
    parser.add_argument("--fraction", type=float, default=1.0, help="share of the shuffled grid searched (theirs: 0.2)")
    parser.add_argument("--paper-grid", action="store_true", help="their exact grid: 50 100 100 10, fraction 0.2")
    parser.add_argument("--repeats", type=int, default=5, help="fit_law timing repeats (median)")
    return parser.parse_args(argv)


# ---- the authors' approach, kept in its original shape (pure Python per grid point) ---------


def func_error_fit(params, inputs):
    a, b, c, d = params
    n, t = inputs
    return a * 1 / n**b * 1 / (t**c) + d


def brute_force(scores: dict[str, list[float]], grid_sizes: list[int], fraction: float, seed: int):
    a = np.linspace(0.2, 0.7, grid_sizes[0])
    b = np.linspace(0.0, 0.2, grid_sizes[1])
    c = np.linspace(0.0, 0.05, grid_sizes[2])
    d = np.linspace(0.0, 0.3, grid_sizes[3])
    grid = np.array(np.meshgrid(a, b, c, d)).T.reshape(-1, 4)
    np.random.default_rng(seed).shuffle(grid)
    stop = int(fraction * len(grid))
    best_loss, best_params = 1e6, None
    for i, param in enumerate(grid.tolist()):
        loss = 0
        for n in N_BILLIONS:
            for token in TOKENS:
                pred = func_error_fit(param, [n, token])
                err = 1 - scores[str(n)][TOKENS.index(token)]
                loss += (pred - err) ** 2
        if loss < best_loss:
            best_loss, best_params = loss, param
        if i + 1 >= stop:
            break
    return best_params, best_loss, min(stop, len(grid))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.paper_grid:
        args.grid, args.fraction = [50, 100, 100, 10], 0.2
    rng = np.random.default_rng(args.seed)
    n = np.repeat(N_BILLIONS, len(TOKENS)).astype(float)
    v = np.tile(TOKENS, len(N_BILLIONS)).astype(float)
    e = TRUTH["A"] * n ** -TRUTH["alpha"] * v ** -TRUTH["beta"] + TRUTH["D"] + rng.normal(0, args.noise, n.size)
    scores = {str(size): list(1 - e[i * len(TOKENS):(i + 1) * len(TOKENS)]) for i, size in enumerate(N_BILLIONS)}

    print(f"synthetic product law {TRUTH}, {n.size} points (N in billions {N_BILLIONS} x V {TOKENS}), noise SD {args.noise}")
    fit_law(n, v, e, "product")  # warm-up (imports, caches)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        law = fit_law(n, v, e, "product")
        times.append(time.perf_counter() - started)
    ours = statistics.median(times)

    total = int(np.prod(args.grid))
    print(f"brute force: grid A x alpha x beta x D = {' x '.join(map(str, args.grid))} = {total:,} points over "
          f"A in [0.2, 0.7], alpha in [0, 0.2], beta in [0, 0.05], D in [0, 0.3]; searching {args.fraction:.0%} of it ...",
          flush=True)
    started = time.perf_counter()
    params, brute_sse, searched = brute_force(scores, args.grid, args.fraction, args.seed)
    brute = time.perf_counter() - started

    print(f"fit_law: coarse grid {GRID_SIZE} x {GRID_SIZE} over (alpha, beta) in [0, 3]^2 (A, D solved exactly per cell) "
          f"+ polish; median of {args.repeats}")
    print()
    print(f"{'method':<14}{'seconds':>10}{'SSE':>14}{'A':>9}{'alpha':>9}{'beta':>9}{'D':>9}")
    print(f"{'fit_law':<14}{ours:>10.4f}{law.sse:>14.6e}{law.A:>9.4f}{law.alpha:>9.4f}{law.beta:>9.4f}{law.D:>9.4f}")
    print(f"{'brute force':<14}{brute:>10.2f}{brute_sse:>14.6e}{params[0]:>9.4f}{params[1]:>9.4f}{params[2]:>9.4f}{params[3]:>9.4f}")
    print(f"{'truth':<14}{'':>10}{'':>14}{TRUTH['A']:>9.4f}{TRUTH['alpha']:>9.4f}{TRUTH['beta']:>9.4f}{TRUTH['D']:>9.4f}")
    print()
    print(f"brute force searched {searched:,} grid points: {brute / ours:,.0f}x the time of fit_law; "
          f"SSE brute / fit_law = {brute_sse / law.sse:.4f} (>= 1: fit_law's is the global minimum)")


if __name__ == "__main__":
    main()
