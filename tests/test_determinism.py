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


def test_trials_compute_with_the_same_cpu_kernels_on_every_x86_machine(monkeypatch):
    """The kernels torch picks follow the CPU (MKL's paths differ between AMD and Intel, ATen
    and oneDNN take AVX-512 where there is one) and change a trial's numbers: the local Ray's
    processes and the worker CLI pin them to the AVX2 paths, and a value the user set wins."""
    import platform

    import pytest

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the pins are x86-64's")
    import ray

    from tokenscale.orchestrator.driver import init_ray
    from tokenscale.workers import CPU_KERNEL_ENV, cpu_kernel_env

    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    assert cpu_kernel_env() == {**CPU_KERNEL_ENV, "MKL_CBWR": "COMPATIBLE"}, "the user's value wins"

    # this process's own pins (conftest) removed: what a trial sees must come from init_ray
    for key in CPU_KERNEL_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_ray(spare_cpu=False)
    try:
        @ray.remote(num_cpus=1)
        def probe() -> tuple[dict, str]:
            import os

            import torch

            return {key: os.environ.get(key) for key in CPU_KERNEL_ENV}, torch.backends.cpu.get_cpu_capability()

        env, capability = ray.get(probe.remote())
    finally:
        ray.shutdown()
    assert env == CPU_KERNEL_ENV
    assert capability == "AVX2"

    done = subprocess.run(
        [sys.executable, "-c", "import os, sys; sys.argv = ['x', '--help']\n"
         "from tokenscale.workers.__main__ import main\n"
         "try:\n    main()\nexcept SystemExit:\n    pass\n"
         "print(','.join(os.environ.get(k, '') for k in ('MKL_CBWR', 'ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA')))"],
        env={k: v for k, v in worker_env().items() if k not in CPU_KERNEL_ENV}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "AVX2,avx2,AVX2", "the worker CLI pins them before torch"
