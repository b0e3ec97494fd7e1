"""The train loop of one worker: two LLaVA stages under DeepSpeed, then eval. Free of Ray:
the launcher (a Ray Train worker, the Tune trial's process in-trial, torchrun or
`python -m tokenscale.workers`) hands it plain callables for reporting and checkpoints.

Stage 1 trains the compressor (and a tiny vision tower that is not frozen) with the LM
frozen; stage 2 trains compressor + LM (+ that tower). Each stage is its own DeepSpeed
engine, because the set of trainable parameters changes. Rank 0 evaluates and builds one
typed result row per benchmark.
"""

from __future__ import annotations

import dataclasses
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
from tokenscale.config import TrialConfig
from tokenscale.costs import inference_flops
from tokenscale.store import result_row

from .benchmarks import Split, generate
from .model import VLM, encode_images, split_features


def _left_pad(split: Split, length: int) -> Split:
    """Questions left-padded with the split's pad id to `length`, so the sequence is
    [visual][pad..][question][answer]: the model learns to ignore the pads, and the question
    ends right before the answer as before. Generated answers are one word + <eos>."""
    extra = length - split.questions.shape[1]
    questions = np.pad(split.questions, ((0, 0), (extra, 0)), constant_values=split.pad_id) if extra else split.questions
    return dataclasses.replace(split, questions=questions)


def load_splits(trial: TrialConfig) -> tuple[list[Split], list[Split]]:
    """Per-benchmark train and eval splits, questions left-padded to one common length so
    that a training batch can mix benchmarks (one benchmark per batch, round-robin, made
    Adam chase the last task's answer prior and nothing was learned from the images).
    With `data.llava`, LLaVA-format files instead of the generated benchmarks."""
    data, size = trial.data, trial.vision.image_size
    if data.llava is not None:
        from . import llava_data

        train, evals = llava_data.load_splits(trial)
    else:
        train = [generate(b, "train", data.train_examples, data.data_seed, size) for b in data.benchmarks]
        evals = [generate(b, "eval", data.eval_examples, data.data_seed, size) for b in data.benchmarks]
    length = max(s.questions.shape[1] for s in train + evals)
    return [_left_pad(s, length) for s in train], [_left_pad(s, length) for s in evals]


def encode_splits(model: VLM, trial: TrialConfig, train: list[Split], evals: list[Split]) -> tuple[list[Split], list[Split]]:
    """With a frozen tower (LLaVA keeps CLIP frozen) the images are replaced by their patch
    features once, instead of re-encoding every image at every step."""
    data, size = trial.data, trial.vision.image_size

    def encode(split: Split, name: str, n: int) -> Split:
        if data.llava is not None:  # files can change under the same path: no disk cache
            features = encode_images(model.vision, split.images)
        else:
            tag = f"{split.benchmark.name}-{name}-n{n}-img{size}"
            features = split_features(model.vision, trial.vision, data.data_seed, split, tag)
        return dataclasses.replace(split, images=features, labels=None)

    return (
        [encode(s, "train", data.train_examples) for s in train],
        [encode(s, "eval", data.eval_examples) for s in evals],
    )


def _check_token_ids(model: VLM, splits: list[Split]) -> None:
    """A tokenizer whose ids outrun the LM's embedding table fails here, by name, instead
    of as an index error deep inside the first step."""
    vocab = model.llm.get_input_embeddings().num_embeddings
    for split in splits:
        top = int(max(split.questions.max(initial=0), split.answers.max(initial=0)))
        if top >= vocab:
            raise ValueError(
                f"{split.benchmark.name}: token id {top} but the LM's embedding has {vocab} rows; "
                "the tokenizer beside the LLM checkpoint does not belong to it"
            )


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
        "steps_per_print": 10**9,  # quiet: progress goes through the launcher's report
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


def stage_engine(model: VLM, trial: TrialConfig, steps: int, lr: float, use_bf16: bool):
    """One stage's DeepSpeed engine over the parameters that require grad (AdamW, the
    warmup-cosine schedule over `steps`)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    schedule = warmup_cosine(steps, trial.train.warmup_fraction)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=deepspeed_config(trial, lr, use_bf16),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    return engine


def pool_splits(splits: list[Split]) -> Split:
    """All benchmarks' examples in one split, so that a batch mixes them."""
    return Split(
        splits[0].benchmark,
        np.concatenate([s.images for s in splits]),
        np.concatenate([s.questions for s in splits]),
        np.concatenate([s.answers for s in splits]),
    )


def stage_step(engine, pool: Split, index: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One training step of the examples `index` of `pool`; returns the loss."""
    loss, _ = engine(*_batch(pool, index, device, dtype))
    engine.backward(loss)
    engine.step()
    return loss


def run_stage(model: VLM, trial: TrialConfig, splits: list[Split], steps: int, lr: float, rng: np.random.Generator, device: torch.device, use_bf16: bool) -> float:
    """Train the parameters that require grad for `steps` steps; returns the last mean loss.

    Every batch mixes benchmarks: micro_batch examples drawn uniformly from all of them."""
    if steps <= 0:
        return float("nan")
    engine = stage_engine(model, trial, steps, lr, use_bf16)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    pool = pool_splits(splits)
    losses: list[float] = []
    for _ in range(steps):
        index = rng.integers(0, len(pool), trial.train.micro_batch)
        losses.append(stage_step(engine, pool, index, device, dtype).item())
    # release the engine's hooks and optimizer state now: the next stage builds its own, and
    # an in-trial process runs many trials one after another
    engine.destroy()
    return float(np.mean(losses[-10:]))


@dataclasses.dataclass(frozen=True)
class BenchmarkScore:
    """One benchmark's evaluation: exact-match score and the query's real token counts."""

    benchmark: str
    task_family: str
    score: float
    chance: float
    n_examples: int
    text_tokens_mean: float  # question tokens, without the left padding
    generated_tokens_mean: float  # answer tokens up to and including the first <eos>


@torch.no_grad()
def evaluate(model: VLM, splits: list[Split], device: torch.device, dtype: torch.dtype) -> list[BenchmarkScore]:
    """Exact match of the whole answer (teacher-forced argmax at every answer position up
    to and including the first <eos> is exactly greedy decoding's success condition; the
    <eos> padding after it does not count), one score per benchmark."""
    model.eval()
    scores = []
    for split in splits:
        correct = 0
        for start in range(0, len(split), 256):
            index = np.arange(start, min(start + 256, len(split)))
            images, questions, answers = _batch(split, index, device, dtype)
            _, logits = model(images, questions, answers)
            is_eos = answers == split.eos_id
            after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
            correct += int(((logits.argmax(-1) == answers) | after_eos).all(dim=1).sum())
        # real question length: the left padding is a batching device, not part of the query
        text_tokens = float((split.questions != split.pad_id).sum(axis=1).mean())
        # real answer length: up to and including the first <eos> (a cut answer has none)
        before_eos = (np.cumsum(split.answers == split.eos_id, axis=1) == 0).sum(axis=1)
        generated = float(np.minimum(before_eos + 1, split.answers.shape[1]).mean())
        scores.append(BenchmarkScore(
            split.benchmark.name, split.benchmark.task_family, correct / len(split),
            split.benchmark.chance, len(split), text_tokens, generated,
        ))
    model.train()
    return scores


def llm_param_counts(trial: TrialConfig, model: VLM) -> tuple[int, int]:
    """(N, non-embedding count) of the trial's LM. N, the paper's model size, is the count
    the config declares (`llm.params`, e.g. 0.5e9 for Qwen1.5-0.5B) when it declares one,
    else the LM's counted parameters, embeddings included; the non-embedding count (token
    embedding and LM head left out) is always counted."""
    declared = trial.llm.params
    counted = sum(p.numel() for p in model.llm.parameters())  # a tied head counts once
    n = int(round(declared)) if declared is not None else counted
    return n, model.llm_params


def result_rows(
    trial: TrialConfig,
    model: VLM,
    scores: list[BenchmarkScore],
    *,
    config_hash: str,
    train_seconds: float,
    eval_seconds: float,
) -> list[dict[str, Any]]:
    """One typed result row per benchmark (tokenscale.store.result_row), priced with
    tokenscale.costs.inference_flops at the benchmark's mean query."""
    llm_params, non_embedding = llm_param_counts(trial, model)
    finished_at = datetime.now(timezone.utc)
    return [
        result_row(
            grid=trial.grid,
            trial_id=trial.trial_id,
            config_hash=config_hash,
            llm=trial.llm.name,
            llm_params=llm_params,
            llm_params_non_embedding=non_embedding,
            visual_tokens=trial.visual_tokens,
            compressor=trial.compressor,
            compressor_params=model.compressor.num_parameters(),
            compressor_flops=float(model.compressor.flops()),
            seed=trial.seed,
            benchmark=s.benchmark,
            task_family=s.task_family,
            score=s.score,
            error=1.0 - s.score,
            chance=s.chance,
            n_examples=s.n_examples,
            text_tokens_mean=s.text_tokens_mean,
            generated_tokens=round(s.generated_tokens_mean),
            inference_flops=float(inference_flops(
                llm_params, s.text_tokens_mean, trial.visual_tokens, s.generated_tokens_mean, compressor=trial.compressor
            )),
            train_seconds=train_seconds,
            eval_seconds=eval_seconds,
            code_version=code_version(),
            finished_at=finished_at,
        )
        for s in scores
    ]


STAGE1_FILE = "stage1.pt"


def train_and_evaluate(
    trial: TrialConfig,
    rank: int = 0,
    checkpoint_dir: str | None = None,
    on_stage1_done: Callable[[VLM, float], None] | None = None,
    *,
    config_hash: str | None = None,
) -> dict[str, Any]:
    """Both stages then eval; returns metrics (with the result `rows` on rank 0).

    A `checkpoint_dir` holding the end of stage 1 (a retried trial) skips stage 1;
    `on_stage1_done(model, loss)` is called when stage 1 finishes, to checkpoint it. The
    rows carry `config_hash` (default: the trial's own)."""
    torch.manual_seed(trial.seed)
    device = _device()
    use_bf16 = trial.train.bf16 == "on" or (
        trial.train.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    rng = np.random.default_rng([trial.seed, rank])
    train_splits, eval_splits = load_splits(trial)
    model = VLM(trial).to(device)
    _check_token_ids(model, train_splits + eval_splits)
    if trial.vision.frozen:
        train_splits, eval_splits = encode_splits(model, trial, train_splits, eval_splits)

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
        scores = evaluate(model.to(dtype), eval_splits, device, dtype)
        eval_seconds = time.perf_counter() - started
        metrics["rows"] = result_rows(
            trial, model, scores, config_hash=config_hash or trial.config_hash,
            train_seconds=train_seconds, eval_seconds=eval_seconds,
        )
        metrics["mean_score"] = float(np.mean([s.score for s in scores]))
    return metrics


def single_process_group(backend: str) -> None:
    """A torch.distributed world of one, for DeepSpeed. Ray Train's worker group and
    torchrun set one up; training alone (`execution: in_trial`, `python -m
    tokenscale.workers`) needs its own. Kept for the process's next trial, which Tune runs
    in the same process."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise RuntimeError(f"torch.distributed already runs {dist.get_backend()!r} in this process, not {backend!r}")
        return
    # the torch launcher's variables (DeepSpeed reads LOCAL_RANK itself); an in-memory
    # store: a world of one needs no rendezvous, so no port is opened
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def init_process_group(backend: str, rank: int, world_size: int) -> None:
    """torch.distributed as this worker's launcher left it (Ray Train's worker group sets
    it up), else a world of one in memory, else torchrun's env:// rendezvous
    (MASTER_ADDR/MASTER_PORT from the environment)."""
    import torch.distributed as dist

    if world_size == 1:
        single_process_group(backend)
    elif not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    if (dist.get_rank(), dist.get_world_size(), dist.get_backend()) != (rank, world_size, backend):
        raise RuntimeError(
            f"torch.distributed runs rank {dist.get_rank()} of {dist.get_world_size()} ({dist.get_backend()}), "
            f"but this worker was started as rank {rank} of {world_size} ({backend})"
        )


Report = Callable[..., None]
"""`report(metrics, checkpoint_dir=None)`: progress and the final metrics of one worker,
with a local directory to checkpoint (stage 1's end) on rank 0."""


def train_loop_per_worker(
    trial: TrialConfig,
    *,
    report: Report,
    latest_checkpoint: Callable[[], str | None],
    rank: int,
    world_size: int,
    store: str | None = None,
    config_hash: str | None = None,
    backend: str = "gloo",
    threads: int | None = None,
) -> list[dict[str, Any]] | None:
    """One trial's training on one worker of `world_size` (any launcher: a Ray Train worker
    group, the Tune trial's process, torchrun, or a plain process; the Ray adapters live in
    tokenscale.orchestrator.driver).

    Every rank calls `report` the same number of times: once at stage 1's end (rank 0
    passes the directory holding the stage-1 checkpoint, to be persisted before `report`
    returns) and once with the final metrics. `latest_checkpoint()` gives such a directory
    back to a retried trial (or None), which then skips stage 1. Rank 0 evaluates and, with
    a `store`, writes the trial's rows there: one object, one PUT, keyed by `config_hash`
    (default: the trial's own). Returns the rows on rank 0, None elsewhere."""
    from tokenscale.store import Store

    if threads:
        torch.set_num_threads(threads)
    init_process_group(backend, rank, world_size)
    config_hash = config_hash or trial.config_hash

    def checkpoint_stage1(model: VLM, loss: float) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                torch.save({"model": model.state_dict(), "stage1_loss": loss}, os.path.join(tmp, STAGE1_FILE))
            report({"stage": 1, "stage1_loss": loss}, tmp if rank == 0 else None)

    metrics = train_and_evaluate(trial, rank, latest_checkpoint(), checkpoint_stage1, config_hash=config_hash)
    rows = metrics.pop("rows", None)
    if rank == 0 and store is not None:
        Store.open(store).write_results(trial.grid, trial.compressor, config_hash, rows)
    report(metrics)
    return rows
