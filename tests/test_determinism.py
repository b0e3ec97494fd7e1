"""Same config, same numbers: a trial's scores and losses do not depend on the process it
runs in (a fresh one, or one that ran another trial first, as Tune reuses its trial
processes) nor on the run. The generated benchmarks, the tower's pretraining and its
feature cache are functions of their seeds; the train loop runs one torch thread per CPU
of the trial (`cpus_per_worker`: 1 here), its data order is a function of (seed, stage,
step)."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml
from conftest import final_metrics, tiny_grid, worker_env

from tokenscale.config import parse_grid

GRID = tiny_grid(
    "determinism", llms=2, visual_tokens=(4,),
    vision={"image_size": 16, "patch_size": 4, "hidden_size": 16, "layers": 1, "heads": 2, "pretrain_steps": 50},
    train={"zero_stage": 1, "micro_batch": 8, "stage1_steps": 4, "stage2_steps": 40},
)
KEYS = ("stage1_loss", "stage2_loss", "last_step_loss", "mean_score")


def _fresh_process(tmp_path, trial_index: int, cache) -> tuple[dict, list[tuple[str, float]]]:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    env = worker_env(TOKENSCALE_CACHE=str(cache))
    done = subprocess.run(
        [sys.executable, "-m", "tokenscale.workers", str(path), "--trial", str(trial_index), "--threads", "1",
         "--format", "jsonl"], env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = final_metrics(done.stderr)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return {k: metrics[k] for k in KEYS}, sorted((r["benchmark"], r["score"]) for r in rows)


def test_a_trial_gives_the_same_numbers_in_a_fresh_and_in_a_reused_process(tmp_path, monkeypatch):
    from test_distributed import train_in_process

    cold_cache, warm_cache = tmp_path / "cold", tmp_path / "warm"
    fresh = _fresh_process(tmp_path, 1, cold_cache)  # builds the tower and its features
    again = _fresh_process(tmp_path, 1, cold_cache)  # reads them from the cache
    assert again == fresh, "run to run, and with a warm cache"

    # a reused process: another trial (another LLM) first, then the same trial
    monkeypatch.setenv("TOKENSCALE_CACHE", str(warm_cache))
    trials = parse_grid(GRID).trials()
    train_in_process(trials[0])
    metrics, rows = train_in_process(trials[1])
    reused = ({k: metrics[k] for k in KEYS}, sorted((r["benchmark"], r["score"]) for r in rows))
    assert reused == fresh, "a process that ran another trial first"


def test_the_shared_tower_and_its_features_do_not_depend_on_the_callers_thread_count(monkeypatch):
    """The tower and its features are cached under a key without the thread count, and
    shared by every trial: whoever builds them (a 1-thread Tune trial, a debugging run with
    torch's default) must build the same bytes. A matmul's reduction order depends on the
    thread count (pretraining this tower with 1 and with 4 threads differs by ~1e-4)."""
    import torch

    from tokenscale.config import VisionSpec
    from tokenscale.workers import benchmarks, model

    monkeypatch.setenv("TOKENSCALE_CACHE", "off")
    spec = VisionSpec(image_size=16, patch_size=4, hidden_size=16, layers=1, heads=2, pretrain_steps=30,
                      pretrain_examples=64)
    split = benchmarks.generate("color", "eval", 32, seed=0, image_size=16, cache=False)
    before = torch.get_num_threads()
    built = {}
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            state = model.pretrained_tower(spec, data_seed=0)
            tower = model.TinyViT(spec)
            tower.load_state_dict(state)
            features = model.split_features(tower, spec, 0, split, "color-eval")
            assert torch.get_num_threads() == threads, "the caller's thread count is restored"
            built[threads] = (state, features)
    finally:
        torch.set_num_threads(before)
    (state_1, features_1), (state_4, features_4) = built[1], built[4]
    assert state_1.keys() == state_4.keys()
    assert all(torch.equal(state_1[k], state_4[k]) for k in state_1)
    assert features_1.tobytes() == features_4.tobytes()
