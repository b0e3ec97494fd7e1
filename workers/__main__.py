"""One trial without Ray, for debugging: the same train loop a Ray Train worker runs.

    python -m tokenscale.workers TRIAL.yaml [--store URI]
    torchrun --standalone --nproc_per_node 2 -m tokenscale.workers TRIAL.yaml

TRIAL.yaml is one trial's config (what `TrialConfig.to_dict()` gives, as YAML), or a grid
YAML with `--trial N` (its N-th trial in `tokenscale run`'s order, from 0) or `--trial
TRIAL_ID`. Alone, this process is a world of one (gloo, an in-memory store: no port);
under torchrun every process reads RANK / WORLD_SIZE / LOCAL_RANK and joins torchrun's
rendezvous. Rank 0 evaluates and prints the result rows on stdout (every other message
goes to stderr), and writes them to `--store` when one is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from tokenscale.config import GridError, TrialConfig, load_grid, parse_trial

from . import pin_cpu_kernels

TABLE_COLUMNS = (
    "benchmark", "task_family", "score", "chance", "n_examples", "llm_params", "llm_params_non_embedding",
    "visual_tokens", "text_tokens_mean", "generated_tokens", "inference_flops", "train_seconds",
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tokenscale.workers",
        description=__doc__.split("\n\n")[0] + " Also under `torchrun --nproc_per_node K -m tokenscale.workers`.",
        epilog="Rows printed: one per benchmark, the columns of tokenscale.store.RESULT_SCHEMA.",
    )
    p.add_argument("config", help="one trial's YAML (TrialConfig.to_dict()), or a grid YAML with --trial")
    p.add_argument("--trial", help="with a grid YAML: the trial's index in the grid's order (from 0) or its trial_id")
    p.add_argument(
        "--store",
        help="also write the rows to this store (a directory or s3://bucket/prefix), where `tokenscale run` "
        "would: one object keyed by the config hash, so a later run of the grid skips this trial. "
        "Default: nothing is written, the rows are only printed",
    )
    p.add_argument("--format", choices=("table", "jsonl"), default="table", help="how rank 0 prints the rows (default: table)")
    p.add_argument("--backend", choices=("gloo", "nccl"), help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    p.add_argument("--threads", type=int, help="torch threads per process (default: torch's)")
    p.add_argument(
        "--checkpoint-dir",
        help="keep the trial's checkpoints here (stage 1's end, every train.checkpoint_every steps), and resume from "
        "the last one when this folder already holds one (default: none kept)",
    )
    return p


def select_trial(path: str, trial: str | None) -> TrialConfig:
    """The trial of a TRIAL.yaml, or of a grid YAML picked by index or trial_id."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise GridError(f"{path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from None
    if not (isinstance(raw, dict) and "llms" in raw):  # not a grid: one trial
        if trial is not None:
            raise GridError(f"--trial: {path} is one trial's config, not a grid; drop --trial")
        return parse_trial(raw, path)
    trials = load_grid(path).trials()
    ids = [t.trial_id for t in trials]
    if trial is None:
        if len(trials) == 1:
            return trials[0]
        raise GridError(f"--trial: {path} is a grid of {len(trials)} trials; pick one by index 0-{len(trials) - 1} or trial_id ({', '.join(ids)})")
    if trial.isdigit():
        if int(trial) >= len(trials):
            raise GridError(f"--trial: {trial} is out of range; the grid has {len(trials)} trials (0-{len(trials) - 1})")
        return trials[int(trial)]
    if trial not in ids:
        raise GridError(f"--trial: no trial {trial!r} in {path}; its trials are {', '.join(ids)}")
    return trials[ids.index(trial)]


def _format_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(r[c]) for c in TABLE_COLUMNS] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(TABLE_COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(TABLE_COLUMNS, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def _train(trial: TrialConfig, args: argparse.Namespace, rank: int, world_size: int, tag: str) -> list[dict[str, Any]] | None:
    """The train loop with plain hooks: metrics to stderr, stage 1's checkpoint kept in
    --checkpoint-dir (when given) and handed back from there."""
    import torch
    import torch.distributed as dist

    from .train import STATE_FILE, train_loop_per_worker

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    def report(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir and args.checkpoint_dir:
            shutil.copytree(checkpoint_dir, args.checkpoint_dir, dirs_exist_ok=True)
        print(f"{tag} {json.dumps(metrics, default=str)}", file=sys.stderr, flush=True)

    def latest_checkpoint() -> str | None:
        folder = args.checkpoint_dir
        return folder if folder and os.path.exists(os.path.join(folder, STATE_FILE)) else None

    print(f"{tag} trial {trial.trial_id} ({backend})", file=sys.stderr, flush=True)
    try:
        rows = train_loop_per_worker(
            trial, report=report, latest_checkpoint=latest_checkpoint, rank=rank, world_size=world_size,
            store=args.store, backend=backend, threads=args.threads,
        )
        if world_size > 1:
            # every rank leaves together: a rank that tore its process group (and DeepSpeed's
            # communication threads) down while rank 0 still wrote the rows was seen to abort
            # at exit ("terminate called without an active exception")
            dist.barrier()
        return rows
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    pin_cpu_kernels()  # before torch is imported (in _train)
    args = parser().parse_args(argv)
    try:
        trial = select_trial(args.config, args.trial)
    except GridError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; a plain process is rank 0 of 1
    tag = f"[rank {rank}/{world_size}]"

    # stdout is for the rows: DeepSpeed's logger and prints go to stderr (its logger keeps
    # the stream it finds at import, so the imports happen inside the redirect too)
    with contextlib.redirect_stdout(sys.stderr):
        rows = _train(trial, args, rank, world_size, tag)
    if rank == 0:
        if args.format == "jsonl":
            print("\n".join(json.dumps(row, default=str) for row in rows))
        else:
            print(_format_table(rows))
        if args.store:
            print(f"{tag} wrote {len(rows)} rows to {args.store} (config hash {trial.config_hash})", file=sys.stderr)
    return 0


def exit_process(code: int) -> None:
    """Leave with `code`. Under torchrun, without the interpreter's teardown: a gloo or
    DeepSpeed thread still joinable when C++ statics are destroyed aborts a rank after its
    work is done and written ("terminate called without an active exception", exit -6, seen
    on rank 1 after the barrier above), and torchrun then reports the whole job failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
