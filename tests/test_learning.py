"""Learning, asserted so that it can fail: one trial on the generated benchmarks, trained
as `python -m tokenscale.workers` trains it, must answer each benchmark above chance by a
one-sided exact binomial test at alpha = 0.001 (`workers.metrics.chance_floor`). A label
misaligned with its image, a loss on the wrong positions or a tower that sees nothing
scores chance and fails here; the real-checkpoint path has the same check in
test_real_model.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_grid, worker_env

from tokenscale.workers.metrics import chance_floor

ALPHA = 0.001


def test_a_trial_beats_chance_on_both_task_families(tmp_path):
    # One of each family: `color` (reasoning, 6 colours) and `digits` (ocr, 10 digits) on
    # the demo's kind of tower (pretrained, frozen), V = 36 (every patch), 128 answers each.
    # Measured: color 128/128, digits 124/128; the floors are 36 and 24.
    grid = tiny_grid(
        "learning", llms=2, visual_tokens=(36,),
        data={"benchmarks": ["color", "digits"], "train_examples": 512, "eval_examples": 128},
        vision={"image_size": 24, "patch_size": 4, "hidden_size": 48, "layers": 2, "heads": 4,
                "stem_channels": 16, "stem_layers": 2, "pretrain_steps": 800},
        train={"zero_stage": 1, "micro_batch": 32, "stage1_steps": 20, "stage2_steps": 1000,
               "stage1_lr": 3e-3, "stage2_lr": 3e-3},
    )
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    env = worker_env(TOKENSCALE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "tokenscale.workers", str(path), "--trial", "1", "--format", "jsonl"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["benchmark"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == {"color", "digits"}
    for name, row in rows.items():
        n = row["n_examples"]
        correct = round(row["score"] * n)  # exact match: each answer scores 0 or 1
        assert n == 128 and row["visual_tokens"] == 36
        floor = chance_floor(n, row["chance"], ALPHA)
        assert correct >= floor, f"{name}: {correct}/{n} correct, guessing at {row['chance']:.3f} reaches {floor} with p <= {ALPHA}"


@pytest.mark.parametrize("chance", [0.1, 0.25, 0.5])
def test_a_guesser_does_not_pass_the_check(chance):
    """The check itself can fail: seeded guessing at `chance` stays under the floor."""
    import random

    rng = random.Random(0)
    n = 128
    floor = chance_floor(n, chance, ALPHA)
    passed = sum(sum(rng.random() < chance for _ in range(n)) >= floor for _ in range(2000))
    assert passed <= 10, f"{passed} of 2000 guessers passed (alpha = {ALPHA}: expect about 2)"
