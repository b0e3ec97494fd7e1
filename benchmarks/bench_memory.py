"""Peak memory per worker of one stage-2 step: a Qwen1.5-0.5B-shaped LM + a CLIP-L/14-336 tower.

    nice -n 10 .venv/bin/python benchmarks/bench_memory.py            # CPU fp32 (GPU bf16 where CUDA is)
    .venv/bin/python benchmarks/bench_memory.py --quick                # a smoke run: a tiny LM and tower
    .venv/bin/python benchmarks/bench_memory.py --device cuda --micro-batches 1 4 16
    .venv/bin/python benchmarks/bench_memory.py --report memory.json   # re-print a saved measurement

What is built. Nothing is downloaded: a transformers Qwen2 LM with Qwen1.5-0.5B's shape
(hidden 1024, 24 layers, 16 heads, 16 KV heads, MLP 2816, vocab 151936, tied embeddings:
464M parameters) and a CLIP vision tower with ViT-L/14-336's shape (hidden 1024, 24
layers, 16 heads, MLP 4096, 336 px, patch 14: 576 patches, 304M parameters), both random
weights from their configs, saved with save_pretrained into a temporary folder that an
LLMSpec / VisionSpec `path` points at: the cluster path's loading code. The VLM and the
engine are the trainer's own (workers/train.py: _build_model, stage_plan(trial, 2, 1),
stage_engine: DeepSpeed, torch AdamW, ZeRO-2 by default, a world of one over gloo/nccl);
compressor TokenPacker (the paper's) at V = 576 visual tokens; 112 question + 16 answer
tokens of text: 704 tokens an example, about the paper's ~700. The frozen tower encodes
the micro-batch's images once under no_grad, as encode_splits does before training, so a
step is the LM + compressor's weights, gradients, AdamW state and activations; the frozen
tower's weights stay resident beside them and are reported separately.

How it is measured. Each (micro-batch, gradient checkpointing) runs in a fresh process,
smallest micro-batch first. On CPU: the resident set (VmRSS) after the imports and the
process group, before any model (the baseline); then the model is loaded, the engine
built, and `--steps` (default 2) optimizer steps run. The first step allocates AdamW's
lazy state; the last one is the measured step: its peak RSS per phase (forward, backward,
optimizer step) is the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs
at each phase boundary after glibc's free heap is trimmed, so that a phase's peak is not
what the previous phase freed); ru_maxrss, the process's peak since it started (loading
included), is kept across those resets. A run predicted (from the smaller micro-batch's
measurement) to exceed --max-rss-gib, or 90% of the memory available now, is skipped with
the reason. On CUDA: torch.cuda.max_memory_allocated per phase (reset_peak_memory_stats),
in bf16. CPU default fp32; DeepSpeed bf16 on a CPU works (--dtype bf16).

Gradient checkpointing: from_pretrained hands the LM back in eval mode, and transformers
checkpoints only in train mode; the trainer (workers/train.py) never calls train(), so
there `gradient_checkpointing: true` changes nothing on the cluster path. This benchmark
calls model.train() before building the engine, to measure what checkpointing saves.

The estimate per component (bytes per trainable parameter): weights (4 fp32 / 2 bf16),
gradients (the same), DeepSpeed's fp32 master copy of the weights (4: ZeRO-1/2 keeps one
even in fp32), AdamW's two fp32 moments (8); the frozen tower's weights; the baseline; and
"activations" = the measured step peak - all of those (so at a peak in the optimizer step
it is the step's temporaries). Then per phase of the measured step: bytes per parameter
held between steps, added at the optimizer step's peak, staged in backward (DeepSpeed's
gradient bucket), and activations per example (the slope of the forward/backward peak
over the micro-batches, or with one micro-batch the forward's growth).

The extrapolation to Qwen1.5 0.5B / 1.8B / 4B / 7B in bf16 on a GPU, per worker, under
ZeRO-3 with configs/paper.yaml's workers W (1 / 1 / 4 / 8) and on one GPU alone:

    peak        = states + fixed + max(staging + micro-batch x activations, optimizer)
    states      = 16 B (bf16 weights 2 + bf16 gradient partition 2 + fp32 master 4 +
                  AdamW 8; more if measured so) x trainable params / W
    fixed       = the frozen tower in bf16 (whole on every worker) + the reduce bucket
                  (5e8 elements in bf16) + with W > 1 ZeRO-3's live parameters (at most
                  stage3_max_live_parameters = 1e9 in bf16)
    optimizer   = the measured bytes per parameter at the optimizer step (fp32 in both
                  precisions: DeepSpeed's flat fp32 gradient, AdamW's temporaries) / W
    staging     = the measured gradient staging per parameter, halved in bf16, / W
    activations = the measured LM's per example, halved from fp32, x (layers x hidden) /
                  its own (tokens fixed at 704; attention by SDPA, no tokens^2 term)

An (LLM, micro-batch) fits an 80 GB GPU when the peak is at most --gpu-gib (79: what
torch reports for an 80 GB A100/H100) minus --headroom-gib (8: CUDA context, NCCL,
allocator fragmentation, which max_memory_allocated does not count).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30

# Qwen1.5 base/chat LMs (their config.json on huggingface.co/Qwen): all Qwen2ForCausalLM
# with biases on q/k/v, as many KV heads as heads, vocab 151936; only the 0.5B ties its
# embedding to the LM head.
QWEN15 = {
    "qwen1.5-0.5b": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 16, "tie_word_embeddings": True},
    "qwen1.5-1.8b": {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24, "num_attention_heads": 16, "tie_word_embeddings": False},
    "qwen1.5-4b": {"hidden_size": 2560, "intermediate_size": 6912, "num_hidden_layers": 40, "num_attention_heads": 20, "tie_word_embeddings": False},
    "qwen1.5-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32, "tie_word_embeddings": False},
}
QWEN15_VOCAB = 151936
PAPER_WORKERS = {"qwen1.5-0.5b": 1, "qwen1.5-1.8b": 1, "qwen1.5-4b": 4, "qwen1.5-7b": 8}  # configs/paper.yaml
# openai/clip-vit-large-patch14-336's vision config
CLIP_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
# --quick: the same geometry (576 patches, V = 576, 704 tokens), tiny widths and vocab
QUICK_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": True}
QUICK_VOCAB = 1000
QUICK_TOWER = {**CLIP_L14_336, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 32}

VISUAL_TOKENS = 576
QUESTION_TOKENS = 112
ANSWER_TOKENS = 16
REDUCE_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size (elements), allocated whole on a GPU
MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's default stage3_max_live_parameters (elements)
STATE_BYTES_BF16 = 16  # bf16 weights 2 + bf16 gradient partition 2 + fp32 master 4 + AdamW 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--gradient-checkpointing", choices=("off", "on", "both"), default="both")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda where available")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="auto: fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=2)
    parser.add_argument("--compressor", default="tokenpacker", help="at V = 576 (avgpool, tokenpacker, ...)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run; the last is measured")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU; default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a tiny LM and tower of the same geometry")
    parser.add_argument("--max-rss-gib", type=float, default=16.0, help="CPU: skip a run predicted to need more")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--gpu-gib", type=float, default=79.0, help="extrapolation: an 80 GB GPU's memory in GiB")
    parser.add_argument("--headroom-gib", type=float, default=8.0, help="extrapolation: kept free on that GPU")
    parser.add_argument("--json", help="also write the measurement to this JSON file")
    parser.add_argument("--report", metavar="JSON", help="only print the tables of a measurement saved with --json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- shapes and sizes ---------------------------------------------------------------------


def llm_params(shape: dict, vocab: int) -> int:
    """Parameters of a Qwen2 LM with KV heads = heads (q/k/v with biases, o without; SwiGLU
    MLP; two RMSNorms a layer and a final one); a tied LM head counted once."""
    d, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    layer = 4 * d * d + 3 * d + 3 * d * i + 2 * d
    embeddings = vocab * d * (1 if shape["tie_word_embeddings"] else 2)
    return embeddings + layers * layer + d


def compressor_params(name: str, vision_dim: int, llm_dim: int) -> int:
    from tokenscale import compressors

    return compressors.build(name, vision_dim=vision_dim, llm_dim=llm_dim, grid_tokens=576, visual_tokens=VISUAL_TOKENS).num_parameters()


def save_models(root: str, lm: dict, vocab: int, tower: dict) -> tuple[str, str, int]:
    """Random-weight LM and CLIP tower from their configs, saved as HF folders (fp32)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, num_key_value_heads=lm["num_attention_heads"], rms_norm_eps=1e-6,
                         max_position_embeddings=32768, use_sliding_window=False, **lm)
    lm_dir, tower_dir = os.path.join(root, "llm"), os.path.join(root, "tower")
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(lm_dir)
    del model
    model = CLIPVisionModel(CLIPVisionConfig(**tower))
    model.save_pretrained(tower_dir)
    tower_params = sum(p.numel() for p in model.parameters())
    del model
    _trim()
    return lm_dir, tower_dir, tower_params


# ---- one run: a fresh process --------------------------------------------------------------


def _trim() -> None:
    """Hand glibc's free heap back to the OS, so that VmRSS is what is live."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class CpuMeter:
    """VmRSS now, and the high-water mark since the last reset (/proc/self/clear_refs '5';
    that resets ru_maxrss too, so the peak since the start is kept here: `overall`)."""

    overall = 0

    def _status(self, key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024

    def now(self) -> int:
        _trim()
        return self._status("VmRSS")

    def reset(self) -> None:
        self.overall = max(self.overall, self.peak(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        # Every reading is folded into `overall`: VmHWM is max(the kernel's high-water mark,
        # RSS now), and the mark is updated lazily, so a later reading can come out below an
        # earlier one (seen: 119 kB below a step's peak), and `overall` must bound them all.
        value = self._status("VmHWM")
        self.overall = max(self.overall, value)
        return value


class CudaMeter:
    def __init__(self, torch):
        self.cuda = torch.cuda

    def now(self) -> int:
        self.cuda.synchronize()
        return self.cuda.memory_allocated()

    def reset(self) -> None:
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        self.cuda.synchronize()
        return self.cuda.max_memory_allocated()


def trial_config(spec: dict):
    from tokenscale.config import LLMSpec, TrainSpec, TrialConfig, VisionSpec

    mb = spec["micro_batch"]
    return TrialConfig(
        grid="bench-memory",
        llm=LLMSpec(name=spec["llm_name"], path=spec["lm_dir"]),
        visual_tokens=VISUAL_TOKENS,
        compressor=spec["compressor"],
        vision=VisionSpec(path=spec["tower_dir"], image_size=336, patch_size=14),
        train=TrainSpec(
            micro_batch=mb, global_batch=mb, zero_stage=spec["zero_stage"], stage1_steps=0,
            stage2_steps=max(spec["steps"], 1), stage2_lr=2e-5, warmup_fraction=0.03,
            bf16="on" if spec["dtype"] == "bf16" else "off",
            gradient_checkpointing=spec["gradient_checkpointing"], attention="sdpa",
        ),
    )


def run_child(spec: dict) -> dict:
    """Build the trial's VLM and stage-2 engine, run `steps` optimizer steps; memory per phase."""
    import deepspeed  # noqa: F401 - imported (and its logger quieted) before the engine
    import numpy as np
    import torch
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    from tokenscale.workers.model import encode_images
    from tokenscale.workers.train import (
        _build_model,
        single_process_group,
        stage_engine,
        stage_plan,
    )

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(0)
        device, meter = torch.device("cuda", 0), CudaMeter(torch)
    else:
        device, meter = torch.device("cpu"), CpuMeter()
    single_process_group("nccl" if cuda else "gloo")
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    out: dict = {"threads": torch.get_num_threads()}
    out["baseline"] = meter.now()  # imports + process group, no model yet
    meter.reset()

    trial = trial_config(spec)
    model = _build_model(trial, device, dtype)  # seeded, in the compute dtype, GC as the trial asks
    model.llm.requires_grad_(True)  # stage 2: compressor + LM; the tower stays frozen
    # from_pretrained hands the LM (and the tower) back in eval mode, and transformers runs
    # gradient checkpointing only in train mode: without this, GC on would change nothing
    out["llm_training_mode_as_built"] = model.llm.training
    model.train()
    out["lm_params"] = sum(p.numel() for p in model.llm.parameters())
    out["compressor_params"] = sum(p.numel() for p in model.compressor.parameters())
    out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["tower_params"] = sum(p.numel() for p in model.vision.parameters())
    out["tower_bytes"] = sum(p.numel() * p.element_size() for p in model.vision.parameters())
    out["tower_trainable"] = any(p.requires_grad for p in model.vision.parameters())
    out["weight_bytes_per_param"] = next(model.llm.parameters()).element_size()

    # the frozen tower's patch features, once under no_grad (encode_splits before training)
    mb = spec["micro_batch"]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((mb, 3, 336, 336)).astype(np.float32)  # CLIP-normalised pixels ~ N(0, 1)
    features = torch.from_numpy(encode_images(model.vision, images, batch=mb)).to(device, dtype)
    vocab = model.llm.get_input_embeddings().num_embeddings
    questions = torch.from_numpy(rng.integers(0, vocab, (mb, QUESTION_TOKENS))).to(device)
    answers = torch.from_numpy(rng.integers(0, vocab, (mb, ANSWER_TOKENS))).to(device)
    out["loaded"] = meter.now()
    out["load_peak"] = meter.peak()  # loading + encoding (from_pretrained may hold extra copies)

    stage = stage_plan(trial, 2, 1)
    engine = stage_engine(model, trial, stage, spec["dtype"] == "bf16")
    out["engine"] = meter.now()
    steps = []
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        row = {"start": meter.now()}
        meter.reset()
        loss, _ = engine(features, questions, answers)
        row["forward"] = meter.peak()
        row["after_forward"] = meter.now()
        meter.reset()
        engine.backward(loss)
        row["backward"] = meter.peak()
        row["after_backward"] = meter.now()
        meter.reset()
        engine.step()
        row["optimizer"] = meter.peak()
        row["after_optimizer"] = meter.now()
        row["loss"] = float(loss.item())
        row["seconds"] = time.perf_counter() - started
        steps.append(row)
    out["steps"] = steps
    out["end"] = meter.now()
    if not cuda:  # the process's peak since it started: ru_maxrss (kB on Linux) and every VmHWM read, across the resets
        meter.reset()
        out["ru_maxrss"] = meter.overall
    if cuda:
        out["max_reserved"] = torch.cuda.max_memory_reserved()
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---- the driver -----------------------------------------------------------------------------


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def step_peak(row: dict) -> int:
    last = row["steps"][-1]
    return max(last["forward"], last["backward"], last["optimizer"])


def predicted_peak(rows: list[dict], mb: int, gc: bool) -> tuple[int, str] | None:
    """From this GC setting's smallest measured micro-batch: its forward/backward peak +
    the forward's growth (the activations it keeps) per extra example, or its optimizer
    step's peak (which does not depend on the micro-batch), whichever is larger."""
    done = [r for r in rows if r["status"] == "ok" and r["gradient_checkpointing"] == gc and r["micro_batch"] < mb]
    if not done:
        return None
    base = min(done, key=lambda r: r["micro_batch"])
    last = base["steps"][-1]
    per_example = max(0, last["forward"] - last["start"]) / base["micro_batch"]
    passes = max(last["forward"], last["backward"])
    value = int(max(passes + (mb - base["micro_batch"]) * per_example, last["optimizer"]))
    how = (f"micro-batch {base['micro_batch']}'s forward/backward peak {passes / GIB:.1f} GiB + "
           f"{mb - base['micro_batch']} x {per_example / GIB:.2f} GiB of forward activations")
    return value, how


def run_all(args: argparse.Namespace) -> dict:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__})")
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    lm, vocab, tower = (QUICK_LM, QUICK_VOCAB, QUICK_TOWER) if args.quick else (QWEN15["qwen1.5-0.5b"], QWEN15_VOCAB, CLIP_L14_336)
    name = "quick-lm" if args.quick else "qwen1.5-0.5b"
    gcs = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    env = dict(os.environ)
    if device == "cpu":  # a DeepSpeed engine otherwise moves the model to a GPU
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    meta = {
        "llm": name, "llm_shape": lm, "vocab": vocab, "tower_shape": tower, "device": device, "dtype": dtype,
        "zero_stage": args.zero_stage, "compressor": args.compressor, "visual_tokens": VISUAL_TOKENS,
        "question_tokens": QUESTION_TOKENS, "answer_tokens": ANSWER_TOKENS, "steps": args.steps, "quick": args.quick,
        "nice": os.nice(0), "cpus": os.cpu_count(), "torch": torch.__version__,
    }
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        started = time.perf_counter()
        lm_dir, tower_dir, tower_params = save_models(tmp, lm, vocab, tower)
        trainable = llm_params(lm, vocab) + compressor_params(args.compressor, tower["hidden_size"], lm["hidden_size"])
        # a first run's guess, only to keep a shared machine out of the OOM killer: the
        # baseline + tower + 16 B/param of states + ~14 B/param at the optimizer step
        first_guess = int(0.5 * GIB + tower_params * (2 if dtype == "bf16" else 4) + 30 * trainable)
        print(f"(random {name} and CLIP tower saved with save_pretrained in {time.perf_counter() - started:.0f} s)", flush=True)
        for gc in gcs:
            for mb in sorted(set(args.micro_batches)):
                row = {"micro_batch": mb, "gradient_checkpointing": gc}
                prediction = predicted_peak(rows, mb, gc) if device == "cpu" else None
                available = mem_available() if device == "cpu" else None
                reason = None
                if prediction is not None and prediction[0] > args.max_rss_gib * GIB:
                    reason = f"predicted peak RSS {prediction[0] / GIB:.1f} GiB ({prediction[1]}) > --max-rss-gib {args.max_rss_gib:g}"
                elif available and (prediction[0] if prediction else first_guess) > 0.9 * available:
                    guess = prediction[0] if prediction else first_guess
                    reason = f"predicted peak RSS {guess / GIB:.1f} GiB > 90% of the {available / GIB:.1f} GiB available now"
                if reason:
                    row.update(status="skipped", reason=reason)
                    print(f"micro-batch {mb}, GC {'on' if gc else 'off'}: skipped: {row['reason']}", flush=True)
                    rows.append(row)
                    continue
                spec = {"micro_batch": mb, "gradient_checkpointing": gc, "device": device, "dtype": dtype,
                        "zero_stage": args.zero_stage, "compressor": args.compressor, "steps": args.steps,
                        "threads": args.threads, "llm_name": name, "lm_dir": lm_dir, "tower_dir": tower_dir,
                        "out": os.path.join(tmp, f"mb{mb}-gc{int(gc)}.json")}
                print(f"micro-batch {mb}, GC {'on' if gc else 'off'}: running ...", flush=True)
                started = time.perf_counter()
                try:
                    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                                          capture_output=True, text=True, timeout=args.timeout)
                    failed = proc.returncode != 0 and f"exit {proc.returncode}: " + (proc.stderr or proc.stdout)[-1500:]
                except subprocess.TimeoutExpired:
                    failed = f"timed out after {args.timeout:.0f} s"
                if failed:
                    row.update(status="failed", reason=failed)
                    print(f"  failed: {failed}", flush=True)
                else:
                    with open(spec["out"]) as f:
                        row.update(json.load(f), status="ok", wall_seconds=time.perf_counter() - started)
                    print(f"  step peak {step_peak(row) / GIB:.2f} GiB ({time.perf_counter() - started:.0f} s)", flush=True)
                rows.append(row)
    return {"meta": meta, "rows": rows}


# ---- the report -----------------------------------------------------------------------------


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def components(meta: dict, row: dict) -> dict:
    """The per-component estimate of one measured run (bytes): what the parameters imply,
    and activations = the step's peak - all of it."""
    n, w = row["trainable_params"], row["weight_bytes_per_param"]
    parts = {"weights": n * w, "grads": n * w, "master": n * 4 if meta["zero_stage"] >= 1 or w == 2 else 0,
             "adam": n * 8, "tower": row["tower_bytes"], "baseline": row["baseline"]}
    parts["activations"] = step_peak(row) - sum(parts.values())
    return parts


def calibrate(rows: list[dict]) -> dict | None:
    """What the measured runs say, per trainable parameter and per example (bytes, in the
    measured dtype), phase by phase of the measured step:

    states      (step start - baseline - tower) / params: weights, master, AdamW (grads are
                freed after each optimizer step)
    optimizer   (optimizer-step peak - step start) / params: the gradients still held plus
                the step's fp32 temporaries (DeepSpeed's flat fp32 gradient, AdamW's)
    activations per example, per GC setting: the slope of the forward/backward peak over
                the micro-batches measured, or with one micro-batch the forward's growth
    grad staging (forward/backward peak - step start - activations) / params, at the
                largest micro-batch: DeepSpeed's gradient bucket and partition, filled in
                backward while activations are freed
    """
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    n = ok[0]["trainable_params"]
    out: dict = {"bytes_per_param": ok[0]["weight_bytes_per_param"], "params": n}
    states = sorted((r["steps"][-1]["start"] - r["baseline"] - r["tower_bytes"]) / n for r in ok)
    out["states_per_param"] = states[len(states) // 2]
    # held between steps, expected: fp32 4 weights + 4 master + 8 AdamW = 16; bf16 2 + 4 + 8 = 14.
    # On a GPU in bf16 (ZeRO-3 also holds a bf16 gradient partition): 16, or more if measured so
    expected = 16 if out["bytes_per_param"] == 4 else 14
    out["states_expected_per_param"] = expected
    out["states_bf16_per_param"] = max(STATE_BYTES_BF16, out["states_per_param"] * STATE_BYTES_BF16 / expected)
    out["optimizer_per_param"] = max((r["steps"][-1]["optimizer"] - r["steps"][-1]["start"]) / n for r in ok)
    out["activations"], staging = {}, []
    for gc in (False, True):
        runs = sorted((r for r in ok if r["gradient_checkpointing"] == gc), key=lambda r: r["micro_batch"])
        if not runs:
            continue

        def passes(r: dict) -> int:
            last = r["steps"][-1]
            return max(last["forward"], last["backward"]) - last["start"]

        if len(runs) >= 2:
            a, b = runs[0], runs[-1]
            per_example = (passes(b) - passes(a)) / (b["micro_batch"] - a["micro_batch"])
            how = f"slope of the forward/backward peak, micro-batch {a['micro_batch']} -> {b['micro_batch']}"
            staging.append((passes(b) - per_example * b["micro_batch"]) / n)
        else:
            last = runs[0]["steps"][-1]
            per_example = (last["forward"] - last["start"]) / runs[0]["micro_batch"]
            how = f"forward growth at micro-batch {runs[0]['micro_batch']} (no second micro-batch)"
        out["activations"][gc] = (per_example, how)
    if not staging:  # no GC setting with two micro-batches: what backward leaves behind
        staging = [(r["steps"][-1]["after_backward"] - r["steps"][-1]["start"]) / n for r in ok]
    out["staging_per_param"] = max(0.0, max(staging))
    return out


def extrapolate(meta: dict, rows: list[dict], gpu_gib: float, headroom_gib: float) -> dict | None:
    """Per-worker peak in bf16 on a GPU for each Qwen1.5 size (see the module docstring)."""
    cal = calibrate(rows)
    if cal is None:
        return None
    base = meta["llm_shape"]
    base_ld = base["num_hidden_layers"] * base["hidden_size"]
    to_bf16 = 2 / cal["bytes_per_param"]  # activations and gradients halve from fp32; fp32 optimizer temporaries do not
    tower_params = next(r["tower_params"] for r in rows if r["status"] == "ok")
    budget = (gpu_gib - headroom_gib) * GIB
    out = {"budget_gib": budget / GIB, "calibration": {k: v for k, v in cal.items() if k != "activations"},
           "activations": {str(gc): v for gc, v in cal["activations"].items()}, "llms": []}
    for name, shape in QWEN15.items():
        params = llm_params(shape, QWEN15_VOCAB) + compressor_params(meta["compressor"], meta["tower_shape"]["hidden_size"], shape["hidden_size"])
        ratio = shape["num_hidden_layers"] * shape["hidden_size"] / base_ld
        for workers in (1, 2, 4, 8):
            states = cal["states_bf16_per_param"] * params / workers
            fixed = REDUCE_BUCKET * 2 + (MAX_LIVE_PARAMETERS * 2 if workers > 1 else 0) + tower_params * 2
            optimizer = cal["optimizer_per_param"] * params / workers
            staging = cal["staging_per_param"] * to_bf16 * params / workers
            entry = {"llm": name, "params": params, "workers": workers, "paper_workers": PAPER_WORKERS[name],
                     "states": states, "fixed": fixed, "optimizer": optimizer, "staging": staging, "by_gc": {}}
            for gc, (measured, _) in cal["activations"].items():
                per_example = measured * to_bf16 * ratio
                total = {mb: states + fixed + max(staging + mb * per_example, optimizer) for mb in (1, 4, 16)}
                room = budget - states - fixed - staging
                largest = int(room // per_example) if per_example > 0 and states + fixed + optimizer <= budget else 0
                entry["by_gc"][str(gc)] = {"per_example": per_example, "total": total, "largest_micro_batch": max(largest, 0)}
            out["llms"].append(entry)
    return out


def report(result: dict, gpu_gib: float = 79.0, headroom_gib: float = 8.0) -> dict | None:
    meta, rows = result["meta"], result["rows"]
    lm, tower = meta["llm_shape"], meta["tower_shape"]
    tokens = meta["visual_tokens"] + meta["question_tokens"] + meta["answer_tokens"]
    cpu = meta["device"] == "cpu"
    print(
        f"\nstage-2 step, memory per worker: {meta['llm']} (hidden {lm['hidden_size']}, {lm['num_hidden_layers']} layers, "
        f"vocab {meta['vocab']}) + CLIP tower (hidden {tower['hidden_size']}, {tower['num_hidden_layers']} layers, "
        f"{tower['image_size']} px / {tower['patch_size']}), {meta['compressor']} V={meta['visual_tokens']}, "
        f"{tokens} tokens an example ({meta['visual_tokens']} visual + {meta['question_tokens']} question + "
        f"{meta['answer_tokens']} answer); {meta['device']} {meta['dtype']}, DeepSpeed ZeRO-{meta['zero_stage']} "
        f"(world of one), torch AdamW; step {meta['steps']} of {meta['steps']} measured; "
        + ("GiB of RSS" if cpu else "GiB of torch.cuda.max_memory_allocated")
    )
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        r0 = ok[0]
        print(
            f"trainable {r0['trainable_params']:,} (LM {r0['lm_params']:,} + compressor {r0['compressor_params']:,}); "
            f"frozen tower {r0['tower_params']:,} params = {gib(r0['tower_bytes'])} GiB resident "
            f"({r0['weight_bytes_per_param'] * 8}-bit); torch threads {r0['threads']}"
        )
        if not r0.get("llm_training_mode_as_built", True):
            print("note: the VLM's LM comes out of from_pretrained in eval mode, where transformers skips gradient "
                  "checkpointing; this benchmark calls model.train() before the engine (workers/train.py does not)")
    header = (f"{'mb':>3} {'GC':>4} {'tokens':>7} {'baseline':>9} {'loaded':>7} {'engine':>7} {'step start':>11}"
              f" {'peak fwd':>9} {'peak bwd':>9} {'peak opt':>9} {'STEP PEAK':>10} {'ru_maxrss' if cpu else 'reserved':>10} {'s/step':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gc = "on" if r["gradient_checkpointing"] else "off"
        if r["status"] != "ok":
            print(f"{r['micro_batch']:>3} {gc:>4} {r['micro_batch'] * tokens:>7}  {r['status']}: {r['reason'].strip().splitlines()[-1][:300]}")
            continue
        last = r["steps"][-1]
        print(
            f"{r['micro_batch']:>3} {gc:>4} {r['micro_batch'] * tokens:>7} {gib(r['baseline']):>9} {gib(r['loaded']):>7}"
            f" {gib(r['engine']):>7} {gib(last['start']):>11} {gib(last['forward']):>9} {gib(last['backward']):>9}"
            f" {gib(last['optimizer']):>9} {gib(step_peak(r)):>10} {gib(r['ru_maxrss'] if cpu else r.get('max_reserved')):>10}"
            f" {last['seconds']:>7.1f}"
        )
    if cpu:
        print("(baseline: imports + process group, no model; loaded: + LM, tower, features; engine: + "
              "deepspeed.initialize; step start: before the measured step, AdamW state allocated; peak fwd/bwd/opt: "
              "VmHWM of each phase of that step; ru_maxrss: the process's peak since it started, loading included)")
    else:
        print("(reserved: torch.cuda.max_memory_reserved; the CUDA context is in neither)")
    if not ok:
        return None

    print(f"\nper component (GiB; {ok[0]['weight_bytes_per_param']}-byte weights): weights, grads, fp32 master copy "
          "(DeepSpeed keeps one), AdamW's 2 fp32 moments, frozen tower, baseline; activations = step peak - all of those")
    header = (f"{'mb':>3} {'GC':>4} {'weights':>8} {'grads':>7} {'master':>7} {'AdamW':>7} {'tower':>7}"
              f" {'baseline':>9} {'activations':>12} {'/ example':>10} {'STEP PEAK':>10}")
    print(header)
    print("-" * len(header))
    for r in ok:
        c = components(meta, r)
        print(
            f"{r['micro_batch']:>3} {'on' if r['gradient_checkpointing'] else 'off':>4} {gib(c['weights']):>8}"
            f" {gib(c['grads']):>7} {gib(c['master']):>7} {gib(c['adam']):>7} {gib(c['tower']):>7}"
            f" {gib(c['baseline']):>9} {gib(c['activations']):>12} {gib(c['activations'] / r['micro_batch']):>10}"
            f" {gib(step_peak(r)):>10}"
        )
    cal = calibrate(rows)
    assert cal is not None
    print(
        f"measured per trainable parameter: {cal['states_per_param']:.1f} B held between steps (expected "
        f"{cal['states_expected_per_param']}: {cal['bytes_per_param']} weights + 4 master + 8 AdamW), "
        f"+{cal['optimizer_per_param']:.1f} B at the optimizer step's peak, +{cal['staging_per_param']:.1f} B of "
        "gradient staging in backward"
    )
    for gc, (value, how) in cal["activations"].items():
        print(f"activations, GC {'on' if gc else 'off'}: {gib(value)} GiB an example ({how})")

    extra = extrapolate(meta, rows, gpu_gib, headroom_gib)
    assert extra is not None
    print(
        f"\nextrapolation to bf16 on an 80 GB GPU (GiB per worker; W workers under ZeRO-3: configs/paper.yaml's and 1); "
        f"fits when <= {gpu_gib:g} - {headroom_gib:g} headroom = {extra['budget_gib']:g} GiB"
        + ("  [--quick: from a tiny LM, not meaningful]" if meta["quick"] else "")
    )
    header = (f"{'llm':<14}{'params':>8}{'W':>3}{'states':>8}{'fixed':>7}{'optim.':>8}{'staging':>8} {'GC':>4}"
              f"{'act/ex':>8}{'mb 1':>8}{'mb 4':>8}{'mb 16':>8}{'largest mb':>11}")
    print(header)
    print("-" * len(header))
    shown = [e for e in extra["llms"] if e["workers"] in (1, e["paper_workers"])]
    for e in shown:
        for gc, v in e["by_gc"].items():
            print(
                f"{e['llm']:<14}{e['params'] / 1e9:>7.2f}B{e['workers']:>3}{gib(e['states']):>8}{gib(e['fixed']):>7}"
                f"{gib(e['optimizer']):>8}{gib(e['staging']):>8} {'on' if gc == 'True' else 'off':>4}{gib(v['per_example']):>8}"
                + "".join(f"{gib(v['total'][mb]):>8}" for mb in (1, 4, 16))
                + f"{v['largest_micro_batch'] or 'none':>11}"
            )
    print(
        f"(peak = states + fixed + max(staging + mb x act/ex, optim.); states: {cal['states_bf16_per_param']:.1f} B x params / W; fixed: "
        "the frozen tower in bf16 + the reduce bucket (+ ZeRO-3's live parameters when W > 1); optim. and staging: the "
        "measured bytes per parameter / W (staging halved in bf16); act/ex: the measured LM's, halved from fp32, x layers "
        "x hidden / its own; largest mb: the most examples per micro-batch that fit)"
    )
    for gc in ("False", "True"):
        fits = [(e["llm"], e["workers"], e["by_gc"][gc]["largest_micro_batch"]) for e in shown if gc in e["by_gc"]]
        if not fits:
            continue
        print(f"GC {'on' if gc == 'True' else 'off'}: largest micro-batch per worker: "
              + ", ".join(f"{name} W={w}: {m or 'none'}" for name, w, m in fits))
        fewest = []
        for name in QWEN15:
            ok16 = [e["workers"] for e in extra["llms"] if e["llm"] == name and e["by_gc"][gc]["total"][16] <= extra["budget_gib"] * GIB]
            fewest.append(f"{name}: {min(ok16) if ok16 else 'more than 8'}")
        print("   fewest ZeRO-3 workers (of 1/2/4/8) for micro-batch 16 (configs/paper.yaml's): " + ", ".join(fewest))
    return extra


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        out = run_child(spec)
        with open(spec["out"], "w") as f:
            json.dump(out, f)
        return
    if args.report:
        with open(args.report) as f:
            result = json.load(f)
    else:
        result = run_all(args)
    result["extrapolation"] = report(result, args.gpu_gib, args.headroom_gib)
    if args.json and not args.report:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
