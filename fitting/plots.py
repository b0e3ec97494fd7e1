"""PNG plots of a fitted grid, written into the store next to its laws.

- `scaling_<family>_<form>_q<Q>.png`, one per task family and query length Q (0 and 50 by
  default): error vs inference FLOPs per query (`tokenscale.costs.inference_flops`, with
  each panel's compressor) on a log axis, one panel per compressor;
  observed points coloured by LLM size N with marker size growing with V, the fitted law
  as one curve per N across V, the grid candidates' Pareto frontier, and the continuous
  compute-optimal curve (Fig. 1 of arXiv 2411.03312).
- `alpha_beta_<form>.png`: alpha vs beta per (compressor, task family) with the bootstrap
  CIs as error bars and the alpha = beta line (above it tokens matter more than N).

matplotlib is driven through `Figure` + the Agg canvas only, never pyplot: no global
backend switch, no GUI, and safe to call from a server or a thread.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from tokenscale.costs import inference_flops
from tokenscale.store import Store

from .frontier import Candidate, candidates, frontier, optimal_curve, optimal_visual_tokens
from .grid_fit import law_points
from .law import FitError, Law, laws_from_table

DPI = 100


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _q_label(q: float) -> str:
    return f"{q:g}".replace(".", "p")


def scaling_figure(
    family: str,
    panels: list[tuple[str, Law, tuple[np.ndarray, np.ndarray, np.ndarray], list[Candidate]]],
    text_tokens: float,
) -> Figure:
    """Error vs inference FLOPs for one task family: one panel per (compressor, law,
    observed (N, V, E), candidates)."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    # fixed margins instead of constrained layout: that layout engine re-measures every
    # tick label and was most of the rendering time
    fig = Figure(figsize=(5.2 * cols + 1.0, 4.2 * rows))
    fig.subplots_adjust(left=0.09 / cols * 1.6, right=0.9, bottom=0.12 / rows * 1.2, top=1 - 0.08 / rows, wspace=0.3, hspace=0.35)
    all_n = np.concatenate([p[2][0] for p in panels])
    norm = LogNorm(vmin=all_n.min(), vmax=max(all_n.max(), all_n.min() * 1.0001))
    cmap = "viridis"
    mappable = ScalarMappable(norm=norm, cmap=cmap)
    axes = []
    for i, (compressor, law, (n, v, e), cands) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        axes.append(ax)
        v_min, v_max = float(v.min()), float(v.max())
        span = math.log(v_max / v_min) if v_max > v_min else 1.0
        dense_v = np.geomspace(v_min, v_max, 100)

        def cost(size, tokens, compressor=compressor):
            return inference_flops(size, text_tokens, tokens, compressor=compressor)

        for size in np.unique(n):
            color = mappable.to_rgba(size)
            ax.plot(cost(size, dense_v), law.predict(size, dense_v), color=color, lw=1.6, alpha=0.9)
            at = n == size
            marker_size = 15 + 120 * np.log(v[at] / v_min) / span
            ax.scatter(cost(size, v[at]), e[at], s=marker_size, color=color, edgecolor="k", linewidth=0.4, zorder=3)
        # the grid's own Pareto frontier: the best error a budget buys among candidates, a
        # step function of the budget
        points = frontier({compressor: law}, cands, text_tokens)
        if points:
            ax.step([p.flops for p in points] + [cost(n.max(), v_max)],
                    [p.predicted_error for p in points] + [points[-1].predicted_error],
                    "k:", where="post", lw=1.4, label="Pareto (grid candidates)")
            ax.plot([p.flops for p in points], [p.predicted_error for p in points], "kx", ms=6)
        # the continuous optimum over V (and N within the grid's range) per budget
        budgets = np.geomspace(cost(n.min(), v_min), cost(n.max(), v_max), 200)
        _, _, e_star = optimal_curve(law, text_tokens, budgets, v_min, v_max, n_min=float(n.min()), n_max=float(n.max()),
                                     compressor=compressor)
        ax.plot(budgets, e_star, color="0.4", ls="--", lw=1.2, label="optimum, continuous V")
        ax.set_xscale("log")
        extra = " + 2NQ" if cost(1.0, 0.0) > 2 * text_tokens else ""
        ax.set_xlabel(f"inference FLOPs 2N(Q+V){extra}, Q={text_tokens:g}")
        ax.set_ylabel("error")
        title = f"{family} / {compressor}: α={law.alpha:.3f}, β={law.beta:.3f}"
        if law.form == "product":
            v_star = optimal_visual_tokens(law, text_tokens, v_min, v_max, compressor=compressor)
            title += f", V*={v_star:.3g}"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, ls="--")
        lo_e, hi_e = float(e.min()), float(e.max())
        pad = 0.1 * max(hi_e - lo_e, 1e-3)
        ax.set_ylim(lo_e - pad, hi_e + pad)
        # marker-size key: smallest and largest V
        for tokens in sorted({v_min, v_max}):
            ax.scatter([], [], s=15 + 120 * math.log(tokens / v_min) / span, color="0.7", edgecolor="k",
                       linewidth=0.4, label=f"V={tokens:g}")
        ax.legend(fontsize=7, loc="upper right")
    fig.colorbar(mappable, ax=axes, label="LLM params N", fraction=0.03, pad=0.02)
    return fig


def alpha_beta_figure(rows: list[dict], form: str) -> Figure:
    """alpha vs beta, one point per (compressor, task family), bootstrap CIs as bars."""
    fig = Figure(figsize=(6.4, 5.0))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.11, top=0.93)
    ax = fig.add_subplot(1, 1, 1)
    compressors = sorted({r["compressor"] for r in rows})
    families = sorted({r["task_family"] for r in rows})
    markers = "osD^vP*X"
    colors = [f"C{i % 10}" for i in range(len(compressors))]
    top = 0.0
    for r in rows:
        a, b = r["alpha"], r["beta"]

        def bar(lo, hi, mid):
            # NaN CIs (too few points) draw no bar; a percentile CI can exclude the
            # estimate at a bound, so each side is clipped at 0
            lo = mid if lo is None or not math.isfinite(lo) else lo
            hi = mid if hi is None or not math.isfinite(hi) else hi
            return [[max(mid - lo, 0.0)], [max(hi - mid, 0.0)]]

        ax.errorbar([a], [b], xerr=bar(r["alpha_lo"], r["alpha_hi"], a), yerr=bar(r["beta_lo"], r["beta_hi"], b),
                    fmt=markers[families.index(r["task_family"]) % len(markers)],
                    color=colors[compressors.index(r["compressor"])], capsize=3, ms=6)
        top = max(top, a, b, *(x for x in (r["alpha_hi"], r["beta_hi"]) if x is not None and math.isfinite(x)))
    top = top * 1.1 or 1.0
    ax.plot([0, top], [0, top], color="0.5", ls="--", lw=1, label="α = β")
    for c, color in zip(compressors, colors, strict=True):
        ax.plot([], [], "-", lw=5, color=color, label=c)  # colour = compressor
    for i, f in enumerate(families):
        ax.plot([], [], markers[i % len(markers)], color="0.3", label=f)  # marker = task family
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("α (LLM-size exponent)")
    ax.set_ylabel("β (visual-token exponent)")
    ax.set_title(f"{form} form: exponents with bootstrap CIs")
    ax.grid(alpha=0.3, ls="--")
    ax.legend(fontsize=8, loc="best")
    return fig


def write_plots(store: Store, grid: str, *, form: str = "product", text_tokens: tuple[float, ...] = (0.0, 50.0)) -> list[str]:
    """Render the grid's plots from its results and fitted laws (of `form`) and write them
    under <store>/<grid>/plots/; returns the keys written. Fit first (`fit_grid`)."""
    results = store.read_results(grid)
    if results.num_rows == 0:
        raise FitError(f"grid {grid!r} has no results in {store.uri}: run it first")
    table = store.read_laws(grid)
    fitted = [(row, law) for row, law in laws_from_table(table) if row["grid"] == grid and row["form"] == form]
    if not fitted:
        raise FitError(f"grid {grid!r} has no fitted {form} laws in {store.uri}: fit it first (tokenscale fit {grid})")
    points = {column: law_points(results, column) for column in {law.llm_params_column for _, law in fitted}}
    cands = candidates(results)
    keys = []
    for family in sorted({row["task_family"] for row, _ in fitted}):
        panels = [
            (row["compressor"], law, points[law.llm_params_column][(family, row["compressor"])],
             [c for c in cands if c.compressor == row["compressor"]])
            for row, law in sorted(fitted, key=lambda t: t[0]["compressor"])
            if row["task_family"] == family and (family, row["compressor"]) in points[law.llm_params_column]
        ]
        if not panels:
            continue
        for q in text_tokens:
            key = store.join(grid, "plots", f"scaling_{family}_{form}_q{_q_label(q)}.png")
            store.put_bytes(key, _png(scaling_figure(family, panels, q)))
            keys.append(key)
    key = store.join(grid, "plots", f"alpha_beta_{form}.png")
    store.put_bytes(key, _png(alpha_beta_figure([row for row, _ in fitted], form)))
    keys.append(key)
    return keys
