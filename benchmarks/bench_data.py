"""The LLaVA input pipeline's memory and speed: does a trial's memory stay flat as its dataset grows?

    .venv/bin/python benchmarks/bench_data.py                        # 2,000 and 20,000 images
    .venv/bin/python benchmarks/bench_data.py --sizes 2000 20000 --distinct-images 64 --json

What is measured. For each size, a LLaVA-format set is written to a temp dir (PNG images of
a coloured square on grey, `--image-px` a side, each record a two-turn conversation; with
`--distinct-images K` the records share K image files, which keeps the writing short without
changing what the reader does per example) and read by the trainer's own code
(workers/llava_data.load_sets, workers/train.MicroBatches + micro_batch_stream: the JSON
indexed once, each micro-batch's records read by offset, images decoded and preprocessed,
text tokenized with a checkpoint tokenizer, by `--loader-workers` DataLoader processes) for
one epoch of stage 2 in a fresh process. Peak RSS = that process's ru_maxrss plus its largest
loader process's (RUSAGE_CHILDREN), the index build included. The rate is examples per second
over the epoch (after the first micro-batch, which starts the loader), against the demand of
a training step: the examples per second of forward + backward + AdamW of a tiny VLM (the
trainer's VLM: the tiny tower and a 2-layer Qwen2 of hidden 64) on the same micro-batches,
measured in the same process.

It prints one line per size and the RSS ratio (largest / smallest size): the goal is
<= 1.2 (memory does not grow with the data) and a pipeline faster than the step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (240, 220, 30)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="examples per set (default: 2000 20000)")
    parser.add_argument("--distinct-images", type=int, default=0, help="image files shared by the records (0: one per record)")
    parser.add_argument("--image-px", type=int, default=48, help="image side in pixels (default 48)")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure one prepared set
    return parser.parse_args(argv)


def write_assets(root: Path) -> tuple[Path, Path]:
    """A tiny Qwen2 checkpoint with a byte-level BPE tokenizer (as the tests build one)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    llm = root / "llm"
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["What color is the square?", "Describe the image", *COLORS, *(f"a {c} square" for c in COLORS)]
    backend.train_from_iterator(corpus * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>").save_pretrained(llm)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(llm)
    return llm, root


def write_set(root: Path, examples: int, distinct: int, px: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    files = distinct or examples
    rng = np.random.default_rng(0)
    names = list(COLORS)
    for i in range(files):
        pixels = np.full((px, px, 3), 128, np.uint8)
        y, x = rng.integers(0, px // 2, 2)
        pixels[y : y + px // 2, x : x + px // 2] = COLORS[names[i % 4]]
        Image.fromarray(pixels).save(images / f"{i:06d}.png")
    path = root / "data.json"
    with open(path, "w") as f:  # written record by record: the writer holds no list either
        f.write("[\n")
        for i in range(examples):
            color = names[(i % files) % 4]
            record = {"id": str(i), "image": f"{i % files:06d}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the square?"}, {"from": "gpt", "value": color},
                {"from": "human", "value": "Describe the image"}, {"from": "gpt", "value": f"a {color} square"}]}
            f.write(("" if i == 0 else ",\n") + json.dumps(record))
        f.write("\n]\n")
    return path, images


def measure(spec: dict) -> dict:
    """In a fresh process: one epoch of stage 2's micro-batches, then a few training steps."""
    import numpy as np
    import torch

    from tokenscale.config import parse_grid
    from tokenscale.workers.llava_data import load_sets
    from tokenscale.workers.train import (
        MicroBatches,
        _build_model,
        _tensors,
        micro_batch_stream,
        stage_plan,
    )

    torch.set_num_threads(1)
    grid = {
        "grid": "bench-data", "llms": [{"name": "tiny", "path": spec["llm"]}], "visual_tokens": [4], "compressors": ["avgpool"],
        "vision": {"image_size": 16, "patch_size": 4, "hidden_size": 32, "layers": 1, "heads": 2},
        "data": {"llava": {"train": spec["json"], "image_folder": spec["images"], "loader_workers": spec["loader_workers"],
                           "eval": [{"name": "e", "task_family": "reasoning", "path": spec["json"]}]}},
        "train": {"zero_stage": 1, "micro_batch": spec["micro_batch"], "stage1_steps": 1, "stage2_steps": 1},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    trial = parse_grid(grid).trials()[0]
    started = time.perf_counter()
    (_, stage2), _ = load_sets(trial)  # the JSON's index is built here
    index_seconds = time.perf_counter() - started
    plan = stage_plan(trial, 2, 1)
    steps = len(stage2) // plan.global_batch
    plan = type(plan)(**{**plan.__dict__, "steps": steps})
    stream = micro_batch_stream(MicroBatches(stage2, trial, plan, 0, 1, 0), spec["loader_workers"])
    first = next(stream)
    started = time.perf_counter()
    count = 0
    for batch in stream:
        count += len(batch["images"])
    read_seconds = time.perf_counter() - started

    model = _build_model(trial, torch.device("cpu"), torch.float32)
    model.llm.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tensors = _tensors(first, torch.device("cpu"), torch.float32)
    timings = []
    for _ in range(6):
        begun = time.perf_counter()
        loss, _ = model(**tensors)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - begun)
    step_seconds = float(np.median(timings[1:]))
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "examples": len(stage2), "peak_rss_mib": round(own + children, 1), "trainer_rss_mib": round(own, 1),
        "loader_rss_mib": round(children, 1), "index_seconds": round(index_seconds, 3),
        "pipeline_examples_per_s": round(count / read_seconds, 1),
        "step_examples_per_s": round(len(first["images"]) / step_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        llm, _ = write_assets(Path(tmp))
        for size in args.sizes:
            root = Path(tmp) / f"set{size}"
            data, images = write_set(root, size, args.distinct_images, args.image_px)
            spec = {"llm": str(llm), "json": str(data), "images": str(images), "micro_batch": args.micro_batch,
                    "loader_workers": args.loader_workers}
            env = {**os.environ, "TOKENSCALE_CACHE": str(Path(tmp) / "cache"), "HF_HUB_OFFLINE": "1",
                   "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                                  env=env, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    out = {"sizes": results, "rss_ratio": round(ratio, 3),
           "pipeline_outruns_step": all(r["pipeline_examples_per_s"] > r["step_examples_per_s"] for r in results)}
    if args.json:
        print(json.dumps(out))
        return 0
    for r in results:
        print(f"{r['examples']:>7} examples: peak RSS {r['peak_rss_mib']:.0f} MiB (trainer {r['trainer_rss_mib']:.0f}, "
              f"loader {r['loader_rss_mib']:.0f}), index {r['index_seconds']:.2f} s, pipeline "
              f"{r['pipeline_examples_per_s']:.0f} ex/s vs a tiny model's step {r['step_examples_per_s']:.0f} ex/s")
    print(f"RSS ratio {results[-1]['examples']} / {results[0]['examples']}: {ratio:.3f} (goal <= 1.2); "
          f"pipeline outruns the step: {out['pipeline_outruns_step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
