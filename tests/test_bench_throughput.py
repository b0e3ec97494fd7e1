"""benchmarks/bench_throughput.py: a --quick smoke run of its CPU part on one tiny LLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml
from conftest import REPO, tiny_grid


def test_cpu_part_quick(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(tiny_grid("bench-throughput", llms=1, visual_tokens=(4,))))
    out = tmp_path / "figures.json"
    # no GPU needed: the child sees none, whatever the machine has
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_throughput.py"), "--grid", str(grid), "--quick", "--part", "cpu", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["cpu"]
    assert [(r["llm"], r["visual_tokens"]) for r in rows] == [("xs", 4)]
    row = rows[0]
    assert row["ds_tokens_per_s"] > 0 and row["plain_tokens_per_s"] > 0
    # tokens per step: micro_batch x (padded question + V + answer), as the LM sees them
    assert row["tokens_per_step"] % row["micro_batch"] == 0 and row["tokens_per_step"] > row["micro_batch"] * 4
    assert "DeepSpeed/plain tokens/s: median" in proc.stdout
    assert any(line.startswith("xs ") for line in proc.stdout.splitlines())
