"""Does a tiny VLM learn clevr's compositions, or only its answer priors? clevr scored per template.

    .venv/bin/python benchmarks/clevr_templates.py                       # qwen2-xs and qwen2-l, V = 36
    .venv/bin/python benchmarks/clevr_templates.py --llms qwen2-m --visual-tokens 9 --json

What is measured. One trial per LLM on the demo's recipe (configs/demo.yaml: its tower, LLM
specs, train settings, avgpool at `--visual-tokens`), trained on clevr alone with each of its
eight templates (workers/benchmarks.CLEVR_TEMPLATES) as its own benchmark of
`--train-examples` examples, the same scenes and questions the `clevr` benchmark draws, so
that each template is also scored on its own `--eval-examples` held-out questions. The trials
run at once, one process and one thread each (the demo's two trials at a time).

Against what. A model that learned nothing of the image still answers each question with its
most frequent training answer: the prior, per exact question (e.g. "is there a red thing and
a blue thing ?" is mostly "no"), computed from the same training split and scored on the same
eval questions. A template is learned by an LLM when its score clears that prior by more than
the binomial noise of the eval set (2 standard errors is printed as the margin).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "clevr_"


def register_templates() -> list[str]:
    """One benchmark per clevr template, `clevr_<template>`: clevr's own scenes, each with
    the named template's question (a scene that cannot answer it is drawn again)."""
    from tokenscale.workers import benchmarks as B

    def make_for(template: str):
        def make(rng: np.random.Generator, size: int):
            while True:
                image, labels, objects = B._clevr_scene(rng, size)
                try:
                    question, answer = B._clevr_question(rng, objects, template)
                except ValueError:
                    continue
                return image, labels, question, answer

        return make

    names = []
    for template in B.CLEVR_TEMPLATES:
        name = PREFIX + template
        B.BENCHMARKS[name] = B.Benchmark(name, "reasoning", B.CLEVR_CHANCE, make_for(template))
        names.append(name)
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llms", nargs="+", default=["qwen2-xs", "qwen2-l"], help="LLM names of configs/demo.yaml")
    parser.add_argument("--visual-tokens", type=int, default=36)
    parser.add_argument("--train-examples", type=int, default=2500, help="per template (8 templates)")
    parser.add_argument("--eval-examples", type=int, default=200, help="per template")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    parser.add_argument("--trial", help=argparse.SUPPRESS)  # internal: run this one trial of --grid
    parser.add_argument("--grid", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def priors(names: list[str], grid: dict) -> dict[str, float]:
    """Per template: the eval score of answering each question with its most frequent
    training answer (the template's most frequent one for a question never seen in training)."""
    from tokenscale.workers.benchmarks import generate

    data = grid["data"]
    out = {}
    for name in names:
        size = grid["vision"]["image_size"]
        train = generate(name, "train", data["train_examples"], data.get("data_seed", 1234), size)
        evals = generate(name, "eval", data["eval_examples"], data.get("data_seed", 1234), size)
        by_question: dict[bytes, collections.Counter] = collections.defaultdict(collections.Counter)
        overall: collections.Counter = collections.Counter()
        for question, answer in zip(train.questions, train.answers, strict=True):
            by_question[question.tobytes()][answer.tobytes()] += 1
            overall[answer.tobytes()] += 1
        top = overall.most_common(1)[0][0]
        hits = [
            (by_question[q.tobytes()].most_common(1)[0][0] if q.tobytes() in by_question else top) == a.tobytes()
            for q, a in zip(evals.questions, evals.answers, strict=True)
        ]
        out[name] = float(np.mean(hits))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = register_templates()
    if args.trial:  # a child: one trial, its rows as JSON lines on stdout
        from tokenscale.workers.__main__ import main as worker_main

        return worker_main([args.grid, "--trial", args.trial, "--threads", "1", "--format", "jsonl"])

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    unknown = sorted(set(args.llms) - {llm["name"] for llm in demo["llms"]})
    if unknown:
        print(f"error: --llms {' '.join(unknown)}: not an LLM of configs/demo.yaml", file=sys.stderr)
        return 2
    grid = dict(demo, grid="clevr-templates", llms=[llm for llm in demo["llms"] if llm["name"] in args.llms],
                visual_tokens=[args.visual_tokens], compressors=["avgpool"])
    grid["data"] = dict(demo["data"], benchmarks=names, train_examples=args.train_examples,
                        eval_examples=args.eval_examples)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.yaml"
        path.write_text(yaml.safe_dump(grid))
        children = {
            llm: subprocess.Popen(
                [sys.executable, __file__, "--grid", str(path), "--trial", str(index)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
            for index, llm in enumerate(llm["name"] for llm in grid["llms"])
        }
        scores: dict[str, dict[str, float]] = {}
        for llm, child in children.items():
            out, err = child.communicate()
            if child.returncode != 0:
                print(f"error: the {llm} trial failed (exit {child.returncode}):\n{err[-3000:]}", file=sys.stderr)
                return 1
            scores[llm] = {row["benchmark"]: row["score"] for row in map(json.loads, out.splitlines())}
    prior = priors(names, grid)
    rows = []
    for name in names:
        margin = 2 * math.sqrt(max(prior[name] * (1 - prior[name]), 1e-9) / args.eval_examples)
        rows.append({"template": name[len(PREFIX):], "prior": prior[name], "margin": margin,
                     **{llm: scores[llm][name] for llm in scores}})
    if args.json:
        print(json.dumps({"visual_tokens": args.visual_tokens, "train_examples": args.train_examples,
                          "eval_examples": args.eval_examples, "templates": rows}))
        return 0
    llms = list(scores)
    print(f"clevr per template: avgpool, V = {args.visual_tokens}, {args.train_examples} train / "
          f"{args.eval_examples} eval examples per template, the demo's recipe")
    print(f"{'template':<20} {'prior':>6} {'±2se':>6} " + " ".join(f"{llm:>9}" for llm in llms) + "  learned by")
    for row in rows:
        learned = [llm for llm in llms if row[llm] > row["prior"] + row["margin"]]
        print(f"{row['template']:<20} {row['prior']:6.3f} {row['margin']:6.3f} "
              + " ".join(f"{row[llm]:9.3f}" for llm in llms) + "  " + (", ".join(learned) or "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
