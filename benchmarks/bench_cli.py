"""`tokenscale sql` as a whole process against the same query in plain DuckDB.

    .venv/bin/python benchmarks/bench_cli.py                      # 32 trials x 5 benchmarks, 15 rounds
    .venv/bin/python benchmarks/bench_cli.py --trials 200 --repeats 30 --query "select count(*) from results"

What a user waits for when typing `tokenscale sql "..."`: interpreter start, the CLI's
imports, opening the store, DuckDB over its parquet, printing. The baseline is the least a
Python process can do for the same answer: `python -c "import duckdb; ..."` reading the
same parquet glob (same read_parquet options as the `results` view) and printing the rows.
Both run as fresh processes, in turn (the order alternates each round, after one warm-up
each), on a store built here in a temporary directory: one object per trial, one row per
benchmark, as a trial writes them (`tokenscale.store.result_row`). Prints both medians and
their ratio; the goal is <= 1.5x.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from tokenscale.store import Store, result_row

GOAL = 1.5
GRID = "benchcli"
LLMS = {"qwen2-xs": 10_600, "qwen2-s": 24_000, "qwen2-m": 52_000, "qwen2-l": 111_000}
TOKENS = [1, 4, 9, 36]
COMPRESSORS = ["avgpool", "quecc"]
BENCHMARKS = {"color": "reasoning", "shape": "reasoning", "count": "reasoning", "digits": "ocr", "letters": "ocr"}
QUERY = "select llm, visual_tokens, task_family, avg(score) from results group by all order by all"

PLAIN = """
import sys, duckdb
glob, query = sys.argv[1], sys.argv[2]
con = duckdb.connect(":memory:")
con.execute(f"create view results as select * from read_parquet('{glob}', union_by_name = true, hive_partitioning = false)")
for row in con.execute(query).fetchall():
    print(*row, sep="  ")
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=32, help="result objects in the store (default: the demo grid's 32)")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (each runs both commands once)")
    parser.add_argument("--query", default=QUERY)
    return parser.parse_args(argv)


def build_store(root: Path, trials: int) -> Store:
    store = Store.open(str(root))
    now = datetime.now(timezone.utc)
    for i in range(trials):
        llm = list(LLMS)[i % len(LLMS)]
        tokens = TOKENS[(i // len(LLMS)) % len(TOKENS)]
        compressor = COMPRESSORS[(i // (len(LLMS) * len(TOKENS))) % len(COMPRESSORS)]
        seed = i // (len(LLMS) * len(TOKENS) * len(COMPRESSORS))
        config_hash = f"{i:012x}"
        rows = []
        for j, (benchmark, family) in enumerate(BENCHMARKS.items()):
            score = 0.3 + 0.6 * ((i * 7 + j * 13) % 17) / 16
            rows.append(result_row(
                grid=GRID, trial_id=f"{llm}-v{tokens}-{compressor}-s{seed}", config_hash=config_hash, llm=llm,
                llm_params=LLMS[llm], llm_params_non_embedding=LLMS[llm], visual_tokens=tokens, compressor=compressor,
                compressor_params=1000, compressor_flops=1e4, seed=seed, benchmark=benchmark, task_family=family,
                score=score, error=1 - score, chance=0.2, n_examples=200, text_tokens_mean=3.0, generated_tokens=1,
                inference_flops=2.0 * LLMS[llm] * tokens, train_seconds=15.0, eval_seconds=0.5, code_version="bench",
                finished_at=now,
            ))
        store.write_results(GRID, compressor, config_hash, rows)
    return store


def tokenscale_command() -> list[str]:
    script = Path(sys.executable).parent / "tokenscale"  # the console script a user runs
    if script.exists():
        return [str(script)]
    found = shutil.which("tokenscale")
    return [found] if found else [sys.executable, "-m", "tokenscale.cli"]


def timed(cmd: list[str], cwd: str) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return elapsed, out.stdout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_cli_") as tmp:
        store = build_store(Path(tmp) / "store", args.trials)
        commands = {
            "tokenscale sql": [*tokenscale_command(), "sql", args.query, "--store", store.uri],
            "plain duckdb": [sys.executable, "-c", PLAIN, store.results_glob(), args.query],
        }
        names = list(commands)
        outputs = {name: timed(cmd, tmp)[1] for name, cmd in commands.items()}  # warm-up (page cache, .pyc)
        rows = {name: len(out.strip().splitlines()) for name, out in outputs.items()}
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.repeats):
            for name in names if round_ % 2 == 0 else names[::-1]:
                times[name].append(timed(commands[name], tmp)[0])
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = medians["tokenscale sql"] / medians["plain duckdb"]
    print(f"store: {args.trials} result objects x {len(BENCHMARKS)} rows; query: {args.query}")
    print(f"output lines: tokenscale sql {rows['tokenscale sql']} (table with header and footer), plain duckdb {rows['plain duckdb']}")
    for name in names:
        ts = sorted(times[name])
        print(f"{name:>15}: median {medians[name] * 1000:7.1f} ms  (min {ts[0] * 1000:.1f}, max {ts[-1] * 1000:.1f}; {len(ts)} runs)")
    print(f"ratio tokenscale sql / plain duckdb: {ratio:.2f}x (goal <= {GOAL}x): {'met' if ratio <= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
