"""One trial without Ray: `python -m tokenscale.workers` (a world of one) and under torchrun
(a world of two, gloo), the same train loop the Ray Train workers run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, final_metrics, tiny_grid, worker_env

from tokenscale.config import GridError, TrialConfig, parse_grid
from tokenscale.costs import inference_flops
from tokenscale.store import RESULT_SCHEMA, Store

BIN = Path(sys.executable).parent
# runs the CLI, then fails (exit 3) if anything imported Ray into this process
NO_RAY = (
    "import sys; from tokenscale.workers.__main__ import main; rc = main(sys.argv[1:]); "
    "ray = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
    "print('ray modules:', ray, file=sys.stderr); sys.exit(3 if ray else rc)"
)


def _trial(train: dict | None = None, vision: dict | None = None, **llm) -> TrialConfig:
    raw = tiny_grid("cli", llms=1, visual_tokens=(4,), compressors=["quecc"])
    raw["llms"][0].update(llm)
    raw["train"].update(train or {})
    raw["vision"].update(vision or {})
    return parse_grid(raw).trials()[0]


def _env() -> dict[str, str]:
    return worker_env(OMP_NUM_THREADS="1")


def _counted(trial: TrialConfig) -> tuple[int, int]:
    from tokenscale.workers.benchmarks import VOCAB
    from tokenscale.workers.model import build_llm, non_embedding_params

    llm = build_llm(trial.llm, len(VOCAB))
    return sum(p.numel() for p in llm.parameters()), non_embedding_params(llm)


def _check_rows(rows: list[dict], trial: TrialConfig, llm_params: int, non_embedding: int) -> None:
    assert [r["benchmark"] for r in rows] == ["color", "digits"]
    assert set(rows[0]) == set(RESULT_SCHEMA.names)
    for row in rows:
        assert row["trial_id"] == trial.trial_id and row["config_hash"] == trial.config_hash
        assert row["llm_params"] == llm_params and row["llm_params_non_embedding"] == non_embedding
        assert row["n_examples"] == 32 and 0.0 <= row["score"] <= 1.0
        # quecc embeds the query with the LM: priced by the one cost function
        assert row["inference_flops"] == pytest.approx(
            inference_flops(llm_params, row["text_tokens_mean"], 4, row["generated_tokens"], compressor="quecc")
        )
        assert row["inference_flops"] > 2.0 * llm_params * (row["text_tokens_mean"] + 4 + row["generated_tokens"])


def test_workers_package_is_free_of_ray():
    pattern = re.compile(r"^\s*(import ray|from ray)", re.MULTILINE)
    offenders = [p.name for p in (REPO / "workers").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_one_trial_without_ray(tmp_path):
    trial = _trial()
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(trial.to_dict()))
    store = tmp_path / "store"
    run = subprocess.run(
        [sys.executable, "-c", NO_RAY, str(config), "--store", str(store), "--format", "jsonl"],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ray modules: []" in run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]  # stdout holds the rows only
    total, non_embedding = _counted(trial)
    assert total > non_embedding  # N counts the embeddings when no `params` is declared
    _check_rows(rows, trial, total, non_embedding)
    stored = Store.open(str(store)).read_results("cli").to_pylist()
    assert [(r["benchmark"], r["score"], r["inference_flops"]) for r in stored] == [
        (r["benchmark"], r["score"], r["inference_flops"]) for r in rows
    ]
    assert '"stage": 1' in run.stderr and '"resumed_from_stage": 0' in run.stderr

    # the table, without a store: nothing written
    again = subprocess.run(
        [sys.executable, "-m", "tokenscale.workers", str(config)],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    header, *lines = again.stdout.splitlines()
    assert header.split()[:3] == ["benchmark", "task_family", "score"] and len(lines) == 2
    assert not (tmp_path / "tokenscale-store").exists()


def test_torchrun_world_of_two(tmp_path):
    # global batch 16 = micro-batch 8 x 2 workers; LLaVA's projector (no per-worker BatchNorm)
    trial = _trial(train={"global_batch": 16}, vision={"token_norm": "none"}, params=5e5)  # a declared N is the rows' llm_params
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(trial.to_dict()))
    store = tmp_path / "store"
    run = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "tokenscale.workers",
         str(config), "--store", str(store), "--format", "jsonl"],
        capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for rank in (0, 1):  # both ranks trained through both stages
        assert re.search(rf"\[rank {rank}/2\] \{{\"stage1_loss\": .*\"stage2_loss\"", run.stderr), run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]  # printed by rank 0 only
    _check_rows(rows, trial, 500_000, _counted(trial)[1])
    assert Store.open(str(store)).list(str(store), ".parquet") == [
        Store.open(str(store)).curve_key("cli", "quecc", trial.config_hash),
        Store.open(str(store)).result_key("cli", "quecc", trial.config_hash),
    ]
    assert Store.open(str(store)).read_results("cli").num_rows == 2  # written once
    assert Store.open(str(store)).read_curves("cli").num_rows == 2  # each stage's end, by rank 0 only


def test_torchrun_rejects_a_global_batch_that_does_not_split(tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(_trial(vision={"token_norm": "none"}).to_dict()))  # global batch = micro-batch 8
    run = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "tokenscale.workers", str(config)],
        capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path,
    )
    assert run.returncode != 0
    assert "stage1_global_batch: 8 examples per step do not split into micro_batch (8) x 2 worker(s)" in run.stderr
    assert "stage1_loss" not in run.stderr, "rejected before any training"


def test_trial_from_a_grid_yaml(tmp_path):
    from tokenscale.workers.__main__ import main, select_trial

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(tiny_grid("cli", llms=2, visual_tokens=(1, 4))))
    trials = parse_grid(tiny_grid("cli", llms=2, visual_tokens=(1, 4))).trials()
    assert select_trial(str(grid_file), "2") == trials[2]
    assert select_trial(str(grid_file), trials[3].trial_id) == trials[3]
    with pytest.raises(GridError, match=r"a grid of 4 trials; pick one by index 0-3"):
        select_trial(str(grid_file), None)
    with pytest.raises(GridError, match="out of range"):
        select_trial(str(grid_file), "4")
    with pytest.raises(GridError, match="no trial 'xs-v9'"):
        select_trial(str(grid_file), "xs-v9")
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(trials[0].to_dict()))
    assert select_trial(str(one), None) == trials[0]
    with pytest.raises(GridError, match="drop --trial"):
        select_trial(str(one), "0")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**trials[0].to_dict(), "visual_tokens": "four"}))
    with pytest.raises(GridError, match="visual_tokens"):
        select_trial(str(bad), None)
    assert main([str(tmp_path / "missing.yaml")]) == 2


def _progress_reports(stderr: str) -> list[dict]:
    """The curve points a `python -m tokenscale.workers` run reported (rank 0's)."""
    lines = [line for line in stderr.splitlines() if line.startswith("[rank 0/") and '"elapsed_seconds"' in line]
    return [json.loads(line.split(" ", 2)[2]) for line in lines]


def test_a_late_resume_reports_the_losses_of_an_unbroken_run(tmp_path):
    """Resumed 4 steps before the end of stage 2, the trial reports the same stage-2 loss
    (the mean of its last 10 steps, 6 of them from before the checkpoint) as an unbroken run,
    and stores the same training curve: every point once, the points before the checkpoint
    carried in it (with the step losses since the last point: report_every 5 does not
    divide the checkpoint's step 8), the later ones reported again."""
    trial = _trial(train={"stage2_steps": 12, "checkpoint_every": 8, "report_every": 5})
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(trial.to_dict()))
    finals, reports, curves = [], [], []
    for i in range(2):  # the first run leaves its checkpoints in the folder; the second resumes at step 8
        store = Store.open(str(tmp_path / f"store{i}"))
        run = subprocess.run(
            [str(BIN / "python"), "-m", "tokenscale.workers", str(config), "--checkpoint-dir", str(tmp_path / "ckpt"),
             "--store", store.uri],
            capture_output=True, text=True, timeout=180, env=_env(), cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        finals.append(final_metrics(run.stderr))
        reports.append(_progress_reports(run.stderr))
        curves.append(store.read_curves("cli").to_pylist())
        curve_file, result_file = (Path(store.curve_key("cli", "quecc", trial.config_hash)),
                                   Path(store.result_key("cli", "quecc", trial.config_hash)))
        assert curve_file.stat().st_mtime_ns <= result_file.stat().st_mtime_ns, "the curve before the result"
    unbroken, resumed = finals
    assert (unbroken["resumed_from_stage"], resumed["resumed_from_stage"], resumed["resumed_from_step"]) == (0, 2, 8)
    for key in ("stage1_loss", "stage2_loss", "last_step_loss", "mean_score"):
        assert resumed[key] == pytest.approx(unbroken[key], rel=1e-6), key

    # a point every 5 steps and at each stage's end; the unbroken run's reports are its curve
    points = [(1, 2, 2), (2, 5, 12), (2, 10, 12), (2, 12, 12)]
    assert [(r["stage"], r["step"], r["steps"]) for r in curves[0]] == points
    assert [{k: r[k] for k in ("stage", "step", "steps", "loss", "elapsed_seconds")} for r in curves[0]] == reports[0]
    assert set(reports[0][0]) == {"stage", "step", "steps", "loss", "elapsed_seconds"}
    assert {(r["trial_id"], r["config_hash"], r["llm"], r["visual_tokens"], r["compressor"], r["seed"]) for r in curves[0]} == {
        (trial.trial_id, trial.config_hash, "xs", 4, "quecc", 0)
    }
    # resumed at step 8: it reported only the points after it, and stored the whole curve
    assert [(r["stage"], r["step"]) for r in reports[1]] == [(2, 10), (2, 12)]
    assert [(r["stage"], r["step"], r["steps"]) for r in curves[1]] == points
    assert curves[1][:2] == curves[0][:2], "carried in the checkpoint as reported"
    for got, expected in zip(curves[1][2:], curves[0][2:], strict=True):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6), got["step"]


def test_a_pretrained_tower_is_built_once_and_cached(tmp_path):
    """The demo's path: a tiny tower pretrained on dense scene labels, then frozen, cached
    under $TOKENSCALE_CACHE by what its pretraining depends on."""
    trial = _trial(vision={"pretrain_steps": 3, "pretrain_batch": 8, "pretrain_examples": 16})
    assert trial.vision.frozen
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(trial.to_dict()))
    env = {**_env(), "TOKENSCALE_CACHE": str(tmp_path / "cache")}
    outputs = []
    for _ in range(2):
        run = subprocess.run(
            [str(BIN / "python"), "-m", "tokenscale.workers", str(config), "--format", "jsonl"],
            capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        outputs.append([json.loads(line)["score"] for line in run.stdout.splitlines()])
    towers = list((tmp_path / "cache" / "towers").glob("tinyvit-*.pt"))
    assert len(towers) == 1, "pretrained once, then read from the cache"
    assert outputs[0] == outputs[1], "the cached tower trains the same trial to the same scores"
