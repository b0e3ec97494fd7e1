"""benchmarks/bench_memory.py: a --quick run (a tiny LM and tower of the real geometry), one
micro-batch, in a fresh process per configuration as the full run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_memory  # noqa: E402


def test_llm_params_match_qwen15_sizes():
    # the counted non-embedding sizes configs/paper.yaml quotes: ~0.31 / 1.21 / 3.17 / 6.48B
    for name, non_embedding in (("qwen1.5-0.5b", 0.31e9), ("qwen1.5-1.8b", 1.21e9), ("qwen1.5-4b", 3.17e9), ("qwen1.5-7b", 6.48e9)):
        shape = bench_memory.QWEN15[name]
        embeddings = bench_memory.QWEN15_VOCAB * shape["hidden_size"] * (1 if shape["tie_word_embeddings"] else 2)
        assert abs(bench_memory.llm_params(shape, bench_memory.QWEN15_VOCAB) - embeddings - non_embedding) < 0.01e9, name


def test_quick_run(tmp_path):
    out = tmp_path / "memory.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_memory.py"), "--quick", "--device", "cpu",
         "--micro-batches", "1", "--gradient-checkpointing", "off", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["status"] == "ok", row
    # the LM the trainer loaded is the one built from the config: the size formula agrees
    assert row["lm_params"] == bench_memory.llm_params(bench_memory.QUICK_LM, bench_memory.QUICK_VOCAB)
    last = row["steps"][-1]
    assert row["baseline"] > 0 and last["start"] >= row["baseline"]
    assert bench_memory.step_peak(row) >= last["start"] and row["ru_maxrss"] >= bench_memory.step_peak(row)
    assert all(s["loss"] == s["loss"] for s in row["steps"])  # finite, not NaN
    assert "STEP PEAK" in proc.stdout and "extrapolation to bf16" in proc.stdout
    assert {e["llm"] for e in result["extrapolation"]["llms"]} == set(bench_memory.QWEN15)
