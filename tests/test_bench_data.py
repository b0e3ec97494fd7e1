"""The LLaVA input pipeline streams: a 20,000-example set is read in the same memory as a
2,000-example one (benchmarks/bench_data.py, each size in a fresh process; the records
share 64 image files to keep the writing short, the reading per example is unchanged)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_a_20000_example_stream_reads_in_bounded_memory(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_data.py"), "--sizes", "2000", "20000",
         "--distinct-images", "64", "--json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = result["sizes"]
    assert (small["examples"], large["examples"]) == (2000, 20000)
    # Holding the decoded images (3 x 16 x 16 float32 = 3 KiB each) would take 18,000 x 3 KiB
    # = 53 MiB more for the larger set (at CLIP's 336 px: 24 GiB); streamed, the peak stays
    # within 20%.
    assert result["rss_ratio"] <= 1.2, result
    assert large["peak_rss_mib"] - small["peak_rss_mib"] < 40, result
