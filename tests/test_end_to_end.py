"""The whole path for real: Ray Tune -> Ray Train + DeepSpeed -> parquet in S3 (moto) ->
DuckDB over s3:// -> fit -> Ray Serve over HTTP. `ray job submit -- tokenscale run` is
tests/test_job_submit.py's."""

from __future__ import annotations

import pytest
import ray
import requests
from conftest import ChartCounter, free_port, png_size, render_page, tiny_grid

from tokenscale.config import parse_grid
from tokenscale.fitting.grid_fit import fit_grid
from tokenscale.orchestrator.driver import init_ray, run_grid
from tokenscale.sql import query
from tokenscale.store import Store

pytestmark = pytest.mark.slow


@pytest.fixture
def local_ray(tmp_path):
    init_ray()
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def test_grid_to_s3_to_duckdb_to_fit_to_serve(s3_endpoint, local_ray, tmp_path):
    spec = tiny_grid("e2e", llms=3, visual_tokens=(1, 16))
    spec["train"]["report_every"] = 1  # every step on the loss curve: stage 1's 2 and stage 2's 4
    grid = parse_grid(spec)
    store = Store.open("s3://tokenscale/e2e-store")

    # Ray's experiment state goes beside the results, on S3 too
    summary = run_grid(grid, store, verbose=0)
    assert summary.errored == 0 and summary.finished == 6, summary
    import boto3

    listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="tokenscale", Prefix="e2e-store/e2e/tune/")
    assert any("experiment_state-" in o["Key"] for o in listing.get("Contents", [])), "Tune's state is on S3"

    # DuckDB reads the parquet straight from the S3 endpoint (httpfs loaded offline)
    _, rows = query(store, "select count(*), count(distinct config_hash), min(score), max(score) from results")
    count, hashes, low, high = rows[0]
    assert count == 6 * 2 and hashes == 6
    assert 0.0 <= low <= high <= 1.0
    _, rows = query(store, "select distinct llm_params from results order by 1")
    assert len(rows) == 3 and rows[0][0] < rows[-1][0]

    # a rerun finds every result in the store and starts nothing
    again = run_grid(grid, store, verbose=0)
    assert again.already_done == 6 and again.finished == 0
    _, rows = query(store, "select count(*) from results")
    assert rows[0][0] == 12

    laws, _skipped = fit_grid(store, "e2e")
    assert {(r["task_family"], r["form"]) for r in laws} >= {("reasoning", "product"), ("ocr", "product")}
    _, rows = query(store, "select count(*) from laws where grid = 'e2e' and form = 'product'")
    assert rows[0][0] == 2

    from tokenscale.orchestrator.status import grid_status
    from tokenscale.serve.app import start

    url = start(store.uri, "e2e", "127.0.0.1", free_port(), reload_seconds=1.0, trial_status=grid_status)
    assert requests.get(f"{url}/healthz", timeout=30).json()["grid"] == "e2e"

    # the report page of these real trials, over HTTP, in headless Chromium: Figure 1 per
    # family with a series per LLM and the frontier, alpha-beta, every trial's loss curve
    page = requests.get(f"{url}/", timeout=60)
    assert page.status_code == 200, page.text[:500]
    (tmp_path / "report.html").write_text(page.text)
    rendered = render_page(tmp_path / "report.html", tmp_path)
    assert rendered.console == [], rendered.console
    charts = ChartCounter(rendered.dom).series
    assert {k: v for k, v in charts.items() if k.startswith("fig1-")} == {
        f"fig1-{family}-q{q}": 3 + 1 for family in ("ocr", "reasoning") for q in (0, 50)}
    assert charts["alpha-beta"] == 1 + 1
    assert sorted(v for k, v in charts.items() if k.startswith("curve-")) == [2] * 6
    assert rendered.dom.count('class="status done"') == 6
    assert png_size(rendered.screenshot) == (1280, 2400) and rendered.screenshot.stat().st_size > 50_000
    _, rows = query(store, "select count(*), count(distinct config_hash) from curves")
    assert rows[0] == (6 * (2 + 4), 6)
    _, rows = query(store, "select max(inference_flops) from results where task_family = 'reasoning'")
    answer = requests.get(f"{url}/optimal", params={"flops": rows[0][0] * 10, "text_tokens": 0, "task": "reasoning"}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert {"llm", "llm_params", "visual_tokens", "compressor", "predicted_error"} <= set(body)
    # the decision's certainty over HTTP: the share of the stored draws choosing it, and the rival
    assert 0.0 <= body["p_optimal"] <= 1.0 and body["p_optimal"] == body["optimal_share"]
    assert body["runner_up"] is None or (
        body["runner_up"]["visual_tokens"], body["runner_up"]["llm"]) != (body["visual_tokens"], body["llm"])
    assert body["runner_up"] is None or 0.0 <= body["runner_up_p_optimal"] <= 1.0 - body["p_optimal"] + 1e-9
    assert body["compressor"] == "avgpool" and body["visual_tokens"] in (1, 16)
    bad = requests.get(f"{url}/optimal", params={"flops": 1, "task": "reasoning"}, timeout=30)
    assert bad.status_code == 400 and "cheapest candidate" in bad.json()["error"]
    bad = requests.get(f"{url}/optimal", params={"flops": 1e12, "task": "poetry"}, timeout=30)
    assert bad.status_code == 400 and "reasoning" in bad.json()["error"]


def test_query_based_compressors_run_through_real_trials(local_ray, tmp_path):
    """tokenpacker and quecc (which needs the LM's question embedding) train and evaluate
    in a Ray Train worker group + DeepSpeed like avgpool does in-trial."""
    grid = parse_grid(tiny_grid(
        "compressors", llms=1, visual_tokens=(4,), compressors=["tokenpacker", "quecc"],
        resources={"workers": 1, "cpus_per_worker": 1, "execution": "workers"},
    ))
    store = Store.open(str(tmp_path / "store"))
    summary = run_grid(grid, store, verbose=0)
    assert summary.errored == 0 and summary.finished == 2, summary
    _, rows = query(store, "select compressor, count(*), min(compressor_params), min(compressor_flops) from results group by 1 order by 1")
    assert [r[0] for r in rows] == ["quecc", "tokenpacker"]
    assert all(r[1] == 2 and r[2] > 0 and r[3] > 0 for r in rows)
