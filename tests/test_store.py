"""The storage contract: one object per trial, keyed by config hash, written whole."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from tokenscale.sql import ReadOnlyError, query
from tokenscale.store import CURVE_SCHEMA, RESULT_SCHEMA, Store, resolve_store


def rows(config_hash: str, n: int = 2, score: float = 0.5) -> list[dict]:
    base = {f.name: None for f in RESULT_SCHEMA}
    return [
        base | {
            "grid": "g", "trial_id": f"t-{config_hash}", "config_hash": config_hash, "llm": "xs",
            "llm_params": 1000, "visual_tokens": 4, "compressor": "avgpool", "seed": 0,
            "benchmark": f"b{i}", "task_family": "reasoning", "score": score, "error": 1 - score,
            "n_examples": 10, "finished_at": datetime.now(timezone.utc),
        }
        for i in range(n)
    ]


def test_resolve_store_defaults_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TOKENSCALE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_store(None) == str(tmp_path / "tokenscale-store")
    monkeypatch.setenv("TOKENSCALE_STORE", "s3://bucket/some/prefix/")
    assert resolve_store(None) == "s3://bucket/some/prefix"
    assert resolve_store(str(tmp_path / "x")) == str(tmp_path / "x")
    with pytest.raises(ValueError, match="bucket"):
        resolve_store("s3://")
    with pytest.raises(ValueError, match="s3://bucket/prefix or a local directory"):
        resolve_store("gs://bucket")


def test_rewrite_overwrites_same_key_no_duplicates(tmp_path):
    store = Store.open(str(tmp_path))
    key = store.write_results("g", "avgpool", "abc", rows("abc", score=0.2))
    assert key.endswith("g/results/grid=g/compressor=avgpool/abc.parquet")
    store.write_results("g", "avgpool", "abc", rows("abc", score=0.7))  # retried trial
    store.write_results("g", "avgpool", "def", rows("def"))
    table = store.read_results("g")
    assert table.num_rows == 4
    assert sorted(table["score"].to_pylist()) == [0.5, 0.5, 0.7, 0.7]
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file may be left behind"
    assert store.has_result("g", "avgpool", "abc") and not store.has_result("g", "avgpool", "zzz")
    columns, result = query(store, "select count(*), count(distinct config_hash) from results")
    assert result == [(4, 2)]


def test_empty_store_has_typed_views(tmp_path):
    store = Store.open(str(tmp_path / "empty"))
    columns, result = query(store, "select count(*) from results")
    assert result == [(0,)]
    columns, _ = query(store, "select * from laws")
    assert {"alpha", "beta", "holdout_error", "form"} <= set(columns)
    columns, result = query(store, "select *, step + 1 as next, loss * 2 as double from curves")
    assert columns[: len(CURVE_SCHEMA)] == CURVE_SCHEMA.names and result == []
    assert store.read_curves("g").schema == CURVE_SCHEMA and store.read_curves("g").num_rows == 0


def curve(config_hash: str, steps: list[tuple[int, int]], loss: float = 1.0) -> list[dict]:
    return [
        {"grid": "g", "trial_id": f"t-{config_hash}", "config_hash": config_hash, "llm": "xs", "visual_tokens": 4,
         "compressor": "avgpool", "seed": 0, "stage": stage, "step": step, "steps": 30 if stage == 1 else 150,
         "loss": loss / step, "elapsed_seconds": float(step)}
        for stage, step in steps
    ]


def test_curves_beside_results_one_object_per_trial(tmp_path):
    """A trial's curve is its own object outside results/ (whose glob reads every parquet
    as result rows); a retried trial overwrites it; `curves` is a view like `results`."""
    store = Store.open(str(tmp_path))
    key = store.write_curve("g", "avgpool", "abc", curve("abc", [(1, 10), (1, 20)], loss=9.0))
    assert key == store.curve_key("g", "avgpool", "abc")
    assert key.endswith("g/curves/grid=g/compressor=avgpool/abc.parquet") and "/results/" not in key
    store.write_curve("g", "avgpool", "abc", curve("abc", [(1, 10), (1, 20), (1, 30), (2, 10)]))  # retried
    store.write_curve("g", "avgpool", "def", curve("def", [(1, 10)]))
    store.write_results("g", "avgpool", "abc", rows("abc"))
    table = store.read_curves("g")
    assert table.schema == CURVE_SCHEMA and table.num_rows == 5
    assert store.read_results("g").num_rows == 2, "curves are no result rows"
    assert query(store, "select count(*) from results")[1] == [(2,)]
    _, result = query(store, "select config_hash, stage, step, steps, loss from curves order by all")
    assert result == [("abc", 1, 10, 30, 0.1), ("abc", 1, 20, 30, 0.05), ("abc", 1, 30, 30, 1 / 30),
                      ("abc", 2, 10, 150, 0.1), ("def", 1, 10, 30, 0.1)]
    assert store.curves_glob("g") == store.join("g", "curves", "**", "*.parquet")


def test_sql_is_read_only_by_default(tmp_path):
    store = Store.open(str(tmp_path))
    store.write_results("g", "avgpool", "abc", rows("abc"))
    target = tmp_path / "out.csv"
    with pytest.raises(ReadOnlyError, match="--write"):
        query(store, f"copy (select 1) to '{target}'")
    assert not target.exists()
    with pytest.raises(ReadOnlyError, match="exactly one"):
        query(store, "select 1; select 2")


def test_s3_store_roundtrip_and_duckdb(s3_endpoint):
    store = Store.open("s3://tokenscale/runs")
    store.write_results("g", "avgpool", "abc", rows("abc"))
    store.write_results("g", "avgpool", "abc", rows("abc", score=0.9))
    store.write_results("g", "avgpool", "def", rows("def", n=3))
    assert store.has_result("g", "avgpool", "abc")
    assert store.grids() == ["g"]
    columns, result = query(store, "select count(*), count(distinct config_hash), max(score) from results")
    assert result == [(5, 2, 0.9)]
