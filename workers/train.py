"""The train loop one Ray Train worker runs: two LLaVA stages under DeepSpeed, then eval.

Stage 1 trains the compressor (and the tiny vision tower) with the LM frozen; stage 2
trains compressor + LM (+ tiny tower). Each stage is its own DeepSpeed engine, because the
set of trainable parameters changes. Rank 0 evaluates and returns one row per benchmark.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from tokenscale import code_version

from .benchmarks import TOKEN_ID, Split, generate
from .model import VLM
from .trial import TrialConfig

PAD = TOKEN_ID["<pad>"]


def _left_pad(split: Split, length: int) -> Split:
    """Questions left-padded with <pad> to `length`, so the sequence is
    [visual][pad..][question][answer]: the model learns to ignore the pads, and the question
    ends right before the answer as before. Answers are one word + <eos> everywhere."""
    extra = length - split.questions.shape[1]
    questions = np.pad(split.questions, ((0, 0), (extra, 0)), constant_values=PAD) if extra else split.questions
    return Split(split.benchmark, split.images, questions, split.answers, split.labels)


def load_splits(trial: TrialConfig) -> tuple[list[Split], list[Split]]:
    """Per-benchmark train and eval splits, questions left-padded to one common length so
    that a training batch can mix benchmarks (one benchmark per batch, round-robin, made
    Adam chase the last task's answer prior and nothing was learned from the images)."""
    data, size = trial.data, trial.vision.image_size
    train = [generate(b, "train", data.train_examples, data.data_seed, size) for b in data.benchmarks]
    evals = [generate(b, "eval", data.eval_examples, data.data_seed, size) for b in data.benchmarks]
    length = max(s.questions.shape[1] for s in train + evals)
    return [_left_pad(s, length) for s in train], [_left_pad(s, length) for s in evals]


def deepspeed_config(trial: TrialConfig, lr: float, use_bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": trial.train.micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: use torch's AdamW instead of DeepSpeed's fused op (no op builds on CPU)
            "params": {"lr": lr, "weight_decay": trial.train.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": trial.train.zero_stage},
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,  # quiet: progress is reported through Ray
    }


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _batch(split: Split, index: np.ndarray, device: torch.device, dtype: torch.dtype):
    return (
        torch.from_numpy(split.images[index]).to(device, dtype),
        torch.from_numpy(split.questions[index]).to(device),
        torch.from_numpy(split.answers[index]).to(device),
    )


def warmup_cosine(steps: int, warmup_fraction: float):
    """LR multiplier: linear warmup over the first `warmup_fraction` of the steps, then a
    cosine decay to 0 (short runs gain a lot from annealing)."""
    warmup = max(1, int(round(warmup_fraction * steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def run_stage(model: VLM, trial: TrialConfig, splits: list[Split], steps: int, lr: float, rng: np.random.Generator, device: torch.device, use_bf16: bool) -> float:
    """Train the parameters that require grad for `steps` steps; returns the last mean loss.

    Every batch mixes benchmarks: micro_batch examples drawn uniformly from all of them."""
    if steps <= 0:
        return float("nan")
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    schedule = warmup_cosine(steps, trial.train.warmup_fraction)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=deepspeed_config(trial, lr, use_bf16),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    pool = Split(
        splits[0].benchmark,
        np.concatenate([s.images for s in splits]),
        np.concatenate([s.questions for s in splits]),
        np.concatenate([s.answers for s in splits]),
    )
    losses: list[float] = []
    for _ in range(steps):
        index = rng.integers(0, len(pool), trial.train.micro_batch)
        loss, _ = engine(*_batch(pool, index, device, dtype))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return float(np.mean(losses[-10:]))


@torch.no_grad()
def evaluate(model: VLM, trial: TrialConfig, splits: list[Split], device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Exact match of the whole answer (teacher-forced argmax at every answer position is
    exactly greedy decoding's success condition), one row per benchmark."""
    model.eval()
    n_params = model.llm_params
    rows = []
    for split in splits:
        correct = 0
        for start in range(0, len(split), 256):
            index = np.arange(start, min(start + 256, len(split)))
            images, questions, answers = _batch(split, index, device, dtype)
            _, logits = model(images, questions, answers)
            correct += int((logits.argmax(-1) == answers).all(dim=1).sum())
        score = correct / len(split)
        # real question length: the left padding is a batching device, not part of the query
        text_tokens = float((split.questions != PAD).sum(axis=1).mean())
        generated = split.answers.shape[1]
        rows.append(
            {
                "benchmark": split.benchmark.name,
                "task_family": split.benchmark.task_family,
                "score": score,
                "error": 1.0 - score,
                "chance": split.benchmark.chance,
                "n_examples": len(split),
                "text_tokens_mean": float(text_tokens),
                "generated_tokens": int(generated),
                "inference_flops": 2.0 * n_params * (text_tokens + trial.visual_tokens + generated),
            }
        )
    model.train()
    return rows


STAGE1_FILE = "stage1.pt"


def train_and_evaluate(
    trial: TrialConfig,
    rank: int = 0,
    checkpoint_dir: str | None = None,
    on_stage1_done: Callable[[VLM, float], None] | None = None,
) -> dict[str, Any]:
    """Both stages then eval; returns metrics (with `rows` on rank 0).

    A `checkpoint_dir` holding the end of stage 1 (a retried trial) skips stage 1;
    `on_stage1_done(model, loss)` is called when stage 1 finishes, to checkpoint it."""
    torch.manual_seed(trial.seed)
    device = _device()
    use_bf16 = trial.train.bf16 == "on" or (
        trial.train.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    rng = np.random.default_rng([trial.seed, rank])
    train_splits, eval_splits = load_splits(trial)
    model = VLM(trial).to(device)

    started = time.perf_counter()
    stage1_file = os.path.join(checkpoint_dir, STAGE1_FILE) if checkpoint_dir else None
    resumed = bool(stage1_file and os.path.exists(stage1_file))
    if resumed:
        state = torch.load(stage1_file, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        stage1_loss = float(state["stage1_loss"])
    else:
        model.llm.requires_grad_(False)
        stage1_loss = run_stage(model, trial, train_splits, trial.train.stage1_steps, trial.train.stage1_lr, rng, device, use_bf16)
        if on_stage1_done is not None:
            on_stage1_done(model, stage1_loss)
    model.llm.requires_grad_(True)
    stage2_loss = run_stage(model, trial, train_splits, trial.train.stage2_steps, trial.train.stage2_lr, rng, device, use_bf16)
    train_seconds = time.perf_counter() - started

    metrics: dict[str, Any] = {
        "stage1_loss": stage1_loss,
        "stage2_loss": stage2_loss,
        "train_seconds": train_seconds,
        "resumed_from_stage": 1 if resumed else 0,
    }
    if rank == 0:
        started = time.perf_counter()
        bench_rows = evaluate(model.to(dtype), trial, eval_splits, device, dtype)
        eval_seconds = time.perf_counter() - started
        common = {
            "grid": trial.grid,
            "trial_id": trial.trial_id,
            "config_hash": trial.config_hash,
            "llm": trial.llm.name,
            "llm_params": model.llm_params,
            "visual_tokens": trial.visual_tokens,
            "compressor": trial.compressor,
            "compressor_params": model.compressor.num_parameters(),
            "compressor_flops": float(model.compressor.flops()),
            "seed": trial.seed,
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "code_version": code_version(),
            "finished_at": datetime.now(timezone.utc),
        }
        metrics["rows"] = [{**common, **row} for row in bench_rows]
        metrics["mean_score"] = float(np.mean([r["score"] for r in bench_rows]))
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for Ray Train's TorchTrainer (torch.distributed already set up by Ray).

    Rank 0 writes the trial's rows to the store itself: one object, one PUT, keyed by the
    config hash. Only small scalar metrics go back through Ray."""
    import ray.train

    from tokenscale.store import Store

    torch.set_num_threads(int(config.get("threads_per_worker", 1)))
    rank = ray.train.get_context().get_world_rank()
    trial = TrialConfig.from_dict(config["trial"])

    def checkpoint_stage1(model: VLM, loss: float) -> None:
        # Ray Train persists it to the trial's storage (beside the results in the store);
        # a restarted worker group gets it back from get_checkpoint() and skips stage 1.
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save({"model": model.state_dict(), "stage1_loss": loss}, os.path.join(tmp, STAGE1_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"stage": 1, "stage1_loss": loss}, checkpoint=checkpoint)

    previous = ray.train.get_checkpoint()
    if previous is not None:
        with previous.as_directory() as checkpoint_dir:
            metrics = train_and_evaluate(trial, rank, checkpoint_dir, checkpoint_stage1)
    else:
        metrics = train_and_evaluate(trial, rank, None, checkpoint_stage1)
    rows = metrics.pop("rows", None)
    if rank == 0:
        # The driver's hash names the object: a worker running other code (new defaults)
        # must still write where the driver looks.
        config_hash = config.get("config_hash") or trial.config_hash
        for row in rows:
            row["config_hash"] = config_hash
        Store(config["store"]).write_results(trial.grid, trial.compressor, config_hash, rows)
    timing = config.get("timing")
    if timing:  # where the trial's wall time went, for benchmarks/bench_overhead.py
        metrics["startup_seconds"] = timing["entered"] - timing["trial_started"]
        metrics["import_seconds"] = timing["imported"] - timing["entered"]
        metrics["worker_seconds"] = time.time() - timing["imported"]
    ray.train.report(metrics)
