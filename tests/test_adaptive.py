"""The adaptive grid (fitting/adaptive.py) judged by replay, `tokenscale replay` over the CLI,
and the decision-level fields of /optimal (p_optimal, runner_up) from the stored draws.

No Ray: /optimal is checked on the Advisor and through the FastAPI app in this process
(`build_api`, as test_serve.py's in-process tests do); test_serve.py covers the app under
Ray Serve."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from synthetic import write_synthetic_results

from tokenscale.fitting.adaptive import (
    Settings,
    decision_agreement,
    decisions,
    initial_design,
    next_step,
    replay,
    run_adaptive,
    table_candidates,
    training_costs,
)
from tokenscale.fitting.frontier import pick
from tokenscale.fitting.grid_fit import fit_grid
from tokenscale.fitting.law import FitError, Law
from tokenscale.serve.advisor import Advisor, load_snapshot
from tokenscale.store import Store

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_adaptive  # noqa: E402

PAPER_N = [0.5e9, 1.8e9, 4e9, 7e9]  # the paper's Qwen-1.5 sizes
TOKENS = [1, 4, 16, 36, 64, 144, 576]
PAPER_REASONING = (0.45, 0.077, 0.015, 0.14)  # the paper's reasoning fit: A (N in billions), alpha, beta, D


def paper_table(noise: float = 0.0, seed: int = 0, law=PAPER_REASONING, llms=PAPER_N):
    """A full 4 x 7 table of a product law (N in billions inside the law), seeded noise."""
    a, alpha, beta, d = law
    n, v = (x.ravel().astype(float) for x in np.meshgrid(llms, TOKENS, indexing="ij"))
    e = a * (n / 1e9) ** -alpha * v**-beta + d + np.random.default_rng(seed).normal(0, noise, len(n))
    return n, v, e


def write_csv(path, n, v, e, compressor=None) -> str:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["llm_params", "visual_tokens", "error"] + (["compressor"] if compressor is not None else []))
        for row in zip(n, v, e, *([compressor] if compressor is not None else []), strict=True):
            writer.writerow(row)
    return str(path)


# ---- the loop, on tables ------------------------------------------------------------------


def test_initial_design_is_corners_and_centre_per_compressor():
    n, v, e = paper_table()
    cells, _ = table_candidates(np.tile(n, 2), np.tile(v, 2), np.tile(e, 2), ["a"] * 28 + ["b"] * 28)
    design = initial_design(cells, "product")
    assert len(design) == 10 and len(set(design)) == 10
    for name in ("a", "b"):
        mine = {(c.llm_params, c.visual_tokens) for c in design if c.compressor == name}
        # the corners, and the centre in log space: N = 1.8B (closest to sqrt(0.5 x 7)); V = 16
        # and 36 are equally central (16 x 36 = 576), the cheaper to train is taken
        assert mine == {(5e8, 1), (5e8, 576), (7e9, 1), (7e9, 576), (1.8e9, 16)}
    # the sum form has 5 parameters: one more space-filling cell per compressor
    assert len(initial_design(cells, "sum")) == 12


def test_replay_clean_table_same_decision_with_fewer_cells():
    """On the paper's reasoning law without noise the loop stops as soon as the stopping
    rule allows, and its law makes every one of the 60 decisions the full table makes."""
    n, v, e = paper_table()
    out = replay(n, v, e)
    assert out["stopped"] == "settled" and out["p_optimal_min"] >= 0.95
    assert out["same_decision"] and out["decisions"] == out["decisions_same"] == 60
    assert out["cells_total"] == 28 and out["cells_used"] == 6  # 5 of the design + 1 for the 2nd residual dof
    assert out["fraction_used"] == pytest.approx(6 / 28)
    assert 0 < out["cost_fraction"] < 0.3
    assert out["adaptive"]["alpha"] == pytest.approx(0.077, abs=1e-6)
    assert out["adaptive"]["beta"] == pytest.approx(0.015, abs=1e-6)
    # V* = beta Q / (alpha - beta): ~12 tokens at Q = 50, the paper's finding
    assert out["adaptive"]["optimal_visual_tokens"]["50"] == pytest.approx(0.015 * 50 / 0.062, rel=1e-4)
    assert out["full"]["optimal_visual_tokens"]["0"] == 1.0


def test_replay_two_compressors_noisy_settles_early_on_the_same_decision():
    """Two compressors with different laws, the paper's residual noise: fewer cells and
    less training than the full table, the same decision, laws reported per compressor."""
    n, v, e1 = paper_table(0.0037, seed=1, law=(0.45, 0.10, 0.02, 0.14))
    _, _, e2 = paper_table(0.0037, seed=2, law=(0.40, 0.06, 0.05, 0.16))
    names = ["tokenpacker"] * len(n) + ["avgpool"] * len(n)
    out = replay(np.tile(n, 2), np.tile(v, 2), np.concatenate([e1, e2]), names)
    assert out["same_decision"] and out["stopped"] == "settled"
    assert out["cells_used"] < 0.5 * out["cells_total"] and out["cost_fraction"] < 0.5
    assert set(out["full"]["alpha"]) == set(out["adaptive"]["beta"]) == {"avgpool", "tokenpacker"}
    assert set(out["adaptive"]["optimal_visual_tokens"]["avgpool"]) == {"0", "50", "100"}
    assert {c["compressor"] for c in out["cells_run"]} == {"avgpool", "tokenpacker"}


def test_replay_of_seeded_synthetic_tables_beats_the_full_grid():
    """The benchmark in miniature (its own generator and seeds): the same decision with
    well under the full table's cells and cost, on most tables."""
    rng = np.random.default_rng(0)
    outs = [replay(*bench_adaptive.synthetic_table(rng, i)[:3]) for i in range(8)]
    assert sum(o["same_decision"] for o in outs) >= 7
    assert np.median([o["fraction_used"] for o in outs]) <= 0.4
    assert np.median([o["cost_fraction"] for o in outs]) <= 0.3


def test_next_step_initial_batches_then_acquires_unmeasured_cells():
    n, v, e = paper_table(0.004, seed=3)
    cells, table = table_candidates(n, v, e)
    settings = Settings(threshold=1.0)  # never settled: always a batch to run
    first = next_step(cells, {}, settings, batch_size=3)
    assert first.reason == "initial" and len(first.batch) == 3 and first.assessment is None
    measured = {c: table[c] for c in initial_design(cells)}
    step = next_step(cells, measured, settings, batch_size=4)
    assert step.reason == "acquire" and len(step.batch) == 4 and len(set(step.batch)) == 4
    assert not set(step.batch) & set(measured)
    # the same question gives the same answer (seeded draws and fantasies)
    assert next_step(cells, measured, settings, batch_size=4).batch == step.batch
    assert step.assessment is not None and len(step.assessment.p_optimal) == 60
    with pytest.raises(FitError, match="not candidates"):
        next_step(cells[:10], measured, settings)


def test_run_adaptive_respects_max_trials_and_asks_only_for_new_cells():
    # alpha = beta and noise 3x the paper's: the decision cannot settle in 9 cells
    n, v, e = paper_table(0.011, seed=4, law=(0.45, 0.05, 0.05, 0.14))
    cells, table = table_candidates(n, v, e)
    asked: list = []

    def oracle(batch):
        asked.extend(batch)
        return {c: table[c] for c in batch}

    run = run_adaptive(cells, oracle, Settings(threshold=1.0), max_trials=9, batch_size=2)
    assert run.stopped == "max_trials" and len(run.measured) == 9
    assert len(asked) == len(set(asked)) == 9  # no cell run twice
    assert run.assessment is not None and run.steps[-1]["cells"] == 9


def test_decision_agreement_uses_the_reference_law_and_the_tolerance():
    n, v, _ = paper_table()
    cells, _ = table_candidates(n, v, np.zeros_like(n))
    plan = decisions(cells)
    reasoning = {"": Law("product", A=0.45 * 1e9**0.077, alpha=0.077, beta=0.015, D=0.14)}
    ocr = {"": Law("product", A=0.45 * 1e9**0.015, alpha=0.015, beta=0.077, D=0.14)}  # tokens matter more
    assert decision_agreement(reasoning, reasoning, cells, plan).all()
    wrong = decision_agreement(reasoning, ocr, cells, plan)
    assert not wrong.all() and wrong.any()  # at the cheapest budget there is only one choice
    # a tolerance as large as the whole error range forgives every pick
    assert decision_agreement(reasoning, ocr, cells, plan, tolerance=1.0).all()
    # plan: 20 log-spaced budgets from the cheapest to the dearest candidate, per Q
    assert len(plan) == 60 and plan.flops[0] == pytest.approx(plan.costs[0].min())
    assert plan.flops[19] == pytest.approx(plan.costs[19].max())


def test_training_cost_grows_with_n_and_tokens():
    cells, _ = table_candidates([5e8, 7e9, 7e9], [1, 1, 576], [0.3, 0.2, 0.1])
    cost = training_costs(cells, 192.0)
    assert cost[1] / cost[0] == pytest.approx(14.0) and cost[2] / cost[1] == pytest.approx(768 / 193)


# ---- the CLI --------------------------------------------------------------------------------


def tokenscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenscale.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_replay_json_keys(tmp_path):
    n, v, e = paper_table(0.002, seed=5)
    out = tokenscale("replay", "--points", write_csv(tmp_path / "full.csv", n, v, e), "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert {"cells_total", "cells_used", "fraction_used", "cost_fraction", "same_decision", "full", "adaptive"} <= set(body)
    assert body["cells_total"] == 28 and 5 <= body["cells_used"] < 28 and body["same_decision"] is True
    assert body["fraction_used"] == pytest.approx(body["cells_used"] / 28)
    for name in ("full", "adaptive"):
        assert set(body[name]) == {"alpha", "beta", "optimal_visual_tokens"}
        assert set(body[name]["optimal_visual_tokens"]) == {"0", "50", "100"}
        assert all(1 <= x <= 576 for x in body[name]["optimal_visual_tokens"].values())

    two = tokenscale("replay", "--points", write_csv(tmp_path / "q.csv", n, v, e), "--form", "sum",
                     "--text-tokens", "0", "37.5", "--json")
    assert two.returncode == 0, two.stderr
    body = json.loads(two.stdout)
    assert body["form"] == "sum" and set(body["adaptive"]["optimal_visual_tokens"]) == {"0", "37.5"}
    assert body["decisions"] == 40


def test_cli_replay_help_imports_neither_numpy_nor_torch_nor_ray():
    code = ("import sys\nfrom tokenscale.cli import main\ntry:\n    main(['replay', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "usage: tokenscale replay" in out.stdout and "--text-tokens Q" in out.stdout
    assert not {"numpy", "torch", "ray", "scipy"} & set(out.stderr.split()), out.stderr


def test_cli_replay_bad_input_exits_2_with_one_line(tmp_path):
    n, v, e = paper_table()
    good = write_csv(tmp_path / "full.csv", n, v, e)
    (tmp_path / "nocol.csv").write_text("llm_params,error\n1e9,0.3\n")
    (tmp_path / "text.csv").write_text("llm_params,visual_tokens,error\n1e9,4,high\n")
    small = write_csv(tmp_path / "small.csv", [1e9, 1e9, 2e9, 2e9], [1, 4, 1, 4], [0.5, 0.4, 0.45, 0.35])
    blank = write_csv(tmp_path / "blank.csv", n[:3], v[:3], e[:3], ["a", "", "a"])
    cases = {
        ("--points", str(tmp_path / "missing.csv")): "is not a file",
        ("--points", str(tmp_path / "nocol.csv")): "lacks column(s) visual_tokens",
        ("--points", str(tmp_path / "text.csv")): "line 2: error='high' is not a number",
        ("--points", good, "--form", "cubic"): "--form 'cubic': choose one of product, sum",
        ("--points", good, "--text-tokens", "-5"): "--text-tokens -5",
        ("--points", good, "--threshold", "1.5"): "--threshold 1.5",
        ("--points", good, "--max-trials", "0"): "--max-trials 0",
        ("--points", small): "4 points cannot determine",
        ("--points", blank): "line 3: empty compressor",
        ("--points", good, "--max-trials", "3"): "the 3 cells run",
    }
    for args, words in cases.items():
        out = tokenscale("replay", *args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tokenscale replay: error:"), (args, out.stderr)
        assert words in lines[0], (args, lines[0])
        assert out.stdout == "", args


# ---- /optimal: p_optimal and the runner-up ---------------------------------------------------

GRID = "adaptive-syn"
LLMS = {"xs": 1_000_000, "s": 4_000_000, "m": 16_000_000, "l": 64_000_000}
SERVE_TOKENS = (1, 4, 16, 64)
TRUTH = {
    ("reasoning", "avgpool"): (0.6, 0.20, 0.08, 0.15),
    ("reasoning", "qformer"): (0.5, 0.15, 0.20, 0.18),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    store = Store.open(str(tmp_path_factory.mktemp("adaptive-store")))
    write_synthetic_results(store, GRID, LLMS, SERVE_TOKENS, TRUTH, {"reasoning": ["mmmu", "gqa"]}, seed=3, noise=0.01)
    rows, skipped = fit_grid(store, GRID, resamples=60, seed=1)
    assert len(rows) == 4 and not skipped
    return store


@pytest.fixture(scope="module")
def advisor(store) -> Advisor:
    return Advisor(load_snapshot(store, GRID))


def by_hand(advisor: Advisor, budget: float, q: float, form: str) -> tuple[np.ndarray, list]:
    """Per candidate, the share of stored draws in which `pick` chooses it at this budget."""
    opts = advisor.snapshot.options[("reasoning", None, form)]
    costs = np.array([2 * c.llm_params * (q + c.visual_tokens) + (2 * c.llm_params * q if c.compressor == "quecc" else 0)
                      for c in opts.candidates])
    picks = [int(pick(row, costs, budget)[0]) for row in opts.draw_errors]
    return np.bincount(picks, minlength=len(opts.candidates)) / len(picks), list(opts.candidates)


def key(answer: dict) -> tuple:
    return answer["llm"], answer["visual_tokens"], answer["compressor"]


def test_optimal_returns_p_optimal_and_the_runner_up(advisor):
    seen_unsure = False
    for form in ("product", "sum"):
        for q in (0.0, 50.0):
            cheapest = min(2 * c.llm_params * (q + c.visual_tokens) for c in advisor.snapshot.candidates)
            for budget in np.geomspace(cheapest * 1.5, cheapest * 3000, 9):
                answer = advisor.optimal(float(budget), q, "reasoning", form=form)
                shares, cands = by_hand(advisor, budget, q, form)
                index = {(c.llm, c.visual_tokens, c.compressor): i for i, c in enumerate(cands)}
                assert answer["p_optimal"] == answer["optimal_share"] == pytest.approx(shares[index[key(answer)]])
                runner = answer["runner_up"]
                assert runner is not None and key(runner) != key(answer)
                assert runner["flops"] <= budget and runner["predicted_error"] >= answer["predicted_error"] - 1e-12
                assert runner["predicted_error_lo"] <= runner["predicted_error_hi"]
                assert answer["runner_up_p_optimal"] == pytest.approx(shares[index[key(runner)]])
                # the runner-up is the most-chosen alternative
                others = np.delete(shares, index[key(answer)])
                assert answer["runner_up_p_optimal"] == pytest.approx(others.max())
                assert answer["p_optimal"] + answer["runner_up_p_optimal"] <= 1 + 1e-12
                seen_unsure |= answer["p_optimal"] < 0.9
    assert seen_unsure, "the noisy grid should leave some decisions open"


def test_optimal_without_a_rival_or_without_draws(store, advisor):
    cheapest = min(2 * c.llm_params * c.visual_tokens for c in advisor.snapshot.candidates)
    alone = advisor.optimal(cheapest, 0.0, "reasoning", compressor="avgpool")  # only its cheapest candidate fits
    assert alone["p_optimal"] == 1.0 and alone["runner_up"] is None and alone["runner_up_p_optimal"] is None
    # without stored draws: no shares, the runner-up is the next-lowest predicted error
    bare = Advisor(load_snapshot(store, GRID, cis=False))
    answer = bare.optimal(1e10, 0.0, "reasoning")
    assert answer["p_optimal"] is None and answer["runner_up_p_optimal"] is None
    opts = bare.snapshot.options[("reasoning", None, "product")]
    costs = opts.menu.costs(0.0)
    affordable = [(e, c) for e, c, cost in zip(opts.menu.errors, opts.candidates, costs, strict=True) if cost <= 1e10]
    second = sorted(affordable, key=lambda t: t[0])[1][1]
    assert key(answer["runner_up"]) == (second.llm, second.visual_tokens, second.compressor)


def test_optimal_over_http_in_process_carries_the_decision_fields(store, advisor):
    """Through the FastAPI app (no Ray): the HTTP body is the Advisor's answer, and the
    OpenAPI schema documents the new fields."""
    from test_serve import asgi_get

    from tokenscale.serve.app import Replica, build_api

    api = build_api(Replica(store.uri, GRID, reload_seconds=60, poll=False))
    status, body = asgi_get(api, "/optimal", flops=3e9, text_tokens=50, task="reasoning")
    assert status == 200, body
    assert body == advisor.optimal(3e9, 50.0, "reasoning")
    assert 0 < body["p_optimal"] <= 1 and body["runner_up"]["llm"] in LLMS
    status, spec = asgi_get(api, "/openapi.json")
    fields = spec["components"]["schemas"]["OptimalAnswer"]["properties"]
    assert {"p_optimal", "runner_up", "runner_up_p_optimal"} <= set(fields)
