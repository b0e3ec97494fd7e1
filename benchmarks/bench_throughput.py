"""Training throughput of one stage-2 step: the demo's sizes on CPU, a Qwen2-0.5B shape on a GPU.

    .venv/bin/python benchmarks/bench_throughput.py                  # CPU part (< 2 min), GPU part if any
    .venv/bin/python benchmarks/bench_throughput.py --quick          # a smoke run: 3 timed steps each
    .venv/bin/python benchmarks/bench_throughput.py --part gpu --seq-len 2048 --micro-batch 8

CPU part. For each LLM x V of a grid YAML (default configs/demo.yaml; one
compressor, the grid's first unless --compressor), the trial's VLM
is built as a trial builds it (TrialConfig from the grid, pretrained/frozen tower and its
cached patch features, micro-batch and stage-2 LR from the grid) and stage-2 steps run
through the very code a trial runs (workers/train.py: stage_engine, pool_splits,
stage_step: a DeepSpeed engine with the grid's ZeRO stage). After warm-up steps, the
median step time gives

    tokens/s = micro_batch x (question tokens incl. left padding + V + answer tokens) / step time

i.e. the sequence the LM is trained on (QueCC's extra query pass over the question is not
counted). The baseline, in the same process on a fresh copy of the same model: the same
step in plain PyTorch (torch.optim.AdamW, grad-norm clipping at 1.0, the same LR schedule;
no DeepSpeed engine). The DS/plain ratio is DeepSpeed's cost (or gain) on these tiny models,
and transfers across machines better than the tokens/s do.

GPU part (only when torch.cuda.is_available()). A Qwen2 built from Qwen2-0.5B's config
(random weights), bf16, DeepSpeed ZeRO-2, random tokens of --seq-len, --micro-batch per
step; tokens/s and model FLOPs utilization (MFU = model FLOPs/s / the GPU's peak dense
bf16 FLOPs/s, formula at `model_flops_per_token`). The CPU part then runs in a child
process with the GPU hidden (CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR=cpu): a DeepSpeed
engine otherwise moves the model to the GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GRID = REPO / "configs" / "demo.yaml"

# Qwen2-0.5B, from its config.json (huggingface.co/Qwen/Qwen2-0.5B/blob/main/config.json):
# hidden 896, 24 layers, 14 heads (head dim 64), 2 KV heads, MLP 4864, vocab 151936, tied
# embeddings, rope_theta 1e6, RMSNorm eps 1e-6, SiLU, no sliding window. ~494M parameters,
# of which 136M (151936 x 896) are the embedding (= the tied LM head).
QWEN2_0_5B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
    "use_sliding_window": False,
}

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, from NVIDIA's datasheets, matched as
# substrings of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" before "H100").
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("A100", 312e12),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "cpu", "gpu"), default="all")
    parser.add_argument("--grid", default=str(DEFAULT_GRID), help="grid YAML of the CPU part")
    parser.add_argument("--compressor", help="CPU part: this compressor of the grid (default: its first)")
    parser.add_argument("--llms", nargs="+", help="CPU part: only these LLM names")
    parser.add_argument("--visual-tokens", type=int, nargs="+", help="CPU part: only these V")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: CPU 30, GPU 20)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: CPU 3, GPU 5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 warm-up + 3 timed steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU part)")
    parser.add_argument("--seq-len", type=int, default=2048, help="GPU part: tokens per sequence")
    parser.add_argument("--micro-batch", type=int, default=4, help="GPU part: sequences per step")
    parser.add_argument("--peak-tflops", type=float, help="GPU part: peak bf16 TFLOP/s (default: by GPU name)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = args.steps or 3
        args.warmup = 1 if args.warmup is None else args.warmup
    return args


def quiet_deepspeed() -> None:
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def timed(step, warmup: int, steps: int, sync=lambda: None, others=()):
    """Median seconds of `step()` over `steps` calls after `warmup` calls. With `others`,
    those steps run in turn after each call of `step`, and a tuple of medians comes back."""
    functions = [step, *others]
    times: list[list[float]] = [[] for _ in functions]
    for i in range(warmup + steps):
        for function, seconds in zip(functions, times, strict=True):
            sync()
            start = time.perf_counter()
            function()
            sync()
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    medians = tuple(statistics.median(t) for t in times)
    return medians if others else medians[0]


# ---- CPU part: the demo's trials, DeepSpeed engine vs plain PyTorch ---------------------


def cpu_trials(args: argparse.Namespace):
    from tokenscale.config import load_grid  # = parse_grid(yaml.safe_load(file))

    grid = load_grid(args.grid)
    compressor = args.compressor or grid.compressors[0].name
    order = {llm.name: i for i, llm in enumerate(grid.llms)}
    seed = grid.seeds[0]
    trials = [
        t
        for t in grid.trials()
        if t.compressor == compressor
        and t.seed == seed
        and (not args.llms or t.llm.name in args.llms)
        and (not args.visual_tokens or t.visual_tokens in args.visual_tokens)
    ]
    if not trials:
        raise SystemExit(f"{args.grid}: no trial of compressor {compressor!r} matches --llms/--visual-tokens")
    return sorted(trials, key=lambda t: (order[t.llm.name], t.visual_tokens))


def deepspeed_step(model, pool, trial, use_bf16: bool):
    """A stage-2 step as workers/train.py's run_stage runs it."""
    from tokenscale.workers.train import _batch, stage_engine, stage_plan, stage_step

    device = torch.device("cpu")
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    engine = stage_engine(model, trial, stage_plan(trial, 2, world_size=1), use_bf16)
    rng = np.random.default_rng([trial.seed, 0])

    def step():
        index = rng.integers(0, len(pool), trial.train.micro_batch)
        stage_step(engine, _batch(pool, index, device, dtype)).item()

    return step


def plain_torch_step(model, pool, trial, use_bf16: bool):
    """The same step without the DeepSpeed engine: torch.optim.AdamW, gradient clipping at
    1.0 (DeepSpeed's gradient_clipping) and the same LR schedule (bf16: autocast)."""
    from tokenscale.workers.train import _batch, warmup_cosine

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=trial.train.stage2_lr, weight_decay=trial.train.weight_decay)
    factor = warmup_cosine(trial.train.stage2_steps, trial.train.warmup_fraction)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = np.random.default_rng([trial.seed, 0])

    def step():
        index = rng.integers(0, len(pool), trial.train.micro_batch)
        with torch.autocast("cpu", torch.bfloat16, enabled=use_bf16):
            loss, _ = model(**_batch(pool, index, torch.device("cpu"), torch.float32))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def cpu_part(args: argparse.Namespace) -> list[dict]:
    import deepspeed  # noqa: F401 - imported (and its logger quieted) before the first engine

    from tokenscale.workers.model import VLM
    from tokenscale.workers.train import (
        encode_splits,
        load_splits,
        pool_splits,
        single_process_group,
    )

    quiet_deepspeed()
    torch.set_num_threads(args.threads)
    single_process_group("gloo")
    steps = args.steps or 30
    warmup = 3 if args.warmup is None else args.warmup
    device = torch.device("cpu")
    trials = cpu_trials(args)
    first = trials[0]
    use_bf16 = first.train.bf16 == "on"  # train_and_evaluate's rule on a CPU ("auto" = off)
    print(
        f"stage-2 training step on CPU: grid {args.grid}, compressor {first.compressor}, "
        f"micro_batch {first.train.micro_batch}, ZeRO-{first.train.stage2_zero_stage}, {'bf16' if use_bf16 else 'fp32'}, "
        f"threads {args.threads}, median of {steps} steps after {warmup} warm-up",
        flush=True,
    )

    pools: dict = {}  # the training pool depends only on (vision, data): encoded once

    def build(trial):
        torch.manual_seed(trial.seed)  # as train_and_evaluate
        model = VLM(trial).to(device)
        key = (trial.vision, trial.data)
        if key not in pools:
            started = time.perf_counter()
            train, evals = load_splits(trial)
            if trial.vision.frozen:
                train, evals = encode_splits(model, trial, train, evals)
            pools[key] = pool_splits(train)
            print(f"(data and patch features: {time.perf_counter() - started:.1f} s, not timed)", flush=True)
        model.llm.requires_grad_(True)  # stage 2: compressor + LM (+ the tower unless frozen)
        return model, pools[key]

    header = (
        f"{'llm':<10}{'N (non-emb)':>12}{'V':>5}{'tok/step':>10}{'DS ms':>9}{'DS tok/s':>11}"
        f"{'plain ms':>10}{'plain tok/s':>13}{'DS/plain':>10}"
    )
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for trial in trials:
        micro = trial.train.micro_batch
        model, pool = build(trial)
        tokens = micro * (pool.questions.shape[1] + trial.visual_tokens + pool.answers.shape[1])
        ds_step = deepspeed_step(model, pool, trial, use_bf16)
        model, pool = build(trial)  # a fresh copy of the same model for the baseline
        plain_step = plain_torch_step(model, pool, trial, use_bf16)
        # alternated step by step, so that load from elsewhere on a shared machine hits both
        ds_seconds, plain_seconds = timed(ds_step, warmup, steps, others=[plain_step])
        row = {
            "llm": trial.llm.name,
            "llm_params": model.llm_params,
            "visual_tokens": trial.visual_tokens,
            "compressor": trial.compressor,
            "micro_batch": micro,
            "tokens_per_step": tokens,
            "ds_seconds_per_step": ds_seconds,
            "ds_tokens_per_s": tokens / ds_seconds,
            "plain_seconds_per_step": plain_seconds,
            "plain_tokens_per_s": tokens / plain_seconds,
            "ds_over_plain": (tokens / ds_seconds) / (tokens / plain_seconds),
        }
        rows.append(row)
        print(
            f"{row['llm']:<10}{row['llm_params']:>12,}{row['visual_tokens']:>5}{tokens:>10}"
            f"{ds_seconds * 1e3:>9.1f}{row['ds_tokens_per_s']:>11,.0f}"
            f"{plain_seconds * 1e3:>10.1f}{row['plain_tokens_per_s']:>13,.0f}{row['ds_over_plain']:>10.2f}",
            flush=True,
        )
    ratios = [r["ds_over_plain"] for r in rows]
    print(
        f"DeepSpeed/plain tokens/s: median {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(rows)} LLM x V points",
        flush=True,
    )
    return rows


def cpu_part_in_child(argv: list[str]) -> list[dict]:
    """The CPU part in a child process that sees no GPU (and a CPU DeepSpeed accelerator)."""
    import tempfile

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cpu.json")
        command = [sys.executable, __file__, *argv, "--part", "cpu", "--json", out]
        subprocess.run(command, env=env, check=True)
        with open(out) as f:
            return json.load(f)["cpu"]


# ---- GPU part: a Qwen2-0.5B-shaped LM, bf16, DeepSpeed ZeRO-2 --------------------------


def model_flops_per_token(llm, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), as in the PaLM paper's
    MFU (arXiv 2204.02311, appendix B):

        6 x (non-embedding params + LM head params) + 12 x layers x hidden x seq_len

    6N: 2 FLOPs per weight per token forward, 4 backward; the LM head's matmul counts even
    with tied embeddings (the embedding lookup costs nothing). 12 L d S: the attention
    scores QK^T and the weighted sum of V, 2 x 2 x S x d per layer per token forward, x3
    for training, with no discount for the causal mask."""
    from tokenscale.workers.model import non_embedding_params

    config = llm.config
    params = non_embedding_params(llm) + llm.get_output_embeddings().weight.numel()
    return 6.0 * params + 12.0 * config.num_hidden_layers * config.hidden_size * seq_len


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16 if key.lower() in name.lower()), None)


def lm_throughput(config_kwargs: dict, seq_len: int, micro_batch: int, warmup: int, steps: int, device: torch.device) -> dict:
    """tokens/s of a Qwen2 LM from `config_kwargs` (random init) under DeepSpeed ZeRO-2 bf16."""
    import deepspeed
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tokenscale.workers.model import non_embedding_params

    torch.manual_seed(0)
    llm = Qwen2ForCausalLM(Qwen2Config(**config_kwargs))
    flops_per_token = model_flops_per_token(llm, seq_len)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        # torch's AdamW (fused CUDA kernel on a GPU): DeepSpeed's FusedAdam would need an op build
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True, "fused": device.type == "cuda"}},
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=llm, model_parameters=llm.parameters(), config=config)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config_kwargs["vocab_size"], (micro_batch, seq_len), generator=generator).to(engine.device)
    losses = []

    def step():
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds = timed(step, warmup, steps, sync)
    result = {
        "params": sum(p.numel() for p in llm.parameters()),
        "non_embedding_params": non_embedding_params(llm),
        "seq_len": seq_len,
        "micro_batch": micro_batch,
        "seconds_per_step": seconds,
        "tokens_per_s": micro_batch * seq_len / seconds,
        "model_flops_per_token": flops_per_token,
        "loss": losses[-1],
    }
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def gpu_part(args: argparse.Namespace) -> dict:
    import deepspeed  # noqa: F401

    quiet_deepspeed()
    name = torch.cuda.get_device_name(0)
    torch.cuda.set_device(0)
    from tokenscale.workers.train import single_process_group

    single_process_group("nccl")
    steps = args.steps or 20
    warmup = 5 if args.warmup is None else args.warmup
    print(
        f"\nGPU part on {name}: Qwen2-0.5B-shaped LM (config values, random weights), bf16, ZeRO-2, "
        f"seq {args.seq_len} x micro-batch {args.micro_batch}, median of {steps} steps after {warmup} warm-up",
        flush=True,
    )
    row = lm_throughput(QWEN2_0_5B, args.seq_len, args.micro_batch, warmup, steps, torch.device("cuda", 0))
    peak = peak_flops(name, args.peak_tflops)
    achieved = row["tokens_per_s"] * row["model_flops_per_token"]
    row.update(gpu=name, achieved_tflops=achieved / 1e12, peak_tflops=peak / 1e12 if peak else None, mfu=achieved / peak if peak else None)
    mfu = f"{row['mfu']:.1%}" if peak else "n/a (unknown GPU: pass --peak-tflops)"
    print(f"{'gpu':<26}{'params':>14}{'ms/step':>10}{'tokens/s':>12}{'GFLOP/tok':>11}{'TFLOP/s':>9}{'peak':>7}  MFU")
    print(
        f"{name[:25]:<26}{row['params']:>14,}{row['seconds_per_step'] * 1e3:>10.1f}{row['tokens_per_s']:>12,.0f}"
        f"{row['model_flops_per_token'] / 1e9:>11.2f}{row['achieved_tflops']:>9.1f}"
        f"{(f'{peak / 1e12:.0f}' if peak else '?'):>7}  {mfu}"
    )
    print(f"(peak memory {row['max_memory_gib']:.1f} GiB, last loss {row['loss']:.2f})", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(raw)
    results: dict = {}
    cuda = torch.cuda.is_available()
    if args.part in ("all", "cpu"):
        results["cpu"] = cpu_part_in_child(raw) if cuda else cpu_part(args)
    if args.part in ("all", "gpu"):
        if cuda:
            results["gpu"] = gpu_part(args)
        else:
            print(f"\nGPU part skipped: torch.cuda.is_available() is False (torch {torch.__version__}, no CUDA device)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
