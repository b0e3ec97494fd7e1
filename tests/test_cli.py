"""The CLI: `fit --points` JSON and one-line errors for bad arguments."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
from conftest import run_tokenscale_all


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


def test_bad_input_to_every_command_exits_2_with_one_line(tmp_path):
    """Each command given something it cannot take: exit 2 and one line, `tokenscale CMD:
    error: ...` naming what is wrong and what is accepted, or argparse's usage line plus
    that error line (a --format, a choice or a type argparse checks); never a traceback,
    and nothing started (serve fails before it reads the store or starts Ray)."""
    store = str(tmp_path / "store")
    write_points(tmp_path / "p.csv")
    points = str(tmp_path / "p.csv")
    (tmp_path / "grid.yaml").write_text("grid: g\nllms: []\n")
    cases = [
        ("resume", "never-run", "--store", store),
        ("resume", "../elsewhere", "--store", store),
        ("status", "never-run", "--store", store),
        ("status", "a/b", "--store", store),
        ("status", "g", "--store", store, "--format", "xml"),
        ("sql", "select 1", "--store", store, "--format", "xml"),
        ("sql", "select 1; select 2", "--store", store),
        ("sql", "create table t (x int)", "--store", store),
        ("plan", "demo", "--format", "csv"),
        ("plan", str(tmp_path / "missing.yaml"), "--store", store),
        ("plan", str(tmp_path / "grid.yaml"), "--store", store),
        ("run", str(tmp_path / "grid.yaml"), "--store", store),
        ("run", str(tmp_path / "grid.yaml"), "--verbose", "5"),
        ("fit", "g", "--points", points),
        ("fit", "never-run", "--store", store),
        ("fit", "--points", points, "--text-tokens", "-1"),
        ("fit", "--points", points, "--flops", "0"),
        ("fit", "--points", points, "--flops", "nan"),
        ("fit", "--points", points, "--form", "cubic"),
        ("fit", "--points", points, "--loss", "l1"),
        ("fit", "g", "--n-column", "params"),
        ("serve", "--store", store, "--port", "0"),
        ("serve", "--store", store, "--port", "70000"),
        ("serve", "--store", store, "--port", "http"),
        ("serve", "--store", store, "--reload-seconds", "0"),
        ("serve", "--store", store, "--reload-seconds", "nan"),
        ("serve", "--store", store, "--replicas", "0"),
        ("serve", "--store", store, "--num-cpus", "-1"),
        ("serve", "--store", store, "--grid", "../g"),
        ("serve", "--store", "gs://bucket"),
        ("demo", "--port", "-1", "--store", store),
        ("schema", "extra"),
    ]
    outs = run_tokenscale_all(cases, cwd=tmp_path)
    for out in outs:
        command = out.args[0]
        assert out.returncode == 2, (out.args, out.returncode, out.stdout[-1000:], out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (out.args, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith(f"tokenscale {command}: error: "), (out.args, out.stderr)
        assert len(lines) == 1 or lines[0].startswith(f"usage: tokenscale {command}"), (out.args, out.stderr)
    by_case = {tuple(out.args): out.stderr.strip().splitlines()[-1] for out in outs}
    # what the one-line errors say, for the checks argparse does not do
    expected = {
        ("serve", "--store", store, "--port", "0"): "--port 0: give a TCP port from 1 to 65535",
        ("serve", "--store", store, "--reload-seconds", "0"): "--reload-seconds 0: give a finite number in (0, inf)",
        ("serve", "--store", store, "--replicas", "0"): "--replicas 0: give at least 1 replica",
        ("fit", "g", "--points", points): "give either GRID or --points FILE.csv, not both",
        ("status", "never-run", "--store", store): "grid 'never-run' was never run with store",
        ("resume", "never-run", "--store", store): "grid 'never-run' was never run with store",
        ("status", "a/b", "--store", store): "GRID 'a/b' is not a valid name",
        ("fit", "--points", points, "--text-tokens", "-1"): "--text-tokens -1: give a finite number in [0, inf)",
    }
    for args, words in expected.items():
        assert words in by_case[args], (args, by_case[args])
    assert not (tmp_path / "store").exists(), "bad input must not create the store"


def test_demo_learning_check_names_the_benchmarks_no_trial_learned(tmp_path):
    """`tokenscale demo` stops (exit 1) before fitting when a benchmark was never learned:
    the check is a binomial test per trial, so a score a few answers over chance fails it."""
    from synthetic import synthetic_row

    from tokenscale.cli import learning_report
    from tokenscale.store import Store

    store = Store.open(str(tmp_path / "store"))
    # 200 answers among 10 (chance 0.1): 35 correct is the floor at alpha = 0.001
    scores = {("a", "color"): 0.9, ("b", "color"): 0.1, ("a", "digits"): 0.17, ("b", "digits"): 0.12}
    for llm, n in (("a", 1000), ("b", 2000)):
        rows = [synthetic_row(grid="g", config_hash=f"{llm}-4", llm=llm, llm_params=n, visual_tokens=4, compressor="avgpool",
                              benchmark=b, task_family="reasoning", error=1 - scores[(llm, b)], chance=0.1, n_examples=200)
                for b in ("color", "digits")]
        store.write_results("g", "avgpool", f"{llm}-4", rows)
    lines, unlearned = learning_report(store, "g")
    assert unlearned == ["digits"]  # 34/200 is below the floor, though 0.07 over chance
    assert lines[0].split(":")[1].strip().startswith("1/2 trials") and "digits: 0/2 trials" in lines[1]
    rows = [synthetic_row(grid="g", config_hash="c-4", llm="c", llm_params=4000, visual_tokens=4, compressor="avgpool",
                          benchmark="digits", task_family="ocr", error=1 - 0.175, chance=0.1, n_examples=200)]
    store.write_results("g", "avgpool", "c-4", rows)
    assert learning_report(store, "g")[1] == []  # 35/200 reaches it


def test_plan_adaptive_lists_the_first_batch(tmp_path, capsys):
    import yaml
    from conftest import tiny_grid

    from tokenscale.cli import main
    from tokenscale.config import parse_grid
    from tokenscale.fitting.adaptive import initial_design
    from tokenscale.orchestrator.adaptive import cells

    raw = tiny_grid("planadapt", llms=3, visual_tokens=(1, 4, 16))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(raw))
    assert main(["plan", str(tmp_path / "g.yaml"), "--adaptive", "--format", "json", "--store", str(tmp_path / "s")]) == 0
    listed = {row["trial_id"] for row in json.loads(capsys.readouterr().out)}
    table = cells(parse_grid(raw))
    assert listed == {t.trial_id for c in initial_design(list(table)) for t in table[c]} and len(listed) == 5
    assert main(["run", str(tmp_path / "g.yaml"), "--max-trials", "3", "--store", str(tmp_path / "s")]) == 2
    assert "--max-trials caps an adaptive run: add --adaptive" in capsys.readouterr().err


def test_figure_one_puts_reasoning_beside_ocr():
    from tokenscale.cli import figure_one

    answers = {
        "reasoning": {"llm": "l", "llm_params": 111000, "visual_tokens": 1, "compressor": "quecc", "form": "product",
                      "predicted_error": 0.12, "predicted_error_lo": 0.1, "predicted_error_hi": 0.14, "p_optimal": 0.8},
        "ocr": {"error": "budget below the cheapest candidate"},
    }
    lines = figure_one(answers, 3.3e6)
    assert lines[0] == "  at 3.3e+06 FLOPs per query (cached query, Q = 0):"
    assert lines[1].split() == ["reasoning", "ocr"]
    assert lines[2].startswith("  LLM l (N=1.11e+05)") and "no answer: budget below" in lines[2]
    assert "1 visual tokens, quecc" in lines[3] and "error 0.120 [0.100, 0.140]" in lines[4]
    assert "chosen in 80% of the draws (product)" in lines[5]
    assert len(lines) == 6
    # an answer from a flat law says so under it; the other column stays empty
    flat = figure_one(answers, 3.3e6, flat={("reasoning", "quecc")})
    assert flat[:6] == lines and flat[6].strip() == "flat law: any (N, V) is as good"
    assert flat[6].startswith("  flat law") and len(flat) == 7
    assert len(figure_one(answers, 3.3e6, flat={("reasoning", "avgpool")})) == 6


def test_the_demo_states_a_finding_only_when_the_ratio_ci_excludes_one():
    from tokenscale.cli import law_verdict

    row = {"identification": "D at its bound 0", "alpha": 0.273, "beta": 0.004, "ratio_lo": 1.38, "ratio_hi": math.inf}
    assert law_verdict(row).startswith("LLM size matters more")
    assert law_verdict(row).endswith("the 90% CI of alpha/beta [1.4, inf] excludes 1")
    row.update(alpha=0.725, beta=0.424, ratio_lo=0.66, ratio_hi=3.68)
    assert law_verdict(row) == ("no finding: LLM size matters more (alpha > beta, alpha/beta = 1.7) here, "
                                "but the 90% CI of alpha/beta [0.66, 3.7] includes 1")
    row.update(alpha=0.035, beta=0.323, ratio_lo=0.0, ratio_hi=0.53)
    assert law_verdict(row).startswith("tokens matter more (beta >= alpha)")
    row["identification"] = "alpha at its bound 3"
    assert law_verdict(row) == "no finding: an exponent is not identified by these points"
