"""The report page (`tokenscale report`, serve/report.py) on a fitted synthetic grid: its
numbers are the Advisor's and the store's, and it renders in headless Chromium with no
console output, one chart per figure and the right number of series in each.
`GET /` over HTTP and the page of a grid of real trials are in test_serve.py and
test_end_to_end.py."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ChartCounter, png_size, render_page
from synthetic import write_synthetic_results

from tokenscale.cli import main
from tokenscale.fitting.grid_fit import fit_grid
from tokenscale.orchestrator.status import TrialStatus
from tokenscale.serve.advisor import Advisor, load_snapshot
from tokenscale.serve.report import QUERY_LENGTHS, build_report, report_data
from tokenscale.store import Store

GRID = "rep"
LLMS = {"xs": 1_000_000, "s": 4_000_000, "m": 16_000_000}
TOKENS = (1, 4, 16)
TRUTH = {
    ("reasoning", "avgpool"): (0.6, 0.20, 0.08, 0.15),
    ("reasoning", "quecc"): (0.5, 0.15, 0.20, 0.18),
    ("ocr", "avgpool"): (0.7, 0.10, 0.30, 0.10),
    ("ocr", "quecc"): (0.7, 0.12, 0.15, 0.12),
}
BENCHMARKS = {"reasoning": ["count", "color"], "ocr": ["digits"]}
TRIALS = len(LLMS) * len(TOKENS) * 2


def curve_rows(config_hash: str, compressor: str) -> list[dict]:
    """A trial's curve as the trainer stores it: stage 1 (4 steps), stage 2 (6 steps)."""
    llm, v, _ = config_hash.split("-")
    return [{"grid": GRID, "trial_id": f"t-{config_hash}", "config_hash": config_hash, "llm": llm,
             "visual_tokens": int(v), "compressor": compressor, "seed": 0, "stage": stage, "step": step,
             "steps": steps, "loss": 2.0 / (stage + step), "elapsed_seconds": float(step)}
            for stage, steps in ((1, 4), (2, 6)) for step in range(1, steps + 1)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store.open(str(tmp_path_factory.mktemp("report-store")))
    write_synthetic_results(store, GRID, LLMS, TOKENS, TRUTH, BENCHMARKS)
    rows, skipped = fit_grid(store, GRID, resamples=40)
    assert len(rows) == 8 and not skipped, skipped
    for compressor in ("avgpool", "quecc"):
        for llm in LLMS:
            config_hash = f"{llm}-4-{compressor}"  # one V per (LLM, compressor) has a stored curve
            store.write_curve(GRID, compressor, config_hash, curve_rows(config_hash, compressor))
    return store


@pytest.fixture(scope="module")
def advisor(store) -> Advisor:
    return Advisor(load_snapshot(store, GRID))


def test_figures_are_the_advisors_numbers(store, advisor):
    data = report_data(store, GRID, advisor)
    assert [f["name"] for f in data["families"]] == ["ocr", "reasoning"]
    for family in data["families"]:
        assert family["form"] == advisor.snapshot.preferred_form(family["name"])
        assert [c["id"] for c in family["charts"]] == [f"fig1-{family['name']}-q{q:g}" for q in QUERY_LENGTHS]
        for q, chart in zip(QUERY_LENGTHS, family["charts"], strict=True):
            names = [s["name"] for s in chart["series"]]
            assert names == ["xs (N=1e+06)", "s (N=4e+06)", "m (N=1.6e+07)", "Pareto frontier"]
            for series in chart["series"][:-1]:
                points = [p for m in series["marks"] if m["type"] == "points" for p in m["data"]]
                lines = [m for m in series["marks"] if m["type"] == "line"]
                assert len(points) == len(TOKENS) * 2 and len(lines) == 2  # a law line per compressor
            # the frontier drawn is /frontier's, point for point
            frontier = advisor.frontier(task=family["name"], text_tokens=q, form=family["form"])["points"]
            drawn = next(m for m in chart["series"][-1]["marks"] if m["type"] == "step")["data"]
            assert [(p[0], p[1]) for p in drawn] == [(p["flops"], p["predicted_error"]) for p in frontier]
        # /optimal's table: the Advisor's answers at each budget
        assert len(family["optimal"]) == 6 * len(QUERY_LENGTHS)
        for row in family["optimal"]:
            answer = advisor.optimal(row["budget_flops"], text_tokens=row["text_tokens"], task=family["name"], form=family["form"])
            assert (row["llm"], row["visual_tokens"], row["compressor"]) == (answer["llm"], answer["visual_tokens"], answer["compressor"])
            assert row["predicted_error"] == pytest.approx(answer["predicted_error"])
            assert row["p_optimal"] == pytest.approx(answer["p_optimal"])
    assert len(data["laws"]) == 8 and {r["form"] for r in data["laws"]} == {"product", "sum"}
    assert [s["name"] for s in data["alpha_beta"]["series"]] == ["avgpool", "quecc", "α = β"]
    # the trials: every one done (no status given: those with results), scores per benchmark
    assert len(data["trials"]) == TRIALS and {t["status"] for t in data["trials"]} == {"done"}
    assert data["benchmarks"] == ["color", "count", "digits"]
    results = {(r["trial_id"], r["benchmark"]): r["score"] for r in store.read_results(GRID).to_pylist()}
    for t in data["trials"]:
        assert t["scores"] == {b: pytest.approx(results[(t["trial_id"], b)]) for b in data["benchmarks"]}
    with_curves = {t["trial_id"]: t["curve"] for t in data["trials"] if t["curve"]}
    assert len(with_curves) == len(LLMS) * 2
    curve = with_curves["t-s-4-quecc"]
    assert [s["name"] for s in curve["series"]] == ["stage 1", "stage 2"]
    assert [p[:2] for p in curve["series"][1]["marks"][0]["data"]] == [[float(s), 2.0 / (2 + s)] for s in range(1, 7)]


def test_trial_status_and_progress_come_from_the_caller(store, advisor):
    statuses = [TrialStatus("t-xs-1-avgpool", "xs", 1, "avgpool", 0, "done"),
                TrialStatus("t-new", "l", 16, "quecc", 0, "running"),
                TrialStatus("t-bad", "l", 1, "quecc", 0, "errored", "RuntimeError: boom")]
    data = report_data(store, GRID, advisor, [{**s.__dict__, "progress": "stage 2 3/6", "eta": "12s"} if s.status == "running"
                                              else s for s in statuses])
    by_id = {t["trial_id"]: t for t in data["trials"]}
    assert list(by_id) == ["t-xs-1-avgpool", "t-new", "t-bad"]
    assert by_id["t-new"]["progress"] == "stage 2 3/6" and by_id["t-new"]["eta"] == "12s"
    assert by_id["t-bad"]["error"] == "RuntimeError: boom" and by_id["t-bad"]["scores"] == {}
    assert by_id["t-xs-1-avgpool"]["scores"]["digits"] is not None


def test_an_unfitted_grid_still_shows_its_points_and_trials(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    write_synthetic_results(store, GRID, LLMS, TOKENS, TRUTH, BENCHMARKS)
    data = report_data(store, GRID, None)
    assert data["laws"] == [] and data["fitted_at"] is None
    for family in data["families"]:
        assert family["optimal"] == [] and family["form"] is None
        assert [s["name"] for s in family["charts"][0]["series"]] == ["xs (N=1e+06)", "s (N=4e+06)", "m (N=1.6e+07)"]
    assert len(data["trials"]) == TRIALS


def test_report_command_writes_one_page(store, tmp_path, capsys):
    assert main(["report", GRID, "--store", store.uri]) == 0
    assert capsys.readouterr().out.strip() == store.join(GRID, "report.html")
    out = tmp_path / "page.html"
    assert main(["report", GRID, "--store", store.uri, "--out", str(out)]) == 0
    page = out.read_text()
    # self-contained: no script, stylesheet or image from anywhere else
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)
    payload = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(payload)["grid"] == GRID
    assert main(["report", GRID, "--store", store.uri, "--out", str(tmp_path / "page.txt")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report", "never-run", "--store", store.uri]) == 2
    assert "tokenscale run" in capsys.readouterr().err


def test_page_renders_in_headless_chromium(store, advisor, tmp_path):
    """The page in a real browser: no console message or uncaught error, every chart drawn
    (two per task family, alpha-beta, one curve per trial that has one) with one series per
    LLM plus the frontier, and a screenshot of it."""
    page = tmp_path / "report.html"
    page.write_text(build_report(store, GRID, advisor))
    rendered = render_page(page, tmp_path)
    assert rendered.console == [], rendered.console
    assert not re.search(r"<html[^>]*data-errors=", rendered.dom)  # the page's own error hook saw none
    charts = ChartCounter(rendered.dom).series
    expected = {f"fig1-{f}-q{q:g}": len(LLMS) + 1 for f in ("ocr", "reasoning") for q in QUERY_LENGTHS}
    expected["alpha-beta"] = 2 + 1
    expected |= {f"curve-t-{llm}-4-{c}": 2 for llm in LLMS for c in ("avgpool", "quecc")}
    assert charts == expected
    assert f'data-rendered="{len(expected)}"' in rendered.dom
    # the tables: /optimal per family, the laws, the trials with a row each
    assert rendered.dom.count('<table class="optimal">') == 2 and '<table class="laws">' in rendered.dom
    assert rendered.dom.count('class="status done"') == TRIALS
    width, height = png_size(rendered.screenshot)
    assert (width, height) == (1280, 2400) and rendered.screenshot.stat().st_size > 50_000
