"""One self-contained HTML page of a grid: the paper's Figure 1 per task family, the fitted
laws with their intervals, alpha against beta, `/optimal` over a range of budgets, and per
trial its status, scores and training curves.

`report_data` gathers every number from the store (results, laws, draws, held-out LLMs,
training curves) and from the same `Advisor` the Serve app answers with, so the page and
the API never disagree; `render_html` writes it out as one page. The charts are drawn by a
small inline script (`report.js`) into inline SVG from the JSON embedded in the page: no
CDN, no chart library, works offline from a file. Each chart is an `<svg class="chart">`
holding one `<g class="series">` per series, which is what the browser test counts.

Used by `tokenscale report` (with the trials' live status from the orchestrator) and by
the Serve app's `GET /` (regenerated when the laws reload).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Any

import numpy as np
import pyarrow as pa

from tokenscale.costs import inference_flops
from tokenscale.fitting.frontier import BudgetError, Candidate
from tokenscale.store import Store

from .advisor import Advisor, BadRequest, finite_or_none, jsonable

QUERY_LENGTHS = (0.0, 50.0)  # the paper's Figure 1: cached (Q = 0) and uncached (Q = 50) text
OPTIMAL_BUDGETS = 6  # rows of the /optimal table per task family and query length
LAW_CURVE_POINTS = 40  # per (LLM, compressor) law line across V
MARKERS = ("circle", "square", "triangle", "diamond")  # per compressor in a family's chart


def _number(x: Any) -> float | None:
    return finite_or_none(x) if x is not None else None


def _trial_points(results: pa.Table) -> list[dict]:
    """Observed error per (family, compressor, LLM, V): averaged over the family's
    benchmarks and the seeds, as the fit sees it."""
    if results.num_rows == 0:
        return []
    keys = ["task_family", "compressor", "llm", "llm_params", "visual_tokens"]
    grouped = results.group_by(keys, use_threads=False).aggregate([("error", "mean"), ("seed", "count_distinct")])
    rows = grouped.to_pylist()
    rows.sort(key=lambda r: tuple(str(r[k]) if isinstance(r[k], str) else r[k] or 0 for k in keys))
    return rows


def _law_for(advisor: Advisor | None, family: str, compressor: str, form: str | None):
    """The fitted law of (family, compressor, form); None when there is none (or no form)."""
    entry = advisor.snapshot.laws.get((family, compressor, form)) if advisor is not None else None
    return None if entry is None else entry[1]


def _family_chart(family: str, q: float, points: list[dict], advisor: Advisor | None, form: str | None,
                  candidates: dict[tuple[str, int, str], Candidate]) -> dict:
    """Error vs inference FLOPs at query length q: one series per LLM (its points, marker
    per compressor, and the law's prediction through them across V), the Pareto frontier."""
    mine = [p for p in points if p["task_family"] == family]
    compressors = sorted({p["compressor"] for p in mine})
    llms = sorted({(p["llm_params"], p["llm"]) for p in mine})
    # each compressor's law is drawn across the V range the grid trained it at
    dense_v = {}
    for compressor in compressors:
        every_v = [p["visual_tokens"] for p in points if p["compressor"] == compressor]
        dense_v[compressor] = (np.geomspace(min(every_v), max(every_v), LAW_CURVE_POINTS) if len(set(every_v)) > 1
                               else np.array(every_v[:1], float))
    series = []
    for params, llm in llms:
        marks = []
        for compressor in compressors:
            at = [p for p in mine if p["llm"] == llm and p["compressor"] == compressor]
            if not at:
                continue
            marker = MARKERS[compressors.index(compressor) % len(MARKERS)]
            marks.append({"type": "points", "marker": marker, "data": [
                [float(inference_flops(p["llm_params"], q, p["visual_tokens"], compressor=compressor)),
                 _number(p["error_mean"]),
                 f"{llm} · V={p['visual_tokens']} · {compressor}: error {p['error_mean']:.3f}"
                 f" ({p['seed_count_distinct']} seed{'s' if p['seed_count_distinct'] != 1 else ''})"]
                for p in at if _number(p["error_mean"]) is not None]})
            law = _law_for(advisor, family, compressor, form)
            if law is None:
                continue
            cand = candidates.get((llm, at[0]["visual_tokens"], compressor))
            n = cand.law_params(law) if cand else float(params)
            predicted = np.asarray(law.predict(n, dense_v[compressor]), dtype=float)
            costs = np.asarray(inference_flops(params, q, dense_v[compressor], compressor=compressor), dtype=float)
            marks.append({"type": "line", "dash": compressors.index(compressor) > 0, "data": [
                [float(c), float(e), f"law ({form}, {compressor}) at {llm}, V={v:.3g}: {e:.3f}"]
                for c, e, v in zip(costs, predicted, dense_v[compressor], strict=True) if math.isfinite(e)]})
        series.append({"name": f"{llm} (N={params:.3g})", "marks": marks})
    if advisor is not None and form is not None:
        try:
            answer = advisor.frontier(task=family, text_tokens=q, form=form)
        except BadRequest:
            answer = {"points": []}
        if answer["points"]:
            data = [[p["flops"], p["predicted_error"],
                     f"frontier: {p['llm']}, V={p['visual_tokens']}, {p['compressor']}: predicted {p['predicted_error']:.3f}"]
                    for p in answer["points"] if p["predicted_error"] is not None]
            series.append({"name": "Pareto frontier", "color": "#000", "marks": [{"type": "step", "data": data},
                                                                                  {"type": "points", "marker": "cross", "data": data}]})
    markers = ", ".join(f"{MARKERS[i % len(MARKERS)]} = {c}" for i, c in enumerate(compressors))
    return {
        "id": f"fig1-{family}-q{q:g}",
        "kind": "figure1",
        "title": f"{family}: error vs inference FLOPs, Q = {q:g} text tokens",
        "note": f"markers: {markers}" + (f"; lines: the {form} law" if form else "; no law fitted yet"),
        "x": {"label": f"inference FLOPs per query (Q = {q:g})", "log": True},
        "y": {"label": "error", "log": False},
        "series": series,
    }


def _law_rows(advisor: Advisor | None) -> list[dict]:
    if advisor is None:
        return []
    keep = ("task_family", "compressor", "form", "A", "B", "alpha", "alpha_lo", "alpha_hi", "beta", "beta_lo",
            "beta_hi", "D", "ratio_lo", "ratio_hi", "r2", "holdout_error", "n_points", "ci_level", "identification",
            "preferred", "llm_params_column")
    return [jsonable({k: row.get(k) for k in keep}) for (_, _, _), (row, _) in sorted(advisor.snapshot.laws.items())]


def _alpha_beta_chart(advisor: Advisor | None) -> dict:
    """alpha against beta, one series per compressor (a point per task family, with its
    bootstrap CIs), and the alpha = beta line: above it visual tokens matter more."""
    series = []
    top = 0.0
    if advisor is not None:
        by_compressor: dict[str, list] = {}
        for (family, compressor, form), (row, _) in sorted(advisor.snapshot.laws.items()):
            if form != advisor.snapshot.preferred_form(family):
                continue
            a, b = _number(row.get("alpha")), _number(row.get("beta"))
            if a is None or b is None:
                continue
            lo_a, hi_a = _number(row.get("alpha_lo")), _number(row.get("alpha_hi"))
            lo_b, hi_b = _number(row.get("beta_lo")), _number(row.get("beta_hi"))
            top = max(top, a, b, *(x for x in (hi_a, hi_b) if x is not None))
            tip = (f"{family} / {compressor} ({form}): α = {a:.3f} [{_fmt(lo_a)}, {_fmt(hi_a)}], "
                   f"β = {b:.3f} [{_fmt(lo_b)}, {_fmt(hi_b)}]")
            by_compressor.setdefault(compressor, []).append([a, b, tip, lo_a, hi_a, lo_b, hi_b, family])
        for compressor, data in by_compressor.items():
            series.append({"name": compressor, "marks": [{"type": "errorbars", "data": data},
                                                         {"type": "points", "marker": "circle", "data": data, "labels": True}]})
    top = (top or 1.0) * 1.1
    series.append({"name": "α = β", "color": "#888", "marks": [{"type": "line", "dash": True,
                                                               "data": [[0.0, 0.0, "α = β"], [top, top, "α = β"]]}]})
    return {"id": "alpha-beta", "kind": "alpha_beta", "title": "α (LLM size) against β (visual tokens), 90% bootstrap CIs",
            "note": "below the line: LLM size matters more than visual tokens (the paper's reasoning finding); above: tokens matter more (OCR)",
            "x": {"label": "α", "log": False, "min": 0.0}, "y": {"label": "β", "log": False, "min": 0.0}, "series": series}


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.3f}"


def _optimal_rows(advisor: Advisor | None, family: str, form: str | None) -> list[dict]:
    """`/optimal` at budgets spread over the candidates' costs, for each query length."""
    if advisor is None or form is None:
        return []
    rows = []
    cands = [c for c in advisor.snapshot.candidates]
    for q in QUERY_LENGTHS:
        costs = sorted(c.flops(q) for c in cands)
        if not costs:
            continue
        for budget in np.geomspace(costs[0], costs[-1], OPTIMAL_BUDGETS):
            try:
                answer = advisor.optimal(float(budget), text_tokens=q, task=family, form=form)
            except (BadRequest, BudgetError):
                continue
            keep = ("budget_flops", "text_tokens", "llm", "visual_tokens", "compressor", "predicted_error",
                    "predicted_error_lo", "predicted_error_hi", "p_optimal", "optimal_visual_tokens")
            row = {k: answer.get(k) for k in keep}
            runner = answer.get("runner_up")
            row["runner_up"] = None if runner is None else f"{runner['llm']}, V={runner['visual_tokens']}, {runner['compressor']}"
            rows.append(jsonable(row))
    return rows


def _curve_charts(curves: pa.Table) -> dict[str, dict]:
    """trial_id -> its training-loss chart: one series per stage, loss against step."""
    out: dict[str, dict] = {}
    if curves.num_rows == 0:
        return out
    rows = sorted(curves.to_pylist(), key=lambda r: (r["trial_id"] or "", r["stage"] or 0, r["step"] or 0))
    for r in rows:
        if r["trial_id"] is None or _number(r["loss"]) is None:
            continue
        chart = out.setdefault(r["trial_id"], {
            "id": f"curve-{r['trial_id']}", "kind": "curve", "title": f"{r['trial_id']}: training loss",
            "x": {"label": "optimizer step", "log": False}, "y": {"label": "loss", "log": False}, "series": [], "small": True,
        })
        name = f"stage {r['stage']}"
        series = next((s for s in chart["series"] if s["name"] == name), None)
        if series is None:
            series = {"name": name, "marks": [{"type": "line", "data": []}]}
            chart["series"].append(series)
        series["marks"][0]["data"].append([float(r["step"]), float(r["loss"]),
                                           f"stage {r['stage']} step {r['step']}/{r['steps']}: loss {r['loss']:.4f}"])
    return out


def _status_dicts(statuses: Iterable[Any] | None) -> list[dict] | None:
    if statuses is None:
        return None
    return [asdict(s) if is_dataclass(s) else dict(s) for s in statuses]


def _trials(results: pa.Table, statuses: list[dict] | None, curves: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Per trial: identity, status (from `statuses`, else "done" for every trial with a
    result), score per benchmark, and its training-curve chart."""
    benchmarks = sorted(set(results["benchmark"].to_pylist())) if results.num_rows else []
    scores: dict[str, dict[str, float | None]] = {}
    identity: dict[str, dict] = {}
    for r in results.select(["trial_id", "llm", "visual_tokens", "compressor", "seed", "benchmark", "score"]).to_pylist():
        scores.setdefault(r["trial_id"], {})[r["benchmark"]] = _number(r["score"])
        identity.setdefault(r["trial_id"], {k: r[k] for k in ("llm", "visual_tokens", "compressor", "seed")})
    trials = []
    if statuses is None:
        statuses = [{"name": t, **identity[t], "status": "done", "error": ""} for t in sorted(identity)]
    for s in statuses:
        trial_id = s.get("name") or s.get("trial_id")
        row = {k: s.get(k) for k in ("llm", "visual_tokens", "compressor", "seed", "status", "error")}
        row.update({k: s[k] for k in ("progress", "eta") if s.get(k) is not None})
        row["trial_id"] = trial_id
        row["scores"] = scores.get(trial_id, {})
        row["curve"] = curves.get(trial_id)
        trials.append(jsonable(row))
    return trials, benchmarks


def report_data(store: Store, grid: str, advisor: Advisor | None = None, statuses: Iterable[Any] | None = None) -> dict:
    """Every number the page shows, as JSON-ready data. `advisor`: the grid's laws as the
    Serve app loaded them (None: not fitted yet); `statuses`: each trial's status as
    `tokenscale status` gives it (None: the trials with a result, as done)."""
    if advisor is not None and advisor.snapshot.grid != grid:
        raise ValueError(f"the advisor serves grid {advisor.snapshot.grid!r}, not {grid!r}")
    results = store.read_results(grid)
    curves = store.read_curves(grid)  # empty for trials run before curves were kept
    points = _trial_points(results)
    candidates = {(c.llm, c.visual_tokens, c.compressor): c for c in advisor.snapshot.candidates} if advisor else {}
    families = []
    for family in sorted({p["task_family"] for p in points} | ({k[0] for k in advisor.snapshot.laws} if advisor else set())):
        form = advisor.snapshot.preferred_form(family) if advisor and family in advisor.tasks else None
        families.append({
            "name": family,
            "form": form,
            "charts": [_family_chart(family, q, points, advisor, form, candidates) for q in QUERY_LENGTHS],
            "optimal": _optimal_rows(advisor, family, form),
        })
    heldout = store.read_heldout(grid) if advisor is not None else None
    trials, benchmarks = _trials(results, _status_dicts(statuses), _curve_charts(curves))
    return jsonable({
        "grid": grid,
        "store": store.uri,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fitted_at": advisor.snapshot.fitted_at if advisor else None,
        "families": families,
        "laws": _law_rows(advisor),
        "alpha_beta": _alpha_beta_chart(advisor),
        "heldout": heldout.to_pylist() if heldout is not None else [],
        "benchmarks": benchmarks,
        "trials": trials,
    })


def _asset(name: str) -> str:
    return resources.files("tokenscale.serve").joinpath(name).read_text(encoding="utf-8")


def render_html(data: dict) -> str:
    """The page: static skeleton, the data as JSON, the inline stylesheet and script."""
    # "</" inside a <script> would end it early; JSON allows "<\/" for "</"
    payload = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    title = f"tokenscale · {data['grid']}"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<style>{_asset('report.css')}</style>"
        # first, so that an error in the page's own script is recorded where a test sees it
        "<script>window.reportErrors=[];addEventListener('error',function(e){window.reportErrors.push(String(e.message));"
        "document.documentElement.setAttribute('data-errors',window.reportErrors.length)});</script>"
        "</head><body>"
        f"<header><h1>{html.escape(title)}</h1><p id=\"meta\"></p></header><main id=\"report\"></main>"
        f"<div id=\"tip\" hidden></div><script type=\"application/json\" id=\"report-data\">{payload}</script>"
        f"<script>{_asset('report.js')}</script></body></html>\n"
    )


def build_report(store: Store, grid: str, advisor: Advisor | None = None, statuses: Iterable[Any] | None = None) -> str:
    """`render_html(report_data(...))`: the whole page as one string."""
    return render_html(report_data(store, grid, advisor, statuses))
