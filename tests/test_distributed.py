"""Distributed training for real: two workers under every ZeRO stage (torchrun, and Ray
Train for ZeRO-3), data-parallel equivalence with one worker at the same global batch,
attempts per trial = max_failures + 1 in both execution modes, and checkpoints that hold
the trainable state only. The Ray tests start and stop their own Ray.

Tolerances. Two workers and one worker with the same global batch run the same examples;
the only difference is where a step's micro-batch gradients are summed (gloo's all-reduce
across ranks vs DeepSpeed's accumulation in one rank) and in which order the per-worker
mean losses are averaged. Those are fp32 sums in another order: bit-identical for two
terms in practice, and at most a few ulps (fp32 eps 1.2e-7) per step otherwise, which a
handful of Adam steps carry into the loss at well under 1e-5 relative. So losses are
compared at rel 1e-5, and scores (argmax over 32 eval examples per benchmark) within one
example.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_grid

from tokenscale.config import TrialConfig, parse_grid
from tokenscale.store import Store

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
LOSS_REL = 1e-5  # see the module docstring
VISION = {"image_size": 16, "patch_size": 4, "hidden_size": 16, "layers": 1, "heads": 2}
_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def two_worker_grid(name: str, zero_stage: int, **overrides) -> dict:
    """One trial of the xs LLM at V = 4; global batch 16 = micro-batch 8 x 2 workers (one
    worker runs it as 2 accumulated micro-batches); LLaVA's projector, since a BatchNorm
    over the visual tokens would keep per-worker statistics."""
    return tiny_grid(
        name, llms=1, visual_tokens=(4,),
        vision={**VISION, "token_norm": "none"},
        train={"zero_stage": zero_stage, "micro_batch": 8, "global_batch": 16, "stage1_steps": 2, "stage2_steps": 6},
        **overrides,
    )


def train_in_process(trial: TrialConfig, checkpoints: Path | None = None, store: str | None = None):
    """The train loop as a world of one in this process, with one torch thread (what a
    Ray worker or in-trial trial with 1 CPU runs): (final metrics, rows). Every reported
    checkpoint is copied to `checkpoints/<tag>/`.

    The world of one stays for the process's next run, as in a reused Tune trial process
    (DeepSpeed keeps its groups: it cannot be ended and started again); the launcher
    variables it needs are set for the call and put back after it, with the thread count,
    so that a Ray started later by this test process does not inherit them."""
    import torch

    from tokenscale.workers.train import train_loop_per_worker

    saved = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    threads = torch.get_num_threads()
    reports: list[dict] = []

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir and checkpoints is not None:
            shutil.copytree(checkpoint_dir, checkpoints / metrics["checkpoint"])
        reports.append(dict(metrics))

    try:
        rows = train_loop_per_worker(
            trial, report=report, latest_checkpoint=lambda: None, rank=0, world_size=1, store=store, threads=1,
        )
    finally:
        torch.set_num_threads(threads)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return reports[-1], rows


def assert_same_training(got: dict, expected: dict, rel: float = LOSS_REL) -> None:
    for key in ("stage1_loss", "stage2_loss", "last_step_loss"):
        assert math.isfinite(expected[key])
        assert got[key] == pytest.approx(expected[key], rel=rel), key


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*_LAUNCHER_ENV, "RAY_ADDRESS")}
    return {**env, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _only_result_object(store: Store, trial: TrialConfig) -> None:
    """The trial's result and its curve, one object each: a point at each stage's end (the
    tiny stages are shorter than train.report_every), written by rank 0 alone."""
    assert store.list(store.uri, ".parquet") == [
        store.curve_key(trial.grid, trial.compressor, trial.config_hash),
        store.result_key(trial.grid, trial.compressor, trial.config_hash),
    ]
    assert store.read_results(trial.grid).num_rows == 2  # one row per benchmark, written once
    curve = store.read_curves(trial.grid).to_pylist()
    assert [(r["stage"], r["step"], r["steps"]) for r in curve] == [
        (1, trial.train.stage1_steps, trial.train.stage1_steps), (2, trial.train.stage2_steps, trial.train.stage2_steps),
    ]
    assert {r["trial_id"] for r in curve} == {trial.trial_id}


# ---- which examples each worker sees ------------------------------------------------------


def test_each_worker_takes_a_disjoint_share_of_the_same_global_batch():
    from tokenscale.workers.train import (
        global_batch_indices,
        load_splits,
        pool_splits,
        stage_plan,
        worker_micro_batches,
    )

    trial = parse_grid(two_worker_grid("shares", 1)).trials()[0]
    n = len(pool_splits(load_splits(trial)[0]))
    assert n == 2 * 64  # both benchmarks' training examples in one pool
    micro = trial.train.micro_batch
    for number in (1, 2):
        one, two = stage_plan(trial, number, 1), stage_plan(trial, number, 2)
        assert (one.global_batch, one.accumulation, two.accumulation) == (16, 2, 1)
        for step in range(one.steps):
            batch = global_batch_indices(trial.seed, number, step, n, one.global_batch)
            assert np.array_equal(batch, global_batch_indices(trial.seed, number, step, n, 16)), "a pure function"
            alone = np.concatenate(worker_micro_batches(batch, 0, 1, micro, one.accumulation))
            shares = [np.concatenate(worker_micro_batches(batch, rank, 2, micro, two.accumulation)) for rank in (0, 1)]
            assert [len(s) for s in shares] == [micro, micro]
            assert not set(shares[0]) & set(shares[1]), f"stage {number} step {step}: the workers' shares overlap"
            assert np.array_equal(np.concatenate(shares), alone), "together the two shares are the one worker's batch"
            assert len(set(alone)) == 16  # 128 examples = 8 whole steps: no batch straddles an epoch

    # a stream whose steps straddle epochs: every position once, each epoch a permutation
    stream = np.concatenate([global_batch_indices(3, 2, step, 40, 16) for step in range(5)])
    assert sorted(stream[:40]) == list(range(40)) and sorted(stream[40:]) == list(range(40))
    assert not np.array_equal(stream[:40], stream[40:]), "each epoch reshuffles"
    assert not np.array_equal(global_batch_indices(3, 2, 0, 40, 16), global_batch_indices(4, 2, 0, 40, 16))


# ---- two workers, each ZeRO stage -----------------------------------------------------------


_METRICS = re.compile(r"^\[rank (\d)/2\] (\{.*\"stage2_loss\".*\})$", re.MULTILINE)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_two_workers_under_torchrun_match_one_worker(tmp_path, zero_stage):
    trial = parse_grid(two_worker_grid("zero", zero_stage)).trials()[0]
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(trial.to_dict()))
    store = Store.open(str(tmp_path / "store"))
    run = subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "tokenscale.workers",
         str(config), "--store", store.uri, "--format", "jsonl", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    finals = {int(rank): json.loads(metrics) for rank, metrics in _METRICS.findall(run.stderr)}
    assert sorted(finals) == [0, 1], run.stderr[-3000:]  # both ranks trained both stages
    _only_result_object(store, trial)
    rows = [json.loads(line) for line in run.stdout.splitlines()]

    alone, alone_rows = train_in_process(trial)
    for rank in (0, 1):  # the loss is averaged over the workers: both ranks report the same
        assert_same_training(finals[rank], alone)
    for row, expected in zip(rows, alone_rows, strict=True):
        assert row["benchmark"] == expected["benchmark"]
        assert abs(row["score"] - expected["score"]) <= 1 / row["n_examples"] + 1e-12


def _ray_env(monkeypatch) -> None:
    """Before init_ray: Ray Train records its runs and their attempts (state tracking) and
    writes them as export events into the session's logs (Ray's Export API)."""
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    monkeypatch.setenv("RAY_enable_export_api_write_config", "EXPORT_TRAIN_RUN,EXPORT_TRAIN_RUN_ATTEMPT")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _train_events(session_dir: str) -> list[dict]:
    """Ray Train's run and attempt export events (the state actor writes them)."""
    events = []
    for path in Path(session_dir, "logs", "export_events").glob("event_EXPORT_TRAIN*.log"):
        events += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return events


def train_attempts(session_dir: str, name: str) -> dict[str, dict[str, str]]:
    """run id -> {attempt id: its last status}, for the Ray Train runs named `name` (a
    trial's id): an attempt is one start of the run's worker group."""
    events = _train_events(session_dir)
    runs = {e["event_data"]["id"] for e in events if e["source_type"] == "EXPORT_TRAIN_RUN" and e["event_data"]["name"] == name}
    attempts: dict[str, dict[str, str]] = {run: {} for run in runs}
    for e in events:  # in the order written: the last status of an attempt wins
        data = e["event_data"]
        if e["source_type"] == "EXPORT_TRAIN_RUN_ATTEMPT" and data["run_id"] in attempts:
            attempts[data["run_id"]][data["attempt_id"]] = data["status"]
    return attempts


def run_in_local_ray(grid, store: Store, monkeypatch):
    """Run `grid` in a local Ray of its own (the spare CPU for worker groups); returns
    (its summary, the Ray session's directory, where `train_attempts` reads the runs)."""
    import ray

    from tokenscale.orchestrator.driver import init_ray, run_grid

    _ray_env(monkeypatch)
    init_ray(spare_cpu=True)
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
        return run_grid(grid, store, verbose=0), session
    finally:
        ray.shutdown()


def test_zero3_two_workers_through_ray_train(tmp_path, monkeypatch):
    # 2 workers x 0.5 CPU + the Tune trial's 0.01: fits the 2 cores + 1 spare CPU that
    # init_ray gives a local Ray when trials run in worker groups
    grid = parse_grid(two_worker_grid(
        "zero3", 3, resources={"workers": 2, "cpus_per_worker": 0.5, "execution": "workers"},
    ))
    trial = grid.trials()[0]
    assert grid.resources.for_llm(trial.llm)["execution"] == "workers"
    store = Store.open(str(tmp_path / "store"))
    summary, session = run_in_local_ray(grid, store, monkeypatch)
    attempts = train_attempts(session, trial.trial_id)
    assert summary.errored == 0 and summary.finished == 1, summary
    _only_result_object(store, trial)
    assert [list(a.values()) for a in attempts.values()] == [["FINISHED"]], "one Ray Train run, one attempt"

    alone, _ = train_in_process(trial)  # ZeRO-3 on one worker, the same global batch
    assert_same_training(summary.trial_metrics[0], alone)
    assert summary.trial_metrics[0]["mean_score"] == pytest.approx(alone["mean_score"], abs=1 / 32 + 1e-12)


# ---- attempts per trial -------------------------------------------------------------------


def _broken_llm_checkpoint(folder: Path) -> None:
    """A Qwen2 checkpoint folder that passes validation (config.json, a BPE tokenizer like
    Qwen's) but whose weights file was cut short, as by an interrupted upload: every
    attempt's `from_pretrained` fails, in the worker, after the data has loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(["What color is the square?", "red", "blue"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)
    config = Qwen2Config(
        vocab_size=backend.get_vocab_size(), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _llava_data(folder: Path) -> dict:
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    records = []
    for i, (color, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (40, 60, 230))] * 4):
        Image.new("RGB", (16, 16), rgb).save(folder / "images" / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": color},
        ]})
    (folder / "data.json").write_text(json.dumps(records))
    return {
        "train": str(folder / "data.json"), "image_folder": str(folder / "images"),
        "eval": [{"name": "colors", "task_family": "reasoning", "path": str(folder / "data.json")}],
    }


def tune_trials(experiment: Path) -> dict[str, dict]:
    """Tune's newest experiment state: trial name -> {status, num_failures}."""
    state = json.loads(sorted(experiment.glob("experiment_state-*.json"))[-1].read_text())
    trials = {}
    for trial_json, metadata_json in state["trial_data"]:
        trial, metadata = json.loads(trial_json), json.loads(metadata_json)
        trials[trial["config"]["point"]["trial_id"]] = {"status": trial["status"], "num_failures": metadata["num_failures"]}
    return trials


def test_attempts_per_trial_are_max_failures_plus_one(tmp_path, monkeypatch):
    """A trial that fails in every attempt runs max_failures + 1 times in both execution
    modes: Tune retries it; Ray Train, inside a worker-group trial, never does."""
    checkpoint = tmp_path / "qwen-cut-short"
    _broken_llm_checkpoint(checkpoint)
    raw = two_worker_grid(
        "attempts", 1, max_failures=1, data={"llava": _llava_data(tmp_path / "data")},
        # in-group: a Ray Train worker group of 2 (execution auto = workers); in-trial: one
        # CPU worker, auto = in the Tune trial's own process
        resources={"workers": 1, "cpus_per_worker": 1, "bands": [{"llms": ["in-group"], "workers": 2, "cpus_per_worker": 0.5}]},
    )
    raw["llms"] = [{"name": "in-group", "path": str(checkpoint)}, {"name": "in-trial", "path": str(checkpoint)}]
    grid = parse_grid(raw)  # validation passes: the weights are only read in the worker
    trials = {t.llm.name: t for t in grid.trials()}
    assert {n: grid.resources.for_llm(t.llm)["execution"] for n, t in trials.items()} == {"in-group": "workers", "in-trial": "in_trial"}
    store = Store.open(str(tmp_path / "store"))
    summary, session = run_in_local_ray(grid, store, monkeypatch)
    attempts = train_attempts(session, trials["in-group"].trial_id)
    assert summary.errored == 2 and summary.finished == 0, summary
    assert store.list(store.uri, ".parquet") == []

    experiment = tmp_path / "store" / "attempts" / "tune"
    states = tune_trials(experiment)
    for name, trial in trials.items():
        assert states[trial.trial_id] == {"status": "ERROR", "num_failures": grid.max_failures + 1}, name
        errors = (experiment / trial.trial_id / "error.txt").read_text()
        failures = re.findall(r"^Failure # (\d+)", errors, re.MULTILINE)
        assert failures == ["1", "2"], f"{name}: one traceback per attempt"
        assert errors.count("incomplete metadata, file not fully covered") == 2, f"{name}: the cut-short weights, each time"
    # the worker-group trial: one Ray Train run per Tune attempt, each of one attempt
    # (FailureConfig(max_failures=0)): Train did not retry inside Tune's retries
    assert sorted(list(a.values()) for a in attempts.values()) == [["ERRORED"]] * (grid.max_failures + 1), attempts
    assert train_attempts(session, trials["in-trial"].trial_id) == {}, "in-trial: no worker group"


# ---- what a checkpoint holds ----------------------------------------------------------------


def test_checkpoints_hold_only_trainable_state(tmp_path, monkeypatch):
    """Stage 1 (ZeRO-2) and stage 2 (ZeRO-3), as paper.yaml: DeepSpeed's model states hold
    the trainable parameters only and the whole checkpoint is bounded by them.

    Bound: 16 bytes per trainable parameter (fp32 weight, fp32 master copy, Adam's two
    moments) + 32 KiB for the rest (pickle framing, names and shapes, DeepSpeed's config,
    the LR schedule, the torch RNG state (5 KiB), `latest`, state.json; about 15 KiB here).
    DeepSpeed's recovery scripts (zero_to_*.py, 41 KiB of its source, the same for any
    model) are not state and are left out. The LLM is the largest tiny one (about 48k
    parameters, 190 KiB in fp32), so that its frozen weights in stage 1 would break the
    bound."""
    import torch

    from tokenscale.workers.model import VLM

    monkeypatch.setenv("TOKENSCALE_CACHE", str(tmp_path / "cache"))
    raw = tiny_grid(
        "ckpt", llms=3, visual_tokens=(4,), vision={**VISION, "token_norm": "none", "freeze": True},
        train={"stage1_zero_stage": 2, "stage2_zero_stage": 3, "micro_batch": 8, "stage1_steps": 2,
               "stage2_steps": 4, "checkpoint_every": 2},
    )
    raw["llms"] = raw["llms"][2:]  # m: hidden 48, 2 layers
    trial = parse_grid(raw).trials()[0]
    model = VLM(trial)
    compressor = sum(p.numel() for p in model.compressor.parameters())
    llm = sum(p.numel() for p in model.llm.parameters())
    assert sum(p.numel() for p in model.parameters()) == compressor + llm + sum(p.numel() for p in model.vision.parameters())
    assert 4 * llm > 16 * compressor + 32 * 1024, "the frozen LM would not fit the stage-1 bound"

    checkpoints = tmp_path / "checkpoints"
    train_in_process(trial, checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["stage1-step2", "stage2-step2"]
    for tag, trainable, prefixes in (
        ("stage1-step2", compressor, ("compressor.",)),  # LM and tower frozen
        ("stage2-step2", compressor + llm, ("compressor.", "llm.")),  # the tower frozen
    ):
        folder = checkpoints / tag
        assert json.loads((folder / "state.json").read_text())["tag"] == tag
        model_states = list(folder.glob(f"{tag}/*model_states.pt"))
        assert len(model_states) == 1, model_states  # one rank
        states = torch.load(model_states[0], map_location="cpu", weights_only=False)
        names = [n for group in states["param_shapes"] for n in group]
        assert sorted(states["module"]) == sorted(names), "the module holds exactly the trainable parameters"
        assert all(n.startswith(prefixes) for n in names), [n for n in names if not n.startswith(prefixes)]
        assert all(any(n.startswith(p) for n in names) for p in prefixes)
        assert not states.get("frozen_param_shapes") and not states.get("frozen_param_fragments")
        assert sum(math.prod(s) for group in states["param_shapes"] for s in group.values()) == trainable
        files = [p for p in folder.rglob("*") if p.is_file()]
        scripts = {p.name for p in files if p.suffix == ".py"}
        assert scripts <= {"zero_to_fp32.py", "zero_to_torch.py"}, scripts
        state_bytes = sum(p.stat().st_size for p in files if p.suffix != ".py")
        assert state_bytes <= 16 * trainable + 32 * 1024, (tag, state_bytes, trainable)


def test_a_zero3_trial_leaves_the_next_trial_in_its_process_unchanged():
    """ZeRO-3 swaps torch.nn.functional.linear for its own version process-wide; a reused
    trial process (in_trial) would train every later trial with it. The trainer puts the
    original back: a ZeRO-1 trial gives the same numbers before and after a ZeRO-3 one."""
    import torch

    raw = tiny_grid("reuse", llms=1, visual_tokens=(4,), train={"micro_batch": 8, "stage1_steps": 2, "stage2_steps": 6})
    zero1 = parse_grid(raw).trials()[0]
    raw["train"].update({"stage1_zero_stage": 2, "stage2_zero_stage": 3})
    zero3 = parse_grid(raw).trials()[0]
    linear = torch.nn.functional.linear
    before, _ = train_in_process(zero1)
    train_in_process(zero3)
    assert torch.nn.functional.linear is linear, "ZeRO-3's linear left in place"
    after, _ = train_in_process(zero1)
    for key in ("stage1_loss", "stage2_loss", "last_step_loss", "mean_score"):
        assert after[key] == before[key], key
