"""Forward + backward time of every compressor at a few visual-token budgets, on CPU.

    .venv/bin/python benchmarks/bench_compressors.py                  # defaults, < 2 min
    .venv/bin/python benchmarks/bench_compressors.py --vision-dim 1024 --llm-dim 4096  # paper size

The paper's setting is CLIP ViT-L/14-336 (P = 576, vision width 1024) into a 4096-wide LLM;
on a shared CPU that is slow, so the defaults keep P = 576 but shrink the widths. Times are
medians over repeats after warm-up, each also given as a ratio to `avgpool` at the same V in
the same run (ratios transfer across machines far better than milliseconds). `none` exists
only at V = P, so it gets its own section next to avgpool at V = P.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenscale import compressors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid-tokens", type=int, default=576, help="P, a square patch grid")
    parser.add_argument("--vision-dim", type=int, default=256, help="paper: 1024 (CLIP ViT-L)")
    parser.add_argument("--llm-dim", type=int, default=512, help="paper: 4096 and up")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1, 16, 144], help="V values")
    parser.add_argument("--compressors", nargs="+", default=compressors.names(), choices=compressors.names())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    return parser.parse_args(argv)


def time_fwd_bwd(
    module: compressors.Compressor, patches: torch.Tensor, query: torch.Tensor, warmup: int, repeats: int
) -> float:
    """Median seconds of one forward + backward (loss on the output, grads into the module)."""
    query_arg = query if module.uses_query else None
    times = []
    for step in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        module(patches, query_arg).square().mean().backward()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p = args.grid_tokens
    patches = torch.randn(args.batch, p, args.vision_dim)  # the vision tower is frozen: no grad
    query = torch.randn(args.batch, args.llm_dim)

    print(
        f"compressor forward+backward on CPU: P={p}, vision_dim={args.vision_dim}, "
        f"llm_dim={args.llm_dim}, batch={args.batch}, threads={args.threads}, fp32, "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    if (args.vision_dim, args.llm_dim) != (1024, 4096):
        print("(reduced widths; the paper's are vision_dim=1024, llm_dim=4096: pass them to compare)")
    header = f"{'V':>5}  {'compressor':<16}{'params':>11}{'GFLOP/ex':>10}{'ms/batch':>10}{'x avgpool':>11}"
    print(header)
    print("-" * len(header))

    # `none` only has V = P: it gets a V = P section of its own (beside avgpool, the
    # reference) instead of a row at every budget
    sections = [(v, [c for c in args.compressors if c != "none"]) for v in args.budgets if v != p]
    if p in args.budgets:
        sections.append((p, list(args.compressors)))
    elif "none" in args.compressors:
        sections.append((p, ["none"]))
    skipped = []
    for visual_tokens, names in sections:
        # avgpool first: it is the reference every other row is divided by
        names = sorted(set(names) | {"avgpool"}, key=lambda n: (n != "avgpool", n))
        reference = None
        for name in names:
            if visual_tokens not in compressors.valid_budgets(name, p):
                skipped.append(f"{name} at V={visual_tokens}")
                continue
            torch.manual_seed(0)
            module = compressors.build(
                name, vision_dim=args.vision_dim, llm_dim=args.llm_dim, grid_tokens=p, visual_tokens=visual_tokens
            )
            seconds = time_fwd_bwd(module, patches, query, args.warmup, args.repeats)
            reference = seconds if name == "avgpool" else reference
            ratio = f"{seconds / reference:.2f}" if reference else "-"
            print(
                f"{visual_tokens:>5}  {name:<16}{module.num_parameters():>11,}"
                f"{module.flops() / 1e9:>10.3f}{seconds * 1e3:>10.1f}{ratio:>11}"
            )
        print()
    if "none" in args.compressors:
        print(f"note: `none` keeps all P={p} tokens, so it appears only at V={p}.")
    if skipped:
        print(f"not valid budgets on this grid, skipped: {', '.join(skipped)}")


if __name__ == "__main__":
    main()
