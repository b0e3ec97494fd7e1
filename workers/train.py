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
import functools
import io
import json
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
    With `data.llava`: [stage 1's set, stage 2's set] and the eval sets, LLaVA-format files
    read on demand (llava_data.LlavaSet), instead of the generated benchmarks."""
    data, size = trial.data, trial.vision.image_size
    if data.llava is not None:
        from . import llava_data

        return llava_data.load_sets(trial)  # type: ignore[return-value]
    train = [generate(b, "train", data.train_examples, data.data_seed, size) for b in data.benchmarks]
    evals = [generate(b, "eval", data.eval_examples, data.data_seed, size) for b in data.benchmarks]
    length = max(s.questions.shape[1] for s in train + evals)
    return [_left_pad(s, length) for s in train], [_left_pad(s, length) for s in evals]


def stage_sources(trial: TrialConfig, train: list[Split]) -> dict[int, Any]:
    """Each stage's training data: the generated benchmarks pooled, the same for both
    stages; LLaVA's stage 1 and stage 2 sets."""
    if trial.data.llava is not None:
        return {1: train[0], 2: train[1]}
    pool = pool_splits(train)
    return {1: pool, 2: pool}


def encode_splits(model: VLM, trial: TrialConfig, train: list[Split], evals: list[Split]) -> tuple[list[Split], list[Split]]:
    """With a frozen tower (LLaVA keeps CLIP frozen) the images are replaced by their patch
    features once, instead of re-encoding every image at every step."""
    data, size = trial.data, trial.vision.image_size

    def encode(split: Split, name: str, n: int) -> Split:
        tag = f"{split.benchmark.name}-{name}-n{n}-img{size}"
        features = split_features(model.vision, trial.vision, data.data_seed, split, tag)
        return dataclasses.replace(split, images=features, labels=None)

    if data.llava is not None:  # streamed: each batch's images go through the frozen tower
        return train, evals

    return (
        [encode(s, "train", data.train_examples) for s in train],
        [encode(s, "eval", data.eval_examples) for s in evals],
    )


def attach_features(model: VLM, trial: TrialConfig, sets: list[Any], store: str | None, rank: int, world_size: int) -> int:
    """Give each LLaVA set its frozen tower's features (llava_data.FeatureShards): the
    shards not yet in the store are split across the workers (rank 0 decides which are
    missing, each rank builds every world_size-th of them), then everyone waits for all of
    them. A later trial with the same tower, preprocessing and data builds none. Returns
    the shards this rank built."""
    from .llava_data import FeatureShards, feature_key, tower_identity

    assert trial.data.llava is not None
    tower = tower_identity(model.vision, trial.vision, trial.data.llava.image_aspect)
    shards = [FeatureShards(feature_key(tower, s.records), len(s), store) for s in sets]
    # every missing (set, shard) once, even when two sets read the same file (stage 1 and 2)
    todo: list[Any] = [None]
    if rank == 0:
        first = {}
        for i, shard_set in enumerate(shards):
            first.setdefault(shard_set.key, i)
        todo[0] = [(i, k) for i, shard_set in enumerate(shards) if first[shard_set.key] == i for k in shard_set.missing()]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(todo, src=0)
    built = 0
    for i, k in todo[0][rank::world_size]:
        shards[i].build(k, lambda pixels: encode_images(model.vision, pixels), sets[i])
        built += 1
    if world_size > 1:
        dist.barrier()  # every shard is in place before anyone reads
    for llava_set, shard_set in zip(sets, shards, strict=True):
        llava_set.features = shard_set
    return built


def _check_token_ids(model: VLM, splits: list[Split]) -> None:
    """A tokenizer whose ids outrun the LM's embedding table fails here, by name, instead
    of as an index error deep inside the first step."""
    vocab = model.llm.get_input_embeddings().num_embeddings
    for split in splits:
        # a LLaVA set's ids are its tokenizer's: any of them may come
        top = split.vocab_size - 1 if hasattr(split, "vocab_size") else int(max(split.questions.max(initial=0), split.answers.max(initial=0)))
        if top >= vocab:
            raise ValueError(
                f"{split.benchmark.name}: token id {top} but the LM's embedding has {vocab} rows; "
                "the tokenizer beside the LLM checkpoint does not belong to it"
            )


@dataclasses.dataclass(frozen=True)
class Stage:
    """One LLaVA stage as this worker runs it."""

    number: int  # 1: compressor only (LM frozen); 2: compressor + LM
    steps: int  # optimizer steps
    lr: float
    zero_stage: int
    global_batch: int  # examples per optimizer step over all workers
    accumulation: int  # micro-batches per worker per optimizer step


def stage_plan(trial: TrialConfig, number: int, world_size: int, examples: int | None = None) -> Stage:
    """Stage `number` on `world_size` workers; its steps are the train section's, or with
    LLaVA data the stage's own `steps` / `epochs` over its `examples`."""
    train = trial.train
    steps = train.stage1_steps if number == 1 else train.stage2_steps
    llava = trial.data.llava
    if llava is not None and examples is not None:
        from .llava_data import stage_steps

        steps = stage_steps(llava.stage(number), steps, examples, train.global_batch_of(number))
    return Stage(
        number=number,
        steps=steps,
        lr=train.stage1_lr if number == 1 else train.stage2_lr,
        zero_stage=train.zero_stage_of(number),
        global_batch=train.global_batch_of(number),
        accumulation=train.accumulation(number, world_size),
    )


def deepspeed_config(trial: TrialConfig, stage: Stage, use_bf16: bool) -> dict[str, Any]:
    return {
        # DeepSpeed checks global = micro x accumulation x world size
        "train_batch_size": stage.global_batch,
        "train_micro_batch_size_per_gpu": trial.train.micro_batch,
        "gradient_accumulation_steps": stage.accumulation,
        "gradient_clipping": 1.0,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: use torch's AdamW instead of DeepSpeed's fused op (no op builds on CPU)
            "params": {"lr": stage.lr, "weight_decay": trial.train.weight_decay, "torch_adam": True},
        },
        "zero_optimization": {"stage": stage.zero_stage},
        "bf16": {"enabled": use_bf16},
        "steps_per_print": 10**9,  # quiet: progress goes through the launcher's report
    }


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _precision(trial: TrialConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """(bf16 on?, the compute dtype): bf16 when asked, or on `auto` where CUDA supports it."""
    use_bf16 = trial.train.bf16 == "on" or (
        trial.train.bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return use_bf16, torch.bfloat16 if use_bf16 else torch.float32


def _batch(split: Any, index: np.ndarray, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The examples `index` of a split (generated) or LLaVA set: what VLM.forward takes."""
    return _tensors(split.batch(index), device, dtype)


def _tensors(arrays: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A batch's numpy arrays as tensors on `device`; images (or features) in `dtype`."""
    return {
        name: torch.from_numpy(np.ascontiguousarray(array)).to(device, dtype if name == "images" else None)
        for name, array in arrays.items()
    }


def warmup_cosine(steps: int, warmup_fraction: float):
    """LR multiplier: linear warmup over the first `warmup_fraction` of the steps, then a
    cosine decay to 0 (short runs gain a lot from annealing)."""
    warmup = max(1, int(round(warmup_fraction * steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def stage_engine(model: VLM, trial: TrialConfig, stage: Stage, use_bf16: bool):
    """One stage's DeepSpeed engine over the parameters that require grad (AdamW, the
    warmup-cosine schedule over the stage's optimizer steps)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    schedule = warmup_cosine(stage.steps, trial.train.warmup_fraction)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=deepspeed_config(trial, stage, use_bf16),
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


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, stage: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, stage, epoch]).permutation(n)


def global_batch_indices(seed: int, stage: int, step: int, n: int, global_batch: int) -> np.ndarray:
    """The examples of optimizer step `step`: the next `global_batch` positions of one seeded
    permutation of the `n` examples per epoch (each example once per epoch). A pure
    function of (seed, stage, step), so a resumed run continues the same stream and any
    number of workers sees the same examples at the same step."""
    out, position = [], step * global_batch
    while sum(len(o) for o in out) < global_batch:
        epoch, offset = divmod(position, n)
        take = _epoch_order(seed, stage, epoch, n)[offset : offset + global_batch - sum(len(o) for o in out)]
        out.append(take)
        position += len(take)
    return np.concatenate(out)


def worker_micro_batches(indices: np.ndarray, rank: int, world_size: int, micro_batch: int, accumulation: int) -> list[np.ndarray]:
    """This worker's disjoint share of a global batch, as `accumulation` micro-batches."""
    share = micro_batch * accumulation
    mine = indices[rank * share : (rank + 1) * share]
    return [mine[i * micro_batch : (i + 1) * micro_batch] for i in range(accumulation)]


def _mean_over_workers(value: float, world_size: int, device: torch.device) -> float:
    if world_size == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size


def stage_step(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward and backward of one micro-batch (`_batch`); DeepSpeed steps the optimizer at
    the last micro-batch of an accumulation. Returns the loss."""
    loss, _ = engine(**batch)
    engine.backward(loss)
    engine.step()
    return loss


class MicroBatches:
    """This worker's micro-batches of steps `start_step`..`steps` of a stage, in order, as a
    map-style dataset: item k is the k-th micro-batch (numpy arrays). The examples are the
    step function's (`global_batch_indices`, `worker_micro_batches`), so a DataLoader over it
    reads ahead in worker processes without changing which examples come when."""

    def __init__(self, source: Any, trial: TrialConfig, stage: Stage, rank: int, world_size: int, start_step: int):
        self.source, self.seed, self.stage = source, trial.seed, stage
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.micro_batch = trial.train.micro_batch

    def __len__(self) -> int:
        return (self.stage.steps - self.start_step) * self.stage.accumulation

    def indices(self, k: int) -> np.ndarray:
        step, micro = divmod(k, self.stage.accumulation)
        step += self.start_step
        examples = global_batch_indices(self.seed, self.stage.number, step, len(self.source), self.stage.global_batch)
        return worker_micro_batches(examples, self.rank, self.world_size, self.micro_batch, self.stage.accumulation)[micro]

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        return self.source.batch(self.indices(k))


def micro_batch_stream(batches: MicroBatches, loader_workers: int) -> Any:
    """The micro-batches in order: read here (in memory, or `loader_workers` = 0), or by a
    torch DataLoader whose worker processes read, decode and tokenize ahead."""
    if loader_workers == 0:
        return (batches[k] for k in range(len(batches)))
    from torch.utils.data import DataLoader

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader's forks tokenize, not threads
    return iter(DataLoader(
        batches, batch_size=None, shuffle=False, num_workers=loader_workers, prefetch_factor=4,
        collate_fn=lambda arrays: arrays,  # numpy stays numpy: the train loop makes the tensors
    ))


STATE_FILE = "state.json"  # beside DeepSpeed's files: where a checkpoint is in the trial


@dataclasses.dataclass
class Progress:
    """Where a trial stands: what a checkpoint records besides DeepSpeed's own state."""

    stage: int = 1
    step: int = 0  # optimizer steps done in `stage`
    stage1_loss: float = float("nan")
    tag: str = ""  # DeepSpeed's checkpoint tag
    recent_losses: list[float] = dataclasses.field(default_factory=list)  # the stage's last 10 step losses
    # the training curve so far (Curve.points) and the step losses since its last point,
    # so that a resumed trial stores every point of its curve exactly once
    curve: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pending_losses: list[float] = dataclasses.field(default_factory=list)

    @classmethod
    def read(cls, checkpoint_dir: str | None) -> Progress | None:
        if not checkpoint_dir or not os.path.exists(os.path.join(checkpoint_dir, STATE_FILE)):
            return None
        with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
            return cls(**json.load(f))


class Curve:
    """The trial's training curve: a point every `train.report_every` optimizer steps of a
    stage and at the stage's last step, each the mean of the step losses since the point
    before (every step's loss is already the mean over the workers, so every rank holds the
    same curve). The points are the progress reports (CURVE_COLUMNS' stage, step, steps,
    loss, elapsed_seconds); `elapsed_seconds` counts from `started` (time.perf_counter()
    when this attempt began), and a resumed trial's earlier points, carried in its
    checkpoint, keep their own attempt's times."""

    def __init__(self, every: int, started: float, resumed: Progress | None = None):
        self.every, self.started = every, started
        self.points: list[dict[str, Any]] = list(resumed.curve) if resumed else []
        self.pending: list[float] = list(resumed.pending_losses) if resumed else []

    def step(self, stage: Stage, step: int, loss: float) -> dict[str, Any] | None:
        """Record the loss of the stage's optimizer step `step` (counted from 1); the new
        point when one is due, else None."""
        if not self.every:
            return None
        self.pending.append(loss)
        if step % self.every and step < stage.steps:
            return None
        point = {
            "stage": stage.number, "step": step, "steps": stage.steps, "loss": float(np.mean(self.pending)),
            "elapsed_seconds": time.perf_counter() - self.started,
        }
        self.points.append(point)
        self.pending = []
        return point

    def carried(self) -> dict[str, list]:
        """What a checkpoint's Progress carries of the curve (a copy)."""
        return {"curve": list(self.points), "pending_losses": list(self.pending)}


Checkpoint = Callable[[Any, Progress], None]
"""`checkpoint(engine, progress)`: save the engine's trainable state where the launcher
persists it (every rank takes part)."""


def run_stage(
    engine: Any,
    trial: TrialConfig,
    stage: Stage,
    source: Any,
    *,
    rank: int,
    world_size: int,
    start_step: int,
    device: torch.device,
    dtype: torch.dtype,
    checkpoint: Callable[[int, list[float]], None] | None,
    previous_losses: list[float] | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Optimizer steps `start_step`..`stage.steps` of one stage; returns each step's loss
    (the mean over all workers), after `previous_losses` (a resumed stage's last ones). Each step's global batch mixes benchmarks; this worker
    runs its share as `stage.accumulation` micro-batches (DeepSpeed steps the optimizer at
    the last). `progress(step, loss)` runs after every step (counted from 1), then
    `checkpoint(step, loss)` after every `train.checkpoint_every` steps."""
    every = trial.train.checkpoint_every
    losses: list[float] = list(previous_losses or [])
    batches = MicroBatches(source, trial, stage, rank, world_size, start_step)
    # in-memory splits are indexed here; LLaVA sets are read ahead by the loader's processes
    workers = trial.data.llava.loader_workers if trial.data.llava is not None else 0
    stream = micro_batch_stream(batches, workers)
    for step in range(start_step, stage.steps):
        micro_losses = []
        for _ in range(stage.accumulation):
            micro_losses.append(stage_step(engine, _tensors(next(stream), device, dtype)).item())
        losses.append(_mean_over_workers(float(np.mean(micro_losses)), world_size, device))
        if progress is not None:
            progress(step + 1, losses[-1])
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < stage.steps:
            checkpoint(step + 1, losses[-10:])
    return losses


def release(engine: Any) -> None:
    """Destroy a stage's engine (its hooks and optimizer state: an in-trial process runs many
    trials) and undo what ZeRO-3 changed for the whole process: it swaps
    torch.nn.functional.linear for its own memory-efficient version and leaves it there,
    which would change the numbers of every later trial in the process."""
    engine.destroy()
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None:
        torch.nn.functional.linear = original


def _tail_mean(losses: list[float]) -> float:
    return float(np.mean(losses[-10:])) if losses else float("nan")


def _trainable_state(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Full copies of the parameters that require grad (gathered from every rank's shard
    under ZeRO-3), for the next stage's model."""
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


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


def _stride(n: int, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's examples of an eval set of `n`: every `world_size`-th from `rank`, padded
    to the same count on every rank (ZeRO-3's forward passes gather weights together) with
    example 0, which `counted` leaves out."""
    per_rank = -(-n // world_size)
    index = np.arange(rank, per_rank * world_size, world_size)
    counted = index < n
    return np.where(counted, index, 0), counted


@torch.no_grad()
def evaluate(
    module: torch.nn.Module, splits: list[Split], device: torch.device, dtype: torch.dtype,
    rank: int = 0, world_size: int = 1, batch: int = 256,
) -> list[BenchmarkScore]:
    """Exact match of the whole answer (teacher-forced argmax at every answer position up
    to and including the first <eos> is exactly greedy decoding's success condition; the
    <eos> padding after it does not count), one score per benchmark.

    Every worker scores a disjoint stride of each eval set and the counts are summed over
    the workers: under ZeRO-3 the forward passes gather the partitioned weights together,
    so every rank runs the same number of batches (a short stride repeats an example that
    is not counted)."""
    module.eval()
    scores = []
    for split in splits:
        if not isinstance(split, Split):  # a LLaVA eval set: scored by its benchmark's metric
            scores.append(_evaluate_generated(module, split, device, dtype, rank, world_size))
            continue
        index, counted = _stride(len(split), rank, world_size)
        correct = 0
        for start in range(0, len(index), batch):
            chunk, keep = index[start : start + batch], counted[start : start + batch]
            inputs = _batch(split, chunk, device, dtype)
            _, logits = module(**inputs)
            answers, answer_mask = inputs["answers"], inputs["answer_mask"]
            hits = ((logits.argmax(-1) == answers) | (answer_mask == 0)).all(dim=1).cpu().numpy()
            correct += int((hits & keep).sum())
        correct = round(_mean_over_workers(float(correct), world_size, device) * world_size)
        # real question length: the left padding is a batching device, not part of the query
        text_tokens = float((split.questions != split.pad_id).sum(axis=1).mean())
        # real answer length: up to and including the first <eos> (a cut answer has none)
        before_eos = (np.cumsum(split.answers == split.eos_id, axis=1) == 0).sum(axis=1)
        generated = float(np.minimum(before_eos + 1, split.answers.shape[1]).mean())
        scores.append(BenchmarkScore(
            split.benchmark.name, split.benchmark.task_family, correct / len(split),
            split.benchmark.chance, len(split), text_tokens, generated,
        ))
    module.train()
    return scores


def _evaluate_generated(
    module: torch.nn.Module, split: Any, device: torch.device, dtype: torch.dtype, rank: int, world_size: int,
    batch: int = 64,
) -> BenchmarkScore:
    """A LLaVA eval set (llava_data.LlavaSet), as the benchmarks score it: greedy answers
    (KV cache, at most `max_new_tokens`), decoded, then the set's metric against its
    reference answers (workers/metrics.py). Every rank decodes a stride; rank 0 gathers the
    texts and scores."""
    from .metrics import score_set

    index, counted = _stride(len(split), rank, world_size)
    # (example, answer text, generated tokens incl. <eos>, prompt tokens: head + question)
    mine: list[tuple[int, str, int, int]] = []
    for start in range(0, len(index), batch):
        chunk = index[start : start + batch]
        inputs = _batch(split, chunk, device, dtype)
        prompt = {k: inputs[k] for k in ("heads", "head_mask", "image_mask") if k in inputs}
        generated = module.generate(
            inputs["images"], inputs["questions"], inputs["question_mask"], split.max_new_tokens, split.eos_id, **prompt,
        ).cpu().numpy()
        text_tokens = inputs["question_mask"].sum(1) + (inputs["head_mask"].sum(1) if "head_mask" in inputs else 0)
        for i, row, keep, tokens in zip(chunk, generated, counted[start : start + batch], text_tokens.tolist(), strict=True):
            if keep:
                ids = row.tolist()
                length = ids.index(split.eos_id) + 1 if split.eos_id in ids else len(ids)
                mine.append((int(i), split.decode(ids[: length - (split.eos_id in ids)]), length, int(tokens)))
    if world_size > 1:
        import torch.distributed as dist

        everyone: list[list[tuple[int, str, int, int]]] = [[] for _ in range(world_size)]
        dist.all_gather_object(everyone, mine)
        mine = [item for part in everyone for item in part]
    mine.sort()
    predictions = [text for _, text, _, _ in mine]
    references, options = split.scoring()
    score, _accuracy = score_set(split.metric, predictions, references, options)
    return BenchmarkScore(
        split.benchmark.name, split.benchmark.task_family, score, split.benchmark.chance, len(split),
        float(np.mean([tokens for *_, tokens in mine])), float(np.mean([length for _, _, length, _ in mine])),
    )


@dataclasses.dataclass(frozen=True)
class ModelSizes:
    """What the result rows say about the model, counted once before DeepSpeed partitions it."""

    llm_params: int  # N, the paper's model size
    llm_params_non_embedding: int
    compressor_params: int
    compressor_flops: float

    @classmethod
    def of(cls, trial: TrialConfig, model: VLM) -> ModelSizes:
        """N is the count the config declares (`llm.params`, e.g. 0.5e9 for Qwen1.5-0.5B) when
        it declares one, else the LM's counted parameters, embeddings included; the
        non-embedding count (token embedding and LM head left out) is always counted."""
        declared = trial.llm.params
        counted = sum(p.numel() for p in model.llm.parameters())  # a tied head counts once
        return cls(
            int(round(declared)) if declared is not None else counted,
            model.llm_params,
            model.compressor.num_parameters(),
            float(model.compressor.flops()),
        )


def result_rows(
    trial: TrialConfig,
    sizes: ModelSizes,
    scores: list[BenchmarkScore],
    *,
    config_hash: str,
    train_seconds: float,
    eval_seconds: float,
) -> list[dict[str, Any]]:
    """One typed result row per benchmark (tokenscale.store.result_row), priced with
    tokenscale.costs.inference_flops at the benchmark's mean query."""
    llm_params = sizes.llm_params
    finished_at = datetime.now(timezone.utc)
    return [
        result_row(
            grid=trial.grid,
            trial_id=trial.trial_id,
            config_hash=config_hash,
            llm=trial.llm.name,
            llm_params=llm_params,
            llm_params_non_embedding=sizes.llm_params_non_embedding,
            visual_tokens=trial.visual_tokens,
            compressor=trial.compressor,
            compressor_params=sizes.compressor_params,
            compressor_flops=sizes.compressor_flops,
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


def curve_rows(trial: TrialConfig, points: list[dict[str, Any]], *, config_hash: str) -> list[dict[str, Any]]:
    """The trial's curve (Curve.points) as CURVE_SCHEMA rows (tokenscale.store.CURVE_COLUMNS)."""
    return [
        {
            "grid": trial.grid, "trial_id": trial.trial_id, "config_hash": config_hash, "llm": trial.llm.name,
            "visual_tokens": trial.visual_tokens, "compressor": trial.compressor, "seed": trial.seed,
            "stage": int(p["stage"]), "step": int(p["step"]), "steps": int(p["steps"]), "loss": float(p["loss"]),
            "elapsed_seconds": float(p["elapsed_seconds"]),
        }
        for p in points
    ]


def _build_model(trial: TrialConfig, device: torch.device, dtype: torch.dtype) -> VLM:
    """The VLM in the compute dtype (a bf16 checkpoint LM never sits in fp32 on the GPU),
    with the LM's attention kernel and gradient checkpointing as the trial asks; seeded, so
    every rank and every rebuild starts from the same weights."""
    torch.manual_seed(trial.seed)
    # train mode: from_pretrained returns its modules in eval mode, where transformers skips
    # gradient checkpointing (and the LM would train without its dropout)
    model = VLM(trial, dtype=dtype).to(device).train()
    if trial.train.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def train_and_evaluate(
    trial: TrialConfig,
    rank: int = 0,
    world_size: int = 1,
    checkpoint_dir: str | None = None,
    checkpoint: Checkpoint | None = None,
    *,
    config_hash: str | None = None,
    store: str | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Both stages then eval; returns metrics (with the result `rows` and the training
    `curve`, Curve.points, on rank 0).

    With LLaVA data and a frozen tower, the sets' patch features are computed once into
    shards under `<store>/features/` (the local cache without a store) and read from there.

    `checkpoint_dir` (a retried trial's last checkpoint) resumes where it was taken: in
    stage 1 or 2, at its optimizer step, with its optimizer, schedule and RNG state; the
    data stream is a function of the step. `checkpoint(engine, progress)` is called at the
    end of stage 1 and every `train.checkpoint_every` steps of both stages; `report(point)`
    (every rank) at each point of the curve, every `train.report_every` steps."""
    attempt_started = time.perf_counter()
    device = _device()
    use_bf16, dtype = _precision(trial, device)
    train_splits, eval_splits = load_splits(trial)
    model = _build_model(trial, device, dtype)
    sizes = ModelSizes.of(trial, model)  # before ZeRO-3 partitions the parameters
    _check_token_ids(model, train_splits + eval_splits)
    if trial.vision.frozen:
        train_splits, eval_splits = encode_splits(model, trial, train_splits, eval_splits)
    shards_built = 0
    if trial.data.llava is not None and trial.vision.frozen:
        shards_built = attach_features(model, trial, train_splits + eval_splits, store, rank, world_size)
    sources = stage_sources(trial, train_splits)

    resumed = Progress.read(checkpoint_dir)
    curve = Curve(trial.train.report_every, attempt_started, resumed)
    first_stage = resumed.stage if resumed else 1
    started = time.perf_counter()
    losses = {1: resumed.stage1_loss if resumed else float("nan"), 2: float("nan")}
    carried: dict[str, torch.Tensor] | None = None  # stage 1's result, for stage 2's model
    engine = None
    last_loss = float("nan")
    for number in (1, 2):
        if number < first_stage:
            continue
        stage = stage_plan(trial, number, world_size, examples=len(sources[number]))
        if carried is not None and trial.train.zero_stage_of(1) == 3:
            # ZeRO-3 partitioned stage 1's parameters in place: stage 2 starts from a clean model
            model = _build_model(trial, device, dtype)
        if carried is not None:
            model.load_state_dict(carried, strict=False)
        model.llm.requires_grad_(number == 2)
        if stage.steps == 0:
            continue
        engine = stage_engine(model, trial, stage, use_bf16)
        start_step = 0
        if resumed is not None and resumed.stage == number:
            _, client_state = engine.load_checkpoint(checkpoint_dir, tag=resumed.tag, load_module_strict=False)
            if client_state and "torch_rng" in client_state:
                torch.set_rng_state(client_state["torch_rng"])
            start_step = resumed.step

        def save(step: int, recent: list[float], engine=engine, number=number) -> None:
            if checkpoint is not None:
                stage1_loss = losses[1] if number == 2 else _tail_mean(recent)
                checkpoint(engine, Progress(number, step, stage1_loss, f"stage{number}-step{step}", list(recent),
                                            **curve.carried()))

        def progress(step: int, loss: float, stage=stage) -> None:
            point = curve.step(stage, step, loss)
            if point is not None and report is not None:
                report(dict(point))

        resumed_here = resumed is not None and resumed.stage == number
        step_losses = run_stage(
            engine, trial, stage, sources[number], rank=rank, world_size=world_size, start_step=start_step,
            device=device, dtype=dtype, checkpoint=save, previous_losses=resumed.recent_losses if resumed_here else None,
            progress=progress,
        )
        last_loss = step_losses[-1] if step_losses else last_loss
        # a checkpoint taken at stage 1's end resumes with nothing left of it to run
        stage1_was_done = number == 1 and resumed_here and start_step == stage.steps
        losses[number] = resumed.stage1_loss if stage1_was_done else _tail_mean(step_losses)
        if number == 1:
            if checkpoint is not None and not stage1_was_done:
                checkpoint(engine, Progress(1, stage.steps, losses[1], f"stage1-step{stage.steps}", step_losses[-10:],
                                            **curve.carried()))
            carried = _trainable_state(engine, stage.zero_stage)
            release(engine)
            engine = None
    train_seconds = time.perf_counter() - started

    metrics: dict[str, Any] = {
        "stage1_loss": losses[1],
        "stage2_loss": losses[2],
        "last_step_loss": last_loss,  # the final optimizer step's: equal for a resumed and an unbroken run
        "train_seconds": train_seconds,
        "resumed_from_stage": resumed.stage if resumed else 0,
        "resumed_from_step": resumed.step if resumed else 0,
        "feature_shards_built": shards_built,
    }
    started = time.perf_counter()
    module = engine.module if engine is not None else model.to(dtype)
    scores = evaluate(module, eval_splits, device, dtype, rank, world_size)
    eval_seconds = time.perf_counter() - started
    if rank == 0:
        metrics["rows"] = result_rows(
            trial, sizes, scores, config_hash=config_hash or trial.config_hash,
            train_seconds=train_seconds, eval_seconds=eval_seconds,
        )
        metrics["mean_score"] = float(np.mean([s.score for s in scores]))
        metrics["curve"] = list(curve.points)
    if trial.train.keep_final:  # every rank: ZeRO-3 gathers the shards
        final = _trainable_state(engine, trial.train.zero_stage_of(2)) if engine is not None else {
            n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        module = engine.module if engine is not None else model
        # BatchNorm's running statistics (token_norm: batch) are buffers, not parameters
        final.update({f"visual_norm.{n}": b.detach().cpu().clone() for n, b in module.visual_norm.named_buffers()})
        if rank == 0:
            metrics["final_weights"] = final_weights_bytes(final)
    if engine is not None:
        release(engine)
    return metrics


def final_weights_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """The trainable parameters at the end of stage 2 (compressor + LM and the visual
    norm / positions), fp32, as `torch.save` bytes: what `train.keep_final` stores."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def evaluate_kept(
    trial: TrialConfig, weights: bytes, eval_sets: list[Any], config_hash: str, store: str | None = None,
) -> list[dict[str, Any]]:
    """Score a trial whose final weights were kept (`train.keep_final`) on LLaVA eval sets
    (config.LlavaEvalSpec) it was not trained with: the model rebuilt as the trial built it
    (frozen weights from their checkpoints), its trainable weights loaded, no training. One
    result row per set, as the trial's own rows."""
    from . import llava_data

    if trial.data.llava is None:
        raise ValueError("tokenscale eval scores LLaVA-format eval sets: the grid has no data.llava (no tokenizer)")
    device = _device()
    _, dtype = _precision(trial, device)
    model = _build_model(trial, device, dtype)
    sizes = ModelSizes.of(trial, model)
    state = torch.load(io.BytesIO(weights), map_location=device, weights_only=True)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"the kept weights of {trial.trial_id} lack {len(missing)} trainable tensors, e.g. {missing[0]}")
    model.load_state_dict(state, strict=False)
    spec = trial.data.llava.model_copy(update={"eval": tuple(eval_sets)})
    _, sets = llava_data.load_sets(trial.model_copy(update={"data": trial.data.model_copy(update={"llava": spec})}))
    _check_token_ids(model, sets)
    if trial.vision.frozen:  # the features the trial's own sets were scored on: float16-rounded
        attach_features(model, trial, sets, store, 0, 1)
    started = time.perf_counter()
    scores = evaluate(model.to(dtype), sets, device, dtype)
    return result_rows(trial, sizes, scores, config_hash=config_hash, train_seconds=0.0,
                       eval_seconds=time.perf_counter() - started)


def single_process_group(backend: str) -> None:
    """A torch.distributed world of one, for DeepSpeed. Ray Train's worker group and
    torchrun set one up; training alone (`execution: in_trial`, `python -m
    tokenscale.workers`) needs its own. Kept for the process's next trial, which Tune runs
    in the same process."""
    import torch.distributed as dist

    # the torch launcher's variables (DeepSpeed reads LOCAL_RANK itself), also when the
    # group is already there: something in the process may have cleared them since
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    if dist.is_initialized():
        if dist.get_backend() != backend:
            raise RuntimeError(f"torch.distributed already runs {dist.get_backend()!r} in this process, not {backend!r}")
        return
    # an in-memory store: a world of one needs no rendezvous, so no port is opened
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


def check_world(trial: TrialConfig, world_size: int) -> None:
    """What the grid's validation checks for each LLM's workers, for a launcher that chose
    the world size itself (torchrun): ValueError naming the field, before any work."""
    for stage in (1, 2):
        trial.train.accumulation(stage, world_size)
    if world_size > 1 and trial.vision.visual_norm == "batch":
        raise ValueError(
            f"vision.token_norm: batch keeps per-worker BatchNorm statistics, but this trial runs on {world_size} "
            "workers; set vision.token_norm: none (LLaVA's projector) or run it on one worker"
        )


Report = Callable[..., None]
"""`report(metrics, checkpoint_dir=None)`: progress and the final metrics of one worker,
with a local directory holding this rank's part of a checkpoint. Every rank reports the
same number of times; the launcher merges the ranks' directories into one checkpoint
(Ray Train does) and keeps the last two. Three kinds: a curve point every
`train.report_every` steps ({stage, step, steps, loss, elapsed_seconds}: Curve), a
checkpoint ({stage, step, checkpoint} with the directory), the final metrics (with
`train_seconds`)."""


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

    Checkpoints (stage 1's end, and every `train.checkpoint_every` optimizer steps) hold
    only what changes: the trainable parameters, optimizer and scheduler state (DeepSpeed's,
    each rank its shard), the RNG state, and `state.json` (stage, step, loss). Frozen
    weights (the LM in stage 1, the vision tower) are rebuilt, not saved.
    `latest_checkpoint()` hands the last one back to a retried trial, which resumes there.
    Rank 0 writes the trial's curve, then its rows to `store`: one object each, one PUT,
    keyed by `config_hash` (default: the trial's own); the rows last, as the commit marker.
    Returns the rows on rank 0, None elsewhere."""
    from tokenscale.store import Store

    check_world(trial, world_size)
    if threads:
        torch.set_num_threads(threads)
    init_process_group(backend, rank, world_size)
    config_hash = config_hash or trial.config_hash

    def checkpoint(engine: Any, progress: Progress) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(
                tmp, tag=progress.tag, client_state={"torch_rng": torch.get_rng_state()},
                exclude_frozen_parameters=True,
            )
            if rank == 0:
                with open(os.path.join(tmp, STATE_FILE), "w") as f:
                    json.dump(dataclasses.asdict(progress), f)
            report({"stage": progress.stage, "step": progress.step, "checkpoint": progress.tag}, tmp)

    metrics = train_and_evaluate(
        trial, rank, world_size, latest_checkpoint(), checkpoint, config_hash=config_hash, store=store, report=report,
    )
    rows = metrics.pop("rows", None)
    weights = metrics.pop("final_weights", None)
    points = metrics.pop("curve", None)
    if rank == 0 and store is not None:
        target = Store.open(store)
        # before the result (the commit marker): a trial with a result has its curve; a
        # retried trial overwrites its own (the whole curve: a resumed one carried its points)
        target.write_curve(trial.grid, trial.compressor, config_hash, curve_rows(trial, points or [], config_hash=config_hash))
        if weights is not None:  # before the result: a trial with a result has its weights
            target.put_bytes(target.weights_key(trial.grid, trial.compressor, config_hash), weights)
        target.write_results(trial.grid, trial.compressor, config_hash, rows)
    report(metrics)
    return rows
