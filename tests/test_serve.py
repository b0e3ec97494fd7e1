"""The Serve API for real: a Ray Serve app started here, over HTTP, on a store written here.

Covers every endpoint, the bad inputs the issue lists (each a 4xx with a JSON message), a
schemathesis fuzz run against /openapi.json (4xx for invalid requests, 200 for the valid
ones the laws can answer, never a 5xx), and hot reload of a refit. In process, without
Ray (`Replica` + `build_api`): an unexpected error is a 500 that says it is ours, a store
that cannot be read before the first load is a 503, and a store that goes down keeps the
last good laws served (healthz: last_reload_error) until it returns with new ones. The
Advisor is also checked against `fitting.frontier.choose`/`frontier` without Ray, its
prediction CIs against the draws `fit` stored (a Huber law included), and the Serve
modules against importing the solver or the bootstrap.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from conftest import TcpProxy, free_port
from synthetic import synthetic_row, write_synthetic_results

from tokenscale.fitting.frontier import choose, frontier
from tokenscale.fitting.grid_fit import fit_grid, law_points
from tokenscale.fitting.solve import fit_law
from tokenscale.fitting.uncertainty import bootstrap_law
from tokenscale.serve.advisor import Advisor, BadRequest, laws_fingerprint, load_snapshot
from tokenscale.store import LAW_SCHEMA, Store

GRID = "syn"
LLMS = {"xs": 1_000_000, "s": 4_000_000, "m": 16_000_000, "l": 64_000_000}
TOKENS = (1, 4, 16, 64)
# (A, alpha, beta, D) per (family, compressor): distinct laws, so choices differ by task
TRUTH = {
    ("reasoning", "avgpool"): (0.6, 0.20, 0.08, 0.15),
    ("reasoning", "qformer"): (0.5, 0.15, 0.20, 0.18),
    ("ocr", "avgpool"): (0.7, 0.10, 0.30, 0.10),
    ("ocr", "qformer"): (0.7, 0.12, 0.15, 0.12),
}
BENCHMARKS = {"reasoning": ["mmmu", "scienceqa"], "ocr": ["textvqa"]}
RELOAD_SECONDS = 0.5


def write_results(store: Store, grid: str = GRID, seed: int = 0) -> None:
    """One result object per trial (LLM x V x compressor), rows per benchmark, errors from
    TRUTH plus a little seeded noise (so the bootstrap has something to resample)."""
    write_synthetic_results(store, grid, LLMS, TOKENS, TRUTH, BENCHMARKS, seed=seed)


def law_rows(grid: str, alpha: float, fitted_at: datetime) -> list[dict]:
    """Hand-made laws (product form only) with a chosen alpha: a 'refit' for hot reload."""
    base = {f.name: None for f in LAW_SCHEMA}
    return [
        base | {
            "grid": grid, "task_family": family, "compressor": compressor, "form": "product",
            "A": 0.6, "alpha": alpha, "beta": 0.1, "D": 0.1, "sse": 0.0, "r2": 1.0, "n_points": 16,
            "min_llm_params": min(LLMS.values()), "max_llm_params": max(LLMS.values()),
            "min_visual_tokens": min(TOKENS), "max_visual_tokens": max(TOKENS), "fitted_at": fitted_at,
        }
        for family, compressor in TRUTH
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store.open(str(tmp_path_factory.mktemp("serve-store")))
    write_results(store)
    rows, skipped = fit_grid(store, GRID)
    assert len(rows) == 8 and not skipped, skipped
    return store


@pytest.fixture(scope="module")
def advisor(store) -> Advisor:
    snapshot = load_snapshot(store, GRID)
    assert snapshot is not None
    return Advisor(snapshot)


@pytest.fixture(scope="module")
def served(store, tmp_path_factory):
    """The app on `store` at /, and a second app at /pending on a store with no laws yet."""
    import ray
    from ray import serve

    from tokenscale.orchestrator.driver import init_ray
    from tokenscale.serve.app import start

    pending = Store.open(str(tmp_path_factory.mktemp("pending-store") / "not-created-yet"))
    init_ray()
    try:
        port = free_port()
        url = start(store.uri, GRID, "127.0.0.1", port, reload_seconds=RELOAD_SECONDS)
        pending_url = start(pending.uri, None, "127.0.0.1", port, reload_seconds=RELOAD_SECONDS,
                            cis=False, name="pending", route_prefix="/pending")
        yield url, pending_url, pending
    finally:
        serve.shutdown()
        ray.shutdown()


def get(url: str, path: str, **params) -> requests.Response:
    return requests.get(f"{url}{path}", params=params, timeout=30)


def report_payload(page: str) -> dict:
    """The data embedded in a report page (serve/report.py)."""
    start = page.index('<script type="application/json" id="report-data">')
    payload = page[page.index(">", start) + 1 : page.index("</script>", start)]
    return json.loads(payload)


# ---- the answers, without Ray ---------------------------------------------------------------


def test_advisor_agrees_with_fitting(advisor):
    snap = advisor.snapshot
    for task in ("reasoning", "ocr"):
        for form in ("product", "sum"):
            for compressor in (None, "avgpool", "qformer"):
                laws = {c: law for (t, c, f), (_, law) in snap.laws.items()
                        if t == task and f == form and (compressor is None or c == compressor)}
                for q in (0.0, 37.0):
                    cheapest = min(2 * c.llm_params * (q + c.visual_tokens) for c in snap.candidates)
                    for budget in (cheapest, cheapest * 3.3, 1e9, 3e10, 1e15):
                        ours = advisor.optimal(budget, q, task, compressor, form)
                        theirs = choose(laws, snap.candidates, budget, q)
                        c = theirs.candidate
                        assert (ours["llm"], ours["visual_tokens"], ours["compressor"]) == (c.llm, c.visual_tokens, c.compressor)
                        assert ours["predicted_error"] == pytest.approx(theirs.predicted_error, rel=1e-12)
                        assert ours["optimal_visual_tokens"] == pytest.approx(theirs.optimal_visual_tokens, rel=1e-9)
                        assert ours["flops"] == pytest.approx(theirs.flops) and ours["flops"] <= budget
                        lo, hi = ours["predicted_error_lo"], ours["predicted_error_hi"]
                        assert lo is not None and lo <= hi and ours["ci_level"] == pytest.approx(0.9)
                        assert 0 <= ours["optimal_share"] <= 1
                    points = advisor.frontier(task, q, compressor, form)["points"]
                    expected = frontier(laws, snap.candidates, q)
                    assert [(p["llm"], p["visual_tokens"], p["compressor"]) for p in points] == [
                        (e.candidate.llm, e.candidate.visual_tokens, e.candidate.compressor) for e in expected]
    with pytest.raises(BadRequest, match="cheapest candidate"):
        advisor.optimal(1.0, 0.0, "reasoning")
    with pytest.raises(BadRequest, match="accepted values are ocr, reasoning"):
        advisor.optimal(1e12, 0.0, "poetry")
    for bad in (float("nan"), float("inf"), -1.0, 0.0, "2e12", True, None):
        with pytest.raises(BadRequest, match="flops"):
            advisor.optimal(bad, 0.0, "reasoning")


def expected_interval(draws: list[dict], key: tuple[str, str, str], n: float, v: float, level: float) -> tuple[float, float]:
    """The prediction interval at (N, V), computed here from draws.parquet's rows."""
    mine = sorted((d for d in draws if (d["task_family"], d["compressor"], d["form"]) == key), key=lambda d: d["draw"])
    assert mine, key
    if key[2] == "product":
        errors = [d["A"] * n ** -d["alpha"] * v ** -d["beta"] + d["D"] for d in mine]
    else:
        errors = [d["A"] * n ** -d["alpha"] + d["B"] * v ** -d["beta"] + d["D"] for d in mine]
    lo, hi = np.quantile(errors, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def test_prediction_ci_comes_from_the_stored_draws(store, advisor):
    """The prediction CI is the percentile interval, at the law's ci_level, of the
    predictions of the draws `fit` stored beside the law: the same from load to load, and
    the parameter CIs the fit stored are the percentiles of those same draws."""
    draws = store.read_draws(GRID).to_pylist()
    again = load_snapshot(store, GRID)
    for row in advisor.laws()["laws"]:
        assert row["ci_resamples"] == 200 and row["draws_loaded"] == 200 and row["ci_level"] == pytest.approx(0.9)
        key = (row["task_family"], row["compressor"], row["form"])
        alpha = [d["alpha"] for d in draws if (d["task_family"], d["compressor"], d["form"]) == key]
        assert [row["alpha_lo"], row["alpha_hi"]] == list(np.quantile(alpha, [0.05, 0.95], method="inverted_cdf"))
        assert row["D_lo"] is not None and row["D_lo"] <= row["D_hi"]
    for key in (("reasoning", None, "product"), ("ocr", "qformer", "sum")):
        opts = advisor.snapshot.options[key]
        assert np.array_equal(opts.error_lo, again.options[key].error_lo)
        assert np.all(opts.error_lo <= opts.error_hi)
        for c, lo, hi in zip(opts.candidates, opts.error_lo, opts.error_hi, strict=True):
            assert (lo, hi) == pytest.approx(expected_interval(draws, (key[0], c.compressor, key[2]), c.llm_params,
                                                               c.visual_tokens, 0.9), rel=1e-12)


def test_serves_a_huber_laws_ci_from_its_stored_draws(tmp_path):
    """A grid fitted with loss huber: the CI /optimal answers is the one computed from the
    Huber draws `fit_grid` stored (and those are the Huber bootstrap of the law, from the
    fit's seed), and optimal_share is the share of those draws in which the answer wins."""
    store = Store.open(str(tmp_path / "huber"))
    write_results(store)
    rows, skipped = fit_grid(store, GRID, loss="huber", resamples=80, seed=7)
    assert len(rows) == 8 and not skipped and {r["loss"] for r in rows} == {"huber"}
    draws = pq.read_table(store.draws_key(GRID)).to_pylist()
    advisor = Advisor(load_snapshot(store, GRID))
    points = law_points(store.read_results(GRID))
    shares = []
    for task, compressor, form, q, budget in [("reasoning", None, "product", 0.0, 2e9), ("ocr", "qformer", "sum", 16.0, 5e8),
                                              ("ocr", None, "product", 37.0, 1e10), ("reasoning", None, "sum", 0.0, 1e9),
                                              ("ocr", None, "sum", 16.0, 4e8)]:
        answer = advisor.optimal(budget, q, task, compressor, form)
        key = (task, answer["compressor"], form)
        n, v = answer["llm_params"], answer["visual_tokens"]
        row = next(r for r in rows if (r["task_family"], r["compressor"], r["form"]) == key)
        expected = expected_interval(draws, key, n, v, row["ci_level"])
        assert (answer["predicted_error_lo"], answer["predicted_error_hi"]) == pytest.approx(expected, rel=1e-12)
        assert answer["ci_level"] == row["ci_level"] == pytest.approx(0.9)
        pn, pv, pe = points[key[:2]]
        ci = bootstrap_law(pn, pv, pe, form, law=fit_law(pn, pv, pe, form, loss="huber"), resamples=80, seed=7, loss="huber")
        assert np.allclose(ci.error_interval(n, v), np.array(expected)[:, None], rtol=1e-12, atol=0)
        # optimal_share by hand: in how many draws (taken together across compressors) the
        # answer has the lowest predicted error among the candidates within the budget
        snap = advisor.snapshot
        cands = [c for c in snap.candidates if (compressor is None or c.compressor == compressor)
                 and 2 * c.llm_params * (q + c.visual_tokens) <= budget]
        by_draw = []
        for i in range(80):
            scored = []
            for c in cands:
                d = next(d for d in draws if (d["task_family"], d["compressor"], d["form"], d["draw"]) == (task, c.compressor, form, i))
                error = d["A"] * c.llm_params ** -d["alpha"] * (c.visual_tokens ** -d["beta"] if form == "product" else 1.0) + d["D"]
                if form == "sum":
                    error += d["B"] * c.visual_tokens ** -d["beta"]
                scored.append((error, 2 * c.llm_params * (q + c.visual_tokens), c))
            by_draw.append(min(scored, key=lambda t: (t[0], t[1]))[2])
        wins = sum(c.llm == answer["llm"] and c.visual_tokens == v and c.compressor == answer["compressor"] for c in by_draw)
        assert answer["optimal_share"] == pytest.approx(wins / 80)
        shares.append(answer["optimal_share"])
    assert min(shares) < 0.9 and max(shares) == 1.0  # some choices are sure, some are not


def test_serves_a_law_fitted_on_non_embedding_params(tmp_path):
    """A law fitted on llm_params_non_embedding predicts from each candidate's
    non-embedding N, while the candidate's cost stays inference_flops of its N."""
    store = Store.open(str(tmp_path / "non-embedding"))
    write_results(store)
    fit_grid(store, GRID, resamples=30, n_column="llm_params_non_embedding")
    advisor = Advisor(load_snapshot(store, GRID))
    for task, q in (("reasoning", 16.0), ("ocr", 0.0)):
        answer = advisor.optimal(2e9, q, task)
        row, law = advisor.snapshot.laws[(task, answer["compressor"], "product")]
        assert row["llm_params_column"] == law.llm_params_column == "llm_params_non_embedding"
        c = next(c for c in advisor.snapshot.candidates
                 if (c.llm, c.visual_tokens, c.compressor) == (answer["llm"], answer["visual_tokens"], answer["compressor"]))
        assert c.llm_params_non_embedding == round(0.8 * c.llm_params)
        assert answer["predicted_error"] == pytest.approx(float(law.predict(c.llm_params_non_embedding, c.visual_tokens)), rel=1e-12)
        assert answer["flops"] == 2 * c.llm_params * (q + c.visual_tokens)
        assert answer["predicted_error_lo"] <= answer["predicted_error"] <= answer["predicted_error_hi"]


def test_serve_imports_neither_the_solver_nor_the_bootstrap():
    """The replica only reads and answers: importing the Serve modules loads the law's
    prediction and the choice, and nothing that fits or resamples."""
    code = "import sys, tokenscale.serve.advisor, tokenscale.serve.app; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert {"tokenscale.serve.advisor", "tokenscale.fitting.law", "tokenscale.fitting.frontier"} <= loaded
    forbidden = {"tokenscale.fitting.solve", "tokenscale.fitting.uncertainty", "tokenscale.fitting.grid_fit",
                 "tokenscale.fitting.plots", "scipy.optimize"}
    assert not forbidden & loaded, forbidden & loaded


def test_trials_rank_by_mean_error_over_the_family(advisor, store):
    table = store.read_results(GRID).to_pylist()
    best = advisor.trials("reasoning", 3)["trials"]
    means = {}
    for r in table:
        if r["task_family"] == "reasoning":
            means.setdefault(r["config_hash"], []).append(r["error"])
    expected = sorted((float(np.mean(v)), k) for k, v in means.items())[:3]
    assert [(t["mean_error"], t["config_hash"]) for t in best] == [(pytest.approx(m), k) for m, k in expected]
    assert [t["rank"] for t in best] == [1, 2, 3] and best[0]["benchmarks"] == 2
    for bad in (0, 101, 2.5, True):
        with pytest.raises(BadRequest, match="top"):
            advisor.trials("reasoning", bad)


def test_load_skips_rows_it_cannot_serve(tmp_path):
    """A law with a NaN parameter or a result row without N is left out, not a failed load."""
    store = Store.open(str(tmp_path / "s"))
    write_results(store)
    # a row as a broken writer could leave it: built whole, then its N taken away
    broken = synthetic_row(grid=GRID, task_family="ocr", compressor="avgpool", llm="ghost", llm_params=10**6,
                           visual_tokens=4, benchmark="textvqa", error=0.5) | {"llm_params": None}
    store.write_results(GRID, "avgpool", "ghost", [broken])
    rows = law_rows(GRID, 0.2, datetime.now(timezone.utc))
    rows[0] |= {"alpha": float("nan")}  # (reasoning, avgpool) unusable
    store.write_laws(GRID, rows)
    advisor = Advisor(load_snapshot(store, cis=False))
    assert ("reasoning", "avgpool", "product") not in advisor.snapshot.laws
    assert all(c.llm != "ghost" for c in advisor.snapshot.candidates)
    assert advisor.optimal(1e10, 0, "reasoning")["compressor"] == "qformer"
    with pytest.raises(BadRequest, match="accepted values are qformer"):
        advisor.optimal(1e10, 0, "reasoning", "avgpool")
    with pytest.raises(BadRequest, match="accepted forms for it are product"):
        advisor.optimal(1e10, 0, "ocr", form="sum")


def test_laws_fingerprint_changes_on_refit(tmp_path):
    store = Store.open(str(tmp_path / "s"))
    assert laws_fingerprint(store) == () and load_snapshot(store) is None
    store.write_laws(GRID, law_rows(GRID, 0.2, datetime.now(timezone.utc)))
    first = laws_fingerprint(store)
    assert [g for g, *_ in first] == [GRID] and laws_fingerprint(store, GRID) == first
    store.write_laws(GRID, law_rows(GRID, 0.3, datetime.now(timezone.utc)))
    assert laws_fingerprint(store) != first


def test_laws_fingerprint_on_s3(s3_endpoint):
    store = Store.open("s3://tokenscale/serve")
    assert laws_fingerprint(store) == ()
    write_results(store)
    assert laws_fingerprint(store) == ()  # results but no laws yet
    store.write_laws(GRID, law_rows(GRID, 0.2, datetime.now(timezone.utc)))
    first = laws_fingerprint(store)
    assert [g for g, *_ in first] == [GRID] and laws_fingerprint(store, GRID) == first
    store.write_laws(GRID, law_rows(GRID, 0.35, datetime.now(timezone.utc)))
    assert laws_fingerprint(store) != first
    snapshot = load_snapshot(store, cis=False)
    assert snapshot.grid == GRID and len(snapshot.candidates) == 32
    assert Advisor(snapshot).optimal(1e10, 0, "ocr")["predicted_error_lo"] is None  # no CI asked


# ---- over HTTP -----------------------------------------------------------------------------------


def test_every_endpoint_over_http(served, advisor, store):
    from tokenscale.serve.app import fingerprint_id

    url, *_ = served
    health = get(url, "/healthz")
    assert health.status_code == 200, health.text
    assert health.json() | {"loaded_at": None} == {
        "status": "ok", "ready": True, "grid": GRID, "fitted_at": advisor.snapshot.fitted_at, "loaded_at": None,
        "laws_fingerprint": fingerprint_id(laws_fingerprint(store, GRID)), "reload_seconds": RELOAD_SECONDS,
        "last_reload_error": None,
    }

    # the report page at /: HTML whose data are the laws served
    page = get(url, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:300]
    data = report_payload(page.text)
    assert (data["grid"], data["fitted_at"], len(data["laws"])) == (GRID, advisor.snapshot.fitted_at, len(advisor.laws()["laws"]))

    answer = get(url, "/optimal", flops=2e9, text_tokens=16, task="reasoning")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # the HTTP answer is the Advisor's, number for number (JSON floats round-trip exactly)
    assert body == advisor.optimal(2e9, 16.0, "reasoning")
    assert {"llm", "llm_params", "visual_tokens", "compressor", "predicted_error", "predicted_error_lo",
            "predicted_error_hi", "optimal_visual_tokens", "optimal_llm_params", "ci_level"} <= set(body)
    assert body["predicted_error_lo"] <= body["predicted_error_hi"] and body["flops"] <= 2e9
    one = get(url, "/optimal", flops=2e9, task="ocr", compressor="qformer", form="sum").json()
    assert one["compressor"] == "qformer" and one["form"] == "sum"

    front = get(url, "/frontier", task="ocr", text_tokens=0)
    assert front.status_code == 200, front.text
    points = front.json()["points"]
    assert points and [p["flops"] for p in points] == sorted(p["flops"] for p in points)
    errors = [p["predicted_error"] for p in points]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == len(errors)

    laws = get(url, "/laws").json()
    assert laws["grid"] == GRID and len(laws["laws"]) == 8
    assert all(law["alpha_lo"] <= law["alpha"] + 1e-9 and law["alpha_hi"] is not None for law in laws["laws"])

    trials = get(url, "/trials", task="ocr", top=5).json()
    assert len(trials["trials"]) == 5 and trials["trials"] == advisor.trials("ocr", 5)["trials"]

    spec = get(url, "/openapi.json").json()
    assert {"/optimal", "/frontier", "/laws", "/trials", "/healthz"} <= set(spec["paths"])
    assert get(url, "/docs").status_code == 200
    assert get(url, "/noop").status_code == 404  # the benchmark's no-op is the benchmark's own route


BAD = [
    # (path, params, status, words the message must contain)
    ("/optimal", {}, 422, ["flops", "Field required", "e.g. 2e12"]),
    ("/optimal", {"flops": -5}, 422, ["flops", "greater than 0"]),
    ("/optimal", {"flops": 0}, 422, ["flops", "greater than 0"]),
    ("/optimal", {"flops": ""}, 422, ["flops", "valid number"]),
    ("/optimal", {"flops": "lots"}, 422, ["flops", "valid number"]),
    ("/optimal", {"flops": "nan"}, 422, ["flops", "finite"]),
    ("/optimal", {"flops": "inf"}, 422, ["flops", "finite"]),
    ("/optimal", {"flops": "1e400"}, 422, ["flops", "finite"]),
    ("/optimal", {"flops": "1e31"}, 422, ["flops", "less than or equal"]),
    ("/optimal", {"flops": "[1]"}, 422, ["flops"]),
    ("/optimal", {"flops": 2e9, "text_tokens": -1}, 422, ["text_tokens", "greater than or equal to 0"]),
    ("/optimal", {"flops": 2e9, "text_tokens": "1e300"}, 422, ["text_tokens", "less than or equal"]),
    ("/optimal", {"flops": 2e9, "text_tokens": "ten"}, 422, ["text_tokens"]),
    ("/optimal", {"flops": 2e9, "form": "cubic"}, 422, ["form", "product or sum"]),
    ("/optimal", {"flops": 2e9, "task": "poetry"}, 400, ["unknown task 'poetry'", "ocr, reasoning"]),
    ("/optimal", {"flops": 2e9, "task": ""}, 400, ["unknown task ''", "ocr, reasoning"]),
    ("/optimal", {"flops": 2e9, "task": "x" * 500}, 422, ["task", "at most 100"]),
    ("/optimal", {"flops": 2e9, "compressor": "resampler"}, 400, ["unknown compressor 'resampler'", "avgpool, qformer"]),
    ("/optimal", {"flops": 1e3}, 400, ["below the cheapest candidate's cost", "give at least"]),
    ("/optimal", {"flops": 5e-324}, 400, ["below the cheapest candidate's cost"]),
    ("/frontier", {"task": "poetry"}, 400, ["unknown task", "ocr, reasoning"]),
    ("/frontier", {"task": "ocr", "text_tokens": "nan"}, 422, ["text_tokens", "finite"]),
    ("/frontier", {"task": "ocr", "compressor": "nope"}, 400, ["unknown compressor"]),
    ("/trials", {"task": "poetry"}, 400, ["unknown task", "ocr, reasoning"]),
    ("/trials", {"task": "ocr", "top": 0}, 422, ["top", "greater than or equal to 1"]),
    ("/trials", {"task": "ocr", "top": 1000}, 422, ["top", "less than or equal to 100"]),
    ("/trials", {"task": "ocr", "top": "1.5"}, 422, ["top", "integer"]),
    ("/nowhere", {}, 404, ["Not Found", "/optimal"]),
]


@pytest.mark.parametrize(("path", "params", "status", "words"), BAD, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_is_a_4xx_with_a_json_message(served, path, params, status, words):
    url, *_ = served
    response = get(url, path, **params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    for word in words:
        assert word in message, message


def test_wrong_method_and_unknown_params(served):
    url, *_ = served
    response = requests.post(f"{url}/optimal", params={"flops": 2e9}, timeout=30)
    assert response.status_code == 405 and "GET /optimal" in response.json()["error"]
    # unknown query parameters are ignored, not errors
    assert get(url, "/optimal", flops=2e9, sql="drop table laws").status_code == 200


def advisor_says(advisor: Advisor, path: str, query: dict) -> tuple[int, object]:
    """What the Advisor, in process and on the same laws, makes of a schema-valid request:
    (200, its answer) or (400, its message). The oracle for the fuzz run's valid requests."""
    q = {k: (v[-1] if isinstance(v, list) else v) for k, v in (query or {}).items()}

    def number(name: str, default: float) -> float:
        return float(q[name]) if name in q else default

    try:
        if path == "/optimal":
            return 200, advisor.optimal(float(q["flops"]), number("text_tokens", 0.0), q.get("task", "reasoning"),
                                        q.get("compressor"), q.get("form", "product"), number("generated_tokens", 0.0))
        if path == "/frontier":
            return 200, advisor.frontier(q.get("task", "reasoning"), number("text_tokens", 0.0), q.get("compressor"),
                                         q.get("form", "product"), number("generated_tokens", 0.0))
        if path == "/trials":
            return 200, advisor.trials(q.get("task", "reasoning"), int(q.get("top", 10)))
        if path == "/laws":
            return 200, advisor.laws()
        return 200, None  # /healthz: its body changes (loaded_at), its schema is checked
    except BadRequest as err:
        return 400, str(err)


def test_fuzz_openapi_4xx_invalid_200_valid(served, advisor):
    """Schemathesis generates requests from /openapi.json. Invalid ones (negative mode)
    must get a 4xx; valid ones (positive mode) must get 200 with the Advisor's own answer
    whenever the laws can answer them, else the Advisor's own 400 (a task or compressor
    the laws do not have, a budget below the cheapest candidate: a string or a number the
    schema cannot rule out); a 200 matches its response schema. No request gets a 5xx,
    and every answer is a JSON body."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    url, *_ = served
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    declared = {path: {p["name"] for p in item["get"].get("parameters", [])}
                for path, item in get(url, "/openapi.json").json()["paths"].items()}
    session = requests.Session()
    seen: dict[str, Counter[int]] = {"positive": Counter(), "negative": Counter()}

    def fuzzer(mode: GenerationMode):
        @settings(max_examples=90, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def fuzz(case):
            response = case.call(base_url=url, session=session, timeout=30)
            seen[mode.value][response.status_code] += 1
            curl = case.as_curl_command()
            assert response.status_code < 500, (curl, response.text)
            body = response.json()  # every answer, error or not, is JSON
            if mode is GenerationMode.NEGATIVE:
                unknown = set(case.query or {}) - declared[case.operation.path]
                if response.status_code == 200 and unknown:
                    # invalid only by a parameter the API does not have: ignored by design,
                    # so the answer is the one to the declared parameters alone
                    known = {k: v for k, v in case.query.items() if k not in unknown}
                    assert advisor_says(advisor, case.operation.path, known)[0] == 200, curl
                    return
                assert 400 <= response.status_code < 500, (curl, response.status_code, body)
                assert body["error"], body
                return
            status, expected = advisor_says(advisor, case.operation.path, case.query)
            assert response.status_code == status, (curl, response.status_code, body, expected)
            if status == 400:
                assert body == {"error": expected}, (curl, body)
            else:
                case.validate_response(response)
                if expected is not None:
                    assert body == expected, curl

        return fuzz

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        fuzzer(mode)()
    print(f"fuzz: status counts {seen}")
    positive, negative = seen["positive"], seen["negative"]
    assert 30 <= sum(positive.values()) <= 200 and 30 <= sum(negative.values()) <= 200, seen
    assert positive[200] >= 10 and {422} <= set(negative), seen


def test_hot_reload_without_restart(served):
    """A store with no laws answers 404 (not 503); results and laws written later are
    served within a bound, and so is a refit with different parameters."""
    _, url, pending = served
    health = get(url, "/healthz")
    assert health.status_code == 200 and not health.json()["ready"]
    for path, params in (("/optimal", {"flops": 1e10}), ("/frontier", {}), ("/laws", {}), ("/trials", {}), ("/", {})):
        response = get(url, path, **params)
        assert response.status_code == 404 and "tokenscale fit" in response.json()["error"], response.text

    bound = RELOAD_SECONDS + 15.0  # one poll plus the load, with room for a busy 2-core machine
    write_results(pending, grid="late")
    pending.write_laws("late", law_rows("late", 0.2, datetime(2026, 1, 1, tzinfo=timezone.utc)))
    started = time.monotonic()
    while (answer := get(url, "/laws")).status_code != 200:
        assert time.monotonic() - started < bound, f"laws not served after {bound}s: {answer.text}"
        time.sleep(0.1)
    assert {law["alpha"] for law in answer.json()["laws"]} == {0.2}
    before = get(url, "/optimal", flops=1e10, task="ocr").json()

    pending.write_laws("late", law_rows("late", 0.45, datetime(2026, 1, 2, tzinfo=timezone.utc)))
    started = time.monotonic()
    while {law["alpha"] for law in get(url, "/laws").json()["laws"]} != {0.45}:
        assert time.monotonic() - started < bound, "the refit was not served in time"
        time.sleep(0.1)
    after = get(url, "/optimal", flops=1e10, task="ocr").json()
    # the report page is rebuilt with the laws
    assert {law["alpha"] for law in report_payload(get(url, "/").text)["laws"]} == {0.45}
    assert after["fitted_at"] > before["fitted_at"]
    assert not math.isclose(after["predicted_error"], before["predicted_error"])
    assert get(url, "/healthz").json()["fitted_at"].startswith("2026-01-02")


# ---- in process, without Ray: our faults are 5xx, a store outage keeps the last good laws ------


def asgi_get(app, path: str, **params) -> tuple[int, dict]:
    """GET through the ASGI app in this process (no server, no Ray): (status, JSON body)."""
    messages: list[dict] = []
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": urlencode(params).encode(), "root_path": "",
        "headers": [(b"host", b"in-process")], "client": ("127.0.0.1", 1), "server": ("in-process", 80),
    }

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        messages.append(message)

    try:
        asyncio.run(app(scope, receive, send))
    except Exception:  # Starlette re-raises what its 500 handler answered, after answering it
        pass
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return status, json.loads(body)


class LogRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def serve_log():
    import tokenscale.serve.app  # noqa: F401  (Ray Serve sets its logger up on import: after that)

    handler = LogRecords()
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def wait_for(condition, bound: float, what: str):
    started = time.monotonic()
    while not (result := condition()):
        assert time.monotonic() - started < bound, f"{what} not seen after {bound}s"
        time.sleep(0.1)
    return result


def test_unexpected_error_is_a_500_naming_our_fault(store, monkeypatch, serve_log):
    """The Advisor raising something nobody expected (a bug) is a 500 whose message says it
    is the service's error, not the request's, with the exception's type and message; the
    log has the traceback. A 4xx stays a 4xx, and the other endpoints keep answering."""
    from tokenscale.serve.advisor import Advisor as ServeAdvisor
    from tokenscale.serve.app import Replica, build_api

    replica = Replica(store.uri, GRID, reload_seconds=60, poll=False)
    api = build_api(replica)
    assert asgi_get(api, "/optimal", flops=2e9, task="ocr")[0] == 200

    def broken(self, *args, **kwargs):
        raise KeyError("candidate index out of sync")

    monkeypatch.setattr(ServeAdvisor, "optimal", broken)
    status, body = asgi_get(api, "/optimal", flops=2e9, task="ocr")
    assert status == 500, body
    assert "internal error in tokenscale, not a problem with the request" in body["error"]
    assert "KeyError" in body["error"] and "candidate index out of sync" in body["error"]
    logged = [r for r in serve_log if r.levelno >= logging.ERROR and r.exc_info]
    assert logged and logged[-1].exc_info[0] is KeyError, "the traceback is logged"
    assert asgi_get(api, "/optimal", flops=-1)[0] == 422  # invalid input is still the caller's
    assert asgi_get(api, "/laws")[0] == 200

    # an answer JSON cannot carry is ours too (it used to be relabelled a 400)
    monkeypatch.setattr(ServeAdvisor, "laws", lambda self: {"grid": GRID, "fitted_at": object(), "laws": []})
    status, body = asgi_get(api, "/laws")
    assert status == 500 and "TypeError" in body["error"], body


def test_store_unreadable_before_any_load_is_a_503(monkeypatch):
    """No laws loaded because the store cannot be reached: 503 with the store and the
    cause (our fault, retried), not the 404 of a store that simply has no laws yet."""
    from tokenscale.serve.app import Replica, build_api

    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    replica = Replica("s3://tokenscale/unreachable", GRID, reload_seconds=60, poll=False)
    api = build_api(replica)
    status, health = asgi_get(api, "/healthz")
    assert status == 200 and not health["ready"] and health["status"] == "degraded"
    assert "StoreError" in health["last_reload_error"] and "s3://tokenscale/unreachable" in health["last_reload_error"]
    for path, params in (("/optimal", {"flops": 1e10}), ("/laws", {}), ("/trials", {})):
        status, body = asgi_get(api, path, **params)
        assert status == 503, body
        assert "s3://tokenscale/unreachable" in body["error"] and "could not connect" in body["error"].lower()


def stop_proxy(proxy: TcpProxy) -> None:
    """`proxy.stop()`, with its listening socket shut down first: on Linux, closing a socket
    does not wake the thread blocked in accept(), which would let one more connection through."""
    if proxy._server is not None:
        try:
            proxy._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    proxy.stop()


def write_laws_directly(endpoint: str, store: Store, rows: list[dict]) -> None:
    """A refit landing while the replica cannot see the store: one PUT straight to moto."""
    import boto3

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=LAW_SCHEMA), buffer)
    bucket, key = store.laws_key(GRID)[len("s3://"):].split("/", 1)
    boto3.client("s3", endpoint_url=endpoint).put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())


def test_store_down_keeps_the_last_good_laws_then_picks_up_new_ones(s3_endpoint, monkeypatch):
    """The replica's reload loop against an S3 store behind a proxy: with the proxy
    stopped, /healthz reports last_reload_error and every answer still comes from the
    last good laws; a refit written meanwhile is served once the store is back (same
    address), and the error clears."""
    from tokenscale.serve.app import Replica, build_api, fingerprint_id

    moto_port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = Store.open("s3://tokenscale/serve-down")
    write_results(store)
    store.write_laws(GRID, law_rows(GRID, 0.2, datetime(2026, 1, 1, tzinfo=timezone.utc)))
    replica = Replica(store.uri, GRID, reload_seconds=0.2, cis=False)
    back = TcpProxy(moto_port, port=proxy.port)
    try:
        api = build_api(replica)
        status, health = asgi_get(api, "/healthz")
        first = fingerprint_id(laws_fingerprint(store, GRID))
        assert status == 200 and health["ready"] and health["laws_fingerprint"] == first and not health["last_reload_error"]
        before = asgi_get(api, "/optimal", flops=1e10, task="ocr")
        assert before[0] == 200

        stop_proxy(proxy)  # the store is down
        health = wait_for(lambda: (h := asgi_get(api, "/healthz")[1])["last_reload_error"] and h, 30, "a failed reload")
        assert health["ready"] and health["status"] == "degraded" and health["laws_fingerprint"] == first
        assert "StoreError" in health["last_reload_error"] and store.uri in health["last_reload_error"]
        assert asgi_get(api, "/optimal", flops=1e10, task="ocr") == before  # the last good laws
        assert {law["alpha"] for law in asgi_get(api, "/laws")[1]["laws"]} == {0.2}

        write_laws_directly(s3_endpoint, store, law_rows(GRID, 0.45, datetime(2026, 1, 2, tzinfo=timezone.utc)))
        time.sleep(1.0)  # several polls while it is down: still the old laws
        assert {law["alpha"] for law in asgi_get(api, "/laws")[1]["laws"]} == {0.2}

        back.start()  # the store returns at the same address
        wait_for(lambda: {law["alpha"] for law in asgi_get(api, "/laws")[1]["laws"]} == {0.45}, 30, "the refit")
        health = wait_for(lambda: (h := asgi_get(api, "/healthz")[1])["last_reload_error"] is None and h, 30, "a clean reload")
        assert health["status"] == "ok" and health["fitted_at"].startswith("2026-01-02")
        assert health["laws_fingerprint"] == fingerprint_id(laws_fingerprint(store, GRID)) != first
        after = asgi_get(api, "/optimal", flops=1e10, task="ocr")
        assert after[0] == 200 and not math.isclose(after[1]["predicted_error"], before[1]["predicted_error"])
    finally:
        replica.close()
        stop_proxy(proxy)
        stop_proxy(back)


def test_unreadable_laws_object_keeps_the_last_good_laws(tmp_path, serve_log):
    """A laws object that is not parquet (cut short, overwritten by something else) is a
    failed reload, not a crash: the last good laws stay served, healthz says what failed."""
    from tokenscale.serve.app import Replica, build_api

    store = Store.open(str(tmp_path / "s"))
    write_results(store)
    store.write_laws(GRID, law_rows(GRID, 0.2, datetime(2026, 1, 1, tzinfo=timezone.utc)))
    replica = Replica(store.uri, GRID, reload_seconds=60, cis=False, poll=False)
    api = build_api(replica)
    store.put_bytes(store.laws_key(GRID), b"not parquet")
    assert replica.reload() is False
    status, health = asgi_get(api, "/healthz")
    assert health["ready"] and "could not read" in health["last_reload_error"] and store.laws_key(GRID) in health["last_reload_error"]
    assert {law["alpha"] for law in asgi_get(api, "/laws")[1]["laws"]} == {0.2}
    store.write_laws(GRID, law_rows(GRID, 0.3, datetime(2026, 1, 3, tzinfo=timezone.utc)))
    assert replica.reload() is True and asgi_get(api, "/healthz")[1]["last_reload_error"] is None
    assert {law["alpha"] for law in asgi_get(api, "/laws")[1]["laws"]} == {0.3}


def test_no_form_asked_answers_with_the_form_the_fit_prefers(advisor, store):
    """/optimal and /frontier without `form`: the form the fit marks better (lower holdout
    error) for most of the task's compressors; asking for a form still gets that form."""
    laws = store.read_laws(GRID).to_pylist()
    for task in ("reasoning", "ocr"):
        votes = {}
        for row in laws:
            if row["task_family"] == task and row["preferred"]:
                votes[row["form"]] = votes.get(row["form"], 0) + 1
        preferred = max(("product", "sum"), key=lambda form: (votes.get(form, 0), form == "product"))
        assert advisor.snapshot.preferred_form(task) == preferred
        flops = 1e15
        assert advisor.optimal(flops, 0.0, task)["form"] == preferred
        assert advisor.frontier(task)["form"] == preferred
        for form in ("product", "sum"):
            assert advisor.optimal(flops, 0.0, task, form=form)["form"] == form
