"""The CLI: `fit --points` JSON and one-line errors for bad arguments."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np


def tokenscale(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenscale.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def write_points(path, form="product", seed=0):
    rng = np.random.default_rng(seed)
    n = np.repeat([3e5, 1e6, 4e6, 2e7], 5)
    v = np.tile([1, 4, 16, 64, 256], 4)
    if form == "product":
        e = 4.0 * n**-0.3 * v**-0.06 + 0.1
    else:
        e = 3.0 * n**-0.3 + 0.4 * v**-0.5 + 0.05
    e = e + rng.normal(0, 0.002, len(n))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["llm_params", "visual_tokens", "error"])
        writer.writerows(zip(n, v, e, strict=True))


def test_fit_points_product_json(tmp_path):
    write_points(tmp_path / "p.csv")
    out = tokenscale("fit", "--points", str(tmp_path / "p.csv"), "--json", "--text-tokens", "50")
    assert out.returncode == 0, out.stderr
    law = json.loads(out.stdout)
    assert law["form"] == "product"
    assert {"A", "alpha", "beta", "D", "sse", "seconds", "optimal_visual_tokens"} <= set(law)
    assert abs(law["alpha"] - 0.3) < 0.05 and abs(law["beta"] - 0.06) < 0.02
    expected = law["beta"] * 50 / (law["alpha"] - law["beta"])  # closed form, inside [1, 256]
    assert abs(law["optimal_visual_tokens"] - expected) < 1e-6
    assert law["sse"] < 20 * 0.002**2 * 3


def test_fit_points_sum_json(tmp_path):
    write_points(tmp_path / "p.csv", form="sum")
    out = tokenscale("fit", "--points", str(tmp_path / "p.csv"), "--form", "sum", "--json")
    assert out.returncode == 0, out.stderr
    law = json.loads(out.stdout)
    assert law["form"] == "sum" and "B" in law
    assert abs(law["beta"] - 0.5) < 0.15


def test_bad_arguments_one_line_errors(tmp_path):
    cases = [
        ("fit", "--points", str(tmp_path / "missing.csv")),
        ("fit",),
        ("run", str(tmp_path / "missing.yaml")),
        ("sql", "select 1", "--store", "gs://bucket"),
        ("sql", "select * from nowhere", "--store", str(tmp_path)),
    ]
    (tmp_path / "bad.csv").write_text("llm_params,error\n1,0.5\n")
    cases.append(("fit", "--points", str(tmp_path / "bad.csv")))
    for args in cases:
        out = tokenscale(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0], (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_every_subcommand_has_help():
    for command in ("run", "sql", "fit", "serve", "demo"):
        out = tokenscale(command, "--help")
        assert out.returncode == 0 and "usage: tokenscale " + command in out.stdout
