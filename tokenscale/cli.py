"""`tokenscale`: the one place that wires orchestrator, store, fitting and Serve together."""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .store import LAW_N_COLUMNS, Store, StoreError, check_name

EXIT_BAD_INPUT = 2  # the grid, a flag or a query is wrong: the message names it and the fix
EXIT_STORE = 3  # the store could not be reached or refused (after bounded retries)

# A packaged grid (tokenscale.configs, shipped in the wheel): resolved by configs.grid_path,
# so `tokenscale demo` works from a non-editable install too.
DEMO_GRID = "demo"


class CLIError(Exception):
    """Bad input: printed as one line, exit status 2."""


class RunFailed(Exception):
    """The work itself failed (a trial errored, nothing was learned): one line, exit 1, as
    `run` exits 1 when a trial errored."""


def _store(args: argparse.Namespace) -> Store:
    try:
        return Store.open(args.store)
    except ValueError as err:
        raise CLIError(f"--store: {err}") from None


def _grid_name(name: str) -> str:
    """A grid name in the store (resume, status): a path segment, so a safe name."""
    try:
        return check_name("GRID", name)
    except ValueError as err:
        raise CLIError(f"{err}; GRID is the name of a grid in the store, as `tokenscale run` named it") from None


def _number(flag: str, value: float | None, *, low: float, low_inclusive: bool, high: float = math.inf,
            what: str = "") -> None:
    """A finite number in range, else one line naming the flag and what is accepted."""
    if value is None:
        return
    above = value >= low if low_inclusive else value > low
    if not (math.isfinite(value) and above and value <= high):
        bracket = "[" if low_inclusive else "("
        upper = f"{high:g}]" if math.isfinite(high) else "inf)"
        raise CLIError(f"{flag} {value:g}: give a finite number in {bracket}{low:g}, {upper}{what}")


def _port(flag: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise CLIError(f"{flag} {port}: give a TCP port from 1 to 65535")


# ---- plan, schema, run -----------------------------------------------------------------


def _load_grid(name_or_path: str):
    """A grid file or a packaged grid name, validated in full (the one path to a grid)."""
    from tokenscale.config import load_grid
    from tokenscale.configs import grid_path

    try:
        path = grid_path(name_or_path)
    except ValueError as err:
        raise CLIError(f"GRID: {err}") from None
    return load_grid(path)


def plan_rows(grid, store: Store | None) -> list[dict]:
    """One row per trial, in scheduling order: what it is, what it asks for, what it costs
    and whether its result is already in the store. Neither torch nor Ray is imported."""
    from tokenscale.config import planned_llm_params, trial_inference_flops, trial_training_flops

    rows = []
    for trial in grid.trials():
        resources = grid.resources.for_llm(trial.llm)
        params = planned_llm_params(trial.llm)
        rows.append({
            "trial_id": trial.trial_id,
            "llm": trial.llm.name,
            "llm_params": params,
            "visual_tokens": trial.visual_tokens,
            "compressor": trial.compressor,
            "seed": trial.seed,
            "workers": resources["workers"],
            "gpus_per_worker": resources["gpus_per_worker"],
            "execution": resources["execution"],
            "inference_flops_q0": trial_inference_flops(trial, 0.0),
            "accumulation": [trial.train.accumulation(stage, resources["workers"]) for stage in (1, 2)],
            "training_flops": trial_training_flops(trial),
            "in_store": None if store is None else store.has_result(trial.grid, trial.compressor, trial.config_hash),
        })
    return rows


def cmd_plan(args: argparse.Namespace) -> int:
    from tokenscale.config import GridError, check_tracking

    grid = _load_grid(args.grid)
    try:  # `run` needs the package on the driver's machine, which need not be this one
        check_tracking(grid)
    except GridError as err:
        print(f"tokenscale plan: note: {err}", file=sys.stderr)
    store = _store(args)
    rows = plan_rows(grid, store)
    if args.adaptive:  # the cells the adaptive loop would start next, given what the store has
        from tokenscale.fitting.adaptive import Settings
        from tokenscale.orchestrator.adaptive import cells, measured, next_cells

        table = cells(grid)
        batch, reason, _ = next_cells(table, measured(store, grid, table), max(1, grid.max_concurrent_trials), Settings())
        chosen = {t.trial_id for c in batch for t in table[c]}
        rows = [r for r in rows if r["trial_id"] in chosen]
        if args.format != "json":
            print(f"first adaptive batch ({reason}): {len(batch)} of {len(table)} cells")
    if args.format == "json":
        print(json.dumps(rows))
        return 0
    columns = ["trial_id", "llm", "llm_params", "V", "compressor", "seed", "workers x GPUs", "accum s1/s2",
               "inference FLOPs (Q=0)", "training FLOPs", "in store"]
    table = [
        (r["trial_id"], r["llm"], r["llm_params"], r["visual_tokens"], r["compressor"], r["seed"],
         f"{r['workers']} x {r['gpus_per_worker']:g}", "/".join(map(str, r["accumulation"])),
         r["inference_flops_q0"], r["training_flops"], "yes" if r["in_store"] else "no")
        for r in rows
    ]
    _print_table(columns, table, "table")
    done = sum(bool(r["in_store"]) for r in rows)
    total = sum(r["training_flops"] or 0.0 for r in rows if not r["in_store"])
    print(f"grid {grid.name!r}: {len(rows)} trials, {done} already in the store; {total:.3g} training FLOPs to run")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from tokenscale.config import grid_json_schema

    print(json.dumps(grid_json_schema(), indent=2))
    return 0


# ---- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from tokenscale.config import check_tracking
    from tokenscale.orchestrator.status import GRID_FILE

    grid = _load_grid(args.config)  # validated in full before anything starts
    if args.max_trials is not None and not args.adaptive:
        raise CLIError("--max-trials caps an adaptive run: add --adaptive")
    if args.max_trials is not None and args.max_trials < 1:
        raise CLIError(f"--max-trials {args.max_trials}: give at least 1 trial")
    store = _store(args)
    store.exists(store.join(grid.name, GRID_FILE))  # a store that cannot be read is told before Ray is imported
    check_tracking(grid)  # and a tracker whose package is missing
    from tokenscale.orchestrator.driver import run_grid

    if args.adaptive:
        from tokenscale.orchestrator.adaptive import run_adaptive_grid

        outcome = run_adaptive_grid(grid, store, max_trials=args.max_trials, verbose=args.verbose)
        print(outcome.line())
        return 0 if outcome.errored == 0 else 1
    summary = run_grid(grid, store, verbose=args.verbose)
    print(summary.line())
    return 0 if summary.errored == 0 else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from tokenscale.config import check_tracking
    from tokenscale.orchestrator.status import load_saved_grid  # Ray-free

    store = _store(args)
    # an unknown grid, a store that cannot be read or a tracker whose package is missing is
    # told before Ray is imported
    check_tracking(load_saved_grid(store, _grid_name(args.grid)))
    from tokenscale.orchestrator.driver import resume_grid

    summary = resume_grid(store, args.grid, verbose=args.verbose)
    print(summary.line())
    return 0 if summary.errored == 0 else 1


def cmd_status(args: argparse.Namespace) -> int:
    from tokenscale.orchestrator.status import grid_status  # Ray-free: reads Tune's state files

    rows = grid_status(_store(args), _grid_name(args.grid))
    # progress / eta: a running trial's "stage 2 120/150" and time left ("?" when unknown);
    # json also gives them as numbers
    columns = ["trial", "llm", "V", "compressor", "seed", "status", "progress", "eta", "error"]
    table = [(r.name, r.llm, r.visual_tokens, r.compressor, r.seed, r.status, r.progress, r.eta, r.error) for r in rows]
    if args.format == "json":
        columns += ["stage", "step", "steps", "eta_seconds"]
        table = [(*line, r.stage, r.step, r.steps, r.eta_seconds) for line, r in zip(table, rows, strict=True)]
    _print_table(columns, table, args.format)
    counts = {s: sum(r.status == s for r in rows) for s in ("done", "running", "errored", "pending")}
    if args.format == "table":
        print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


# ---- sql ---------------------------------------------------------------------------------


def _print_table(columns: list[str], rows: list[tuple], fmt: str) -> None:
    def text(value) -> str:
        if isinstance(value, float):
            return f"{value:.6g}"
        return "NULL" if value is None else str(value)

    if fmt == "json":
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows([[text(v) for v in row] for row in rows])
    else:
        cells = [[text(v) for v in row] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from .sql import query

    try:
        columns, rows = query(_store(args), args.query, read_only=not args.write)
    except duckdb.Error as err:
        raise CLIError(f"SQL: {str(err).splitlines()[0]}") from None
    _print_table(columns, rows, args.format)
    return 0


# ---- fit ---------------------------------------------------------------------------------


def _read_points(path: str) -> tuple[list[float], list[float], list[float]]:
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--points: {path} is not a file")
    with file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        needed = {"llm_params", "visual_tokens", "error"}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise CLIError(f"--points: {path} lacks column(s) {', '.join(sorted(missing))}; need llm_params,visual_tokens,error")
        cols: dict[str, list[float]] = {k: [] for k in needed}
        for line, row in enumerate(reader, start=2):
            for key in needed:
                try:
                    cols[key].append(float(row[key]))
                except (TypeError, ValueError):
                    raise CLIError(f"--points: {path} line {line}: {key}={row[key]!r} is not a number") from None
    return cols["llm_params"], cols["visual_tokens"], cols["error"]


def cmd_eval(args: argparse.Namespace) -> int:
    """Each kept trial x each eval set without a result yet: one object of rows, written once."""
    from tokenscale.config import load_eval_sets
    from tokenscale.orchestrator.status import load_saved_grid

    eval_sets = load_eval_sets(args.eval)
    store = _store(args)
    grid = load_saved_grid(store, args.grid)
    if grid.data.llava is None:
        raise CLIError(f"grid {grid.name!r} has no data.llava: eval sets are LLaVA-format and need the LLMs' tokenizers")
    clash = sorted({e.name for e in grid.data.llava.eval} & {e.name for e in eval_sets})
    if clash:
        raise CLIError(f"eval set(s) {', '.join(clash)} are the grid's own "
                       "(scored when each trial finished); give new sets another name")
    trials = grid.trials()
    kept = [t for t in trials if store.exists(store.weights_key(t.grid, t.compressor, t.config_hash))]
    if not kept:
        raise CLIError(f"no trial of grid {grid.name!r} kept its weights in {store.uri}: "
                       "run it with train: {keep_final: true}")
    from tokenscale.store import arrow_schema
    from tokenscale.workers.train import evaluate_kept

    written = skipped = 0
    for trial in kept:
        todo = [e for e in eval_sets
                if not store.exists(store.eval_result_key(trial.grid, trial.compressor, trial.config_hash, e.name))]
        skipped += len(eval_sets) - len(todo)
        if not todo:
            continue
        weights = store.get_bytes(store.weights_key(trial.grid, trial.compressor, trial.config_hash))
        for eval_set in todo:
            rows = evaluate_kept(trial, weights, [eval_set], trial.config_hash, store=store.uri)
            key = store.eval_result_key(trial.grid, trial.compressor, trial.config_hash, eval_set.name)
            store.write_table(key, rows, arrow_schema("RESULT_SCHEMA"))
            written += 1
            print(f"{trial.trial_id} {eval_set.name}: score {rows[0]['score']:.4f} -> {key}", flush=True)
    print(f"{written} new (trial, eval set) result(s); {skipped} already in the store; "
          f"{len(trials) - len(kept)} trial(s) without kept weights")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from tokenscale.costs import FORMS, inference_flops
    from tokenscale.fitting.frontier import optimal_visual_tokens
    from tokenscale.fitting.law import LOSSES
    from tokenscale.fitting.solve import fit_law

    form, loss = args.form or FORMS[0], args.loss or LOSSES[0]
    _number("--text-tokens", args.text_tokens, low=0.0, low_inclusive=True)
    _number("--flops", args.flops, low=0.0, low_inclusive=False)
    if form not in FORMS:
        raise CLIError(f"--form {form!r}: choose one of {', '.join(FORMS)}")
    if loss not in LOSSES:
        raise CLIError(f"--loss {loss!r}: choose one of {', '.join(LOSSES)}")
    if args.points:
        if args.grid:
            raise CLIError("give either GRID or --points FILE.csv, not both")
        n, v, e = _read_points(args.points)
        law = fit_law(n, v, e, form, loss=loss)
        flops = args.flops if args.flops else float(inference_flops(max(n), args.text_tokens, max(v)))
        out = {k: val for k, val in law.to_dict().items() if not (k == "B" and val is None)}
        out["text_tokens"] = args.text_tokens
        out["optimal_visual_tokens"] = optimal_visual_tokens(law, args.text_tokens, min(v), max(v), flops=flops)
        if args.json:
            print(json.dumps(out))
        else:
            for key, val in out.items():
                print(f"{key:>22}: {val}")
        return 0
    if not args.grid:
        raise CLIError("give a GRID name (fit its results in the store) or --points FILE.csv")
    from tokenscale.fitting.grid_fit import fit_grid

    store = _store(args)
    rows, skipped = fit_grid(store, args.grid, loss=loss, n_column=args.n_column, holdout_llms=_holdout_llms(store, args.grid))
    for line in skipped:
        print(f"not fitted: {line}")
    if args.json:
        print(json.dumps(rows, default=str))
    else:
        for line in heldout_lines(store, args.grid):
            print(line)
        for r in rows:
            print(
                f"{r['task_family']:>10} {r['compressor']:>16} {r['form']:>8}: alpha={r['alpha']:.3f} "
                f"beta={r['beta']:.3f} D={r['D']:.3f} r2={r['r2']:.3f} (n={r['n_points']}, N={r['llm_params_column']}, "
                f"{r['loss']} loss, {r['ci_resamples']} draws)" + (" [preferred form]" if r["preferred"] else "")
                + (f"; not identified: {r['identification']}" if r["identification"] else "")
            )
        if rows:
            print(f"laws written to {store.laws_key(args.grid)}, their bootstrap draws to {store.draws_key(args.grid)}")
    if rows:
        from tokenscale.fitting.plots import write_plots

        for key in write_plots(store, args.grid):
            if not args.json:
                print(f"plot written to {key}")
    return 0


def _holdout_llms(store: Store, grid: str) -> list[str]:
    """The LLMs the grid as run marks `holdout: true` (none for a grid run before the field
    existed, or one the store has no saved YAML of)."""
    from tokenscale.orchestrator.status import GRID_FILE, load_saved_grid

    if not store.exists(store.join(grid, GRID_FILE)):
        return []
    return [llm.name for llm in load_saved_grid(store, grid).llms if llm.holdout]


def heldout_lines(store: Store, grid: str) -> list[str]:
    """Each held-out LLM's observed error against the product law's prediction and its
    bootstrap interval, one line per (family, compressor, LLM, V). The interval is the law's
    (of the expected error); the observation has its own eval noise (`eval_variance`), so a
    point outside it but within 1.645 of its standard deviations (the 90% level) is said to
    be inside once that noise is allowed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from tokenscale.fitting.grid_fit import eval_variance

    rows = [r for r in store.read_heldout(grid).to_pylist() if r["form"] == "product"]
    if not rows:
        return []
    results = store.read_results(grid)
    held = results.filter(pc.is_in(results["llm"], value_set=pa.array(sorted({r["llm"] for r in rows}), pa.string())))
    variance = eval_variance(held, ["task_family", "compressor", "llm", "visual_tokens"])
    lines = []
    for r in rows:
        low, high, observed = r["predicted_lo"], r["predicted_hi"], r["observed_error"]
        var = variance.get((r["task_family"], r["compressor"], r["llm"], r["visual_tokens"]))
        slack = 1.645 * math.sqrt(var) if var is not None else 0.0
        if low <= observed <= high:
            inside = "inside the interval"
        elif slack and low - slack <= observed <= high + slack:
            inside = f"inside the interval once its eval noise, +-{slack:.4f}, is allowed"
        else:
            inside = "OUTSIDE the interval" + (f", even with its eval noise (+-{slack:.4f})" if slack else "")
        miss = (r["predicted_error"] - observed) / observed if observed else float("nan")
        lines.append(
            f"held out {r['llm']} (N={r['llm_params']:.3g}) {r['task_family']}/{r['compressor']} V={r['visual_tokens']}: "
            f"observed {observed:.4f}, predicted {r['predicted_error']:.4f} "
            f"[{low:.4f}, {high:.4f}] ({miss:+.1%}, {inside})"
        )
    return lines


# ---- replay ------------------------------------------------------------------------------


def _read_compressors(path: str) -> list[str] | None:
    """The optional `compressor` column of a points CSV (`_read_points` reads the numbers):
    one name per row, or None when the file has no such column."""
    with Path(path).open(newline="") as handle:
        reader = csv.DictReader(handle)
        if "compressor" not in (reader.fieldnames or []):
            return None
        names = []
        for line, row in enumerate(reader, start=2):
            name = (row["compressor"] or "").strip()
            if not name:
                raise CLIError(f"--points: {path} line {line}: empty compressor; name one on every row, or drop the column")
            names.append(name)
    return names


def cmd_replay(args: argparse.Namespace) -> int:
    from tokenscale.costs import FORMS
    from tokenscale.fitting.adaptive import DECISION_TEXT_TOKENS, Settings, replay

    form = args.form or FORMS[0]
    if form not in FORMS:
        raise CLIError(f"--form {form!r}: choose one of {', '.join(FORMS)}")
    text_tokens = tuple(dict.fromkeys(args.text_tokens)) if args.text_tokens else DECISION_TEXT_TOKENS
    for q in text_tokens:
        _number("--text-tokens", q, low=0.0, low_inclusive=True)
    _number("--threshold", args.threshold, low=0.0, low_inclusive=False, high=1.0, what=" (a share of the draws)")
    if args.max_trials is not None and args.max_trials < 1:
        raise CLIError(f"--max-trials {args.max_trials}: give at least 1 trial")
    n, v, e = _read_points(args.points)
    compressors = _read_compressors(args.points)
    settings = Settings(form=form, text_tokens=text_tokens, **({"threshold": args.threshold} if args.threshold else {}))
    out = replay(n, v, e, compressors, settings=settings, max_trials=args.max_trials)
    if args.json:
        print(json.dumps(out))
        return 0
    p_min = "n/a" if out["p_optimal_min"] is None else f"{out['p_optimal_min']:.2f}"
    print(f"cells used: {out['cells_used']} of {out['cells_total']} ({out['fraction_used']:.1%}), training cost "
          f"{out['cost_fraction']:.1%} of the full table's; stopped: {out['stopped']} (lowest p_optimal "
          f"{p_min}, threshold {out['threshold']:g})")
    print(f"same decision as the full table: {'yes' if out['same_decision'] else 'no'} "
          f"({out['decisions_same']} of {out['decisions']} budgets x query lengths)")
    for name in ("full", "adaptive"):
        law = out[name]
        print(f"{name:>9}: alpha={json.dumps(law['alpha'])} beta={json.dumps(law['beta'])} "
              f"optimal_visual_tokens={json.dumps(law['optimal_visual_tokens'])}")
    return 0


# ---- serve -------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    # every flag checked before the store is read or Ray started
    _port("--port", args.port)
    _number("--reload-seconds", args.reload_seconds, low=0.0, low_inclusive=False, what=" (seconds between looks for new laws)")
    if args.replicas < 1:
        raise CLIError(f"--replicas {args.replicas}: give at least 1 replica")
    _number("--num-cpus", args.num_cpus, low=0.0, low_inclusive=True, what=" (CPUs reserved per replica)")
    if args.grid is not None:
        _grid_name(args.grid)
    store = _store(args)
    # the replicas poll the laws the same way: a store that cannot be read fails here, once
    store.laws_versions(args.grid)
    from tokenscale.orchestrator.driver import init_ray
    from tokenscale.serve.app import start

    init_ray()
    from tokenscale.orchestrator.status import saved_grid_status

    url = start(store.uri, args.grid, args.host, args.port, args.reload_seconds,
                num_replicas=args.replicas, num_cpus=args.num_cpus, trial_status=saved_grid_status)
    print(f"serving {store.uri} at {url} (the report page at {url}/, OpenAPI at {url}/docs); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


# ---- report ------------------------------------------------------------------------------


def write_report(store: Store, grid: str, out: str | None = None) -> str:
    """The grid's report page (serve/report.py) written to `out` (a local file), else to
    <store>/<grid>/report.html; returns where."""
    from tokenscale.orchestrator.status import saved_grid_status
    from tokenscale.serve.advisor import Advisor, load_snapshot
    from tokenscale.serve.report import build_report
    from tokenscale.store import write_atomically

    snapshot = load_snapshot(store, grid)
    statuses = saved_grid_status(store, grid)
    if snapshot is None and statuses is None and not store.list(store.join(grid, "results"), ".parquet"):
        raise CLIError(f"grid {grid!r} has no results and was never run with store {store.uri}: "
                       f"start it with `tokenscale run`, or give the right --store")
    page = build_report(store, grid, Advisor(snapshot) if snapshot else None, statuses).encode()
    if out:
        path = Path(out).expanduser().resolve()
        write_atomically(path, lambda f: f.write(page))
        return str(path)
    key = store.join(grid, "report.html")
    store.put_bytes(key, page)
    return key


def cmd_report(args: argparse.Namespace) -> int:
    if args.out is not None and not args.out.endswith((".html", ".htm")):
        raise CLIError(f"--out {args.out!r}: give a file name ending in .html")
    print(write_report(_store(args), _grid_name(args.grid), args.out))
    return 0


# ---- demo --------------------------------------------------------------------------------


def learning_report(store: Store, grid: str, alpha: float = 0.001) -> tuple[list[str], list[str]]:
    """(one line per benchmark, the benchmarks no trial learned). A trial learned a
    benchmark when its correct answers reach `chance_floor` (a one-sided exact binomial
    test against guessing at the benchmark's chance, level `alpha`)."""
    from tokenscale.workers.metrics import chance_floor

    from .sql import query

    _, scored = query(
        store,
        "select benchmark, llm || ' V=' || visual_tokens || ' ' || compressor, score, n_examples, chance "
        f"from results where grid = '{grid}' order by benchmark, llm_params, visual_tokens, compressor",
    )
    lines, unlearned = [], []
    for benchmark in sorted({row[0] for row in scored}):
        rows = [row for row in scored if row[0] == benchmark]
        above = sum(round(score * n) >= chance_floor(n, chance, alpha) for _, _, score, n, chance in rows)
        weakest = min(rows, key=lambda row: row[2] - row[4])
        mean = sum(row[2] for row in rows) / len(rows)
        lines.append(f"{benchmark:>10}: {above}/{len(rows)} trials, mean {mean:.3f} vs chance {rows[0][4]:.3f}, "
                     f"weakest {weakest[2]:.3f} ({weakest[1]})")
        if not above:
            unlearned.append(benchmark)
    return lines, unlearned


def figure_one(answers: dict[str, dict], budget: float, flat: Collection[tuple[str, str]] = ()) -> list[str]:
    """The paper's Figure 1 as text: at one inference budget, the compute-optimal choice for
    reasoning beside the one for OCR (a bigger LLM with few tokens against more tokens),
    each with its predicted error, 90% CI and the share of bootstrap draws choosing it.
    An answer from a (task, compressor) in `flat` (its errors within their eval noise) says
    so under it: any other (N, V) would do as well."""
    width = 40
    lines = [f"  at {budget:.3g} FLOPs per query (cached query, Q = 0):", "  " + "".join(f"{t:<{width}}" for t in answers)]

    def cell(answer: dict, key: str) -> str:
        if "error" in answer:
            return "no answer: " + str(answer["error"])[:width - 12]
        if key == "llm":
            return f"LLM {answer['llm']} (N={answer['llm_params']:.3g})"
        if key == "tokens":
            return f"{answer['visual_tokens']} visual tokens, {answer['compressor']}"
        if key == "error":
            lo, hi = answer.get("predicted_error_lo"), answer.get("predicted_error_hi")
            ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
            return f"error {answer['predicted_error']:.3f}{ci}"
        share = answer.get("p_optimal")
        return f"chosen in {share:.0%} of the draws ({answer['form']})" if share is not None else f"({answer['form']} law)"

    for key in ("llm", "tokens", "error", "share"):
        lines.append("  " + "".join(f"{cell(a, key):<{width}}" for a in answers.values()))
    notes = ["flat law: any (N, V) is as good" if (task, a.get("compressor")) in flat else "" for task, a in answers.items()]
    if any(notes):
        lines.append("  " + "".join(f"{note:<{width}}" for note in notes))
    return lines


def law_verdict(row: dict[str, Any]) -> str:
    """What a product-form law row says about LLM size against tokens, as the demo prints it:
    a finding only where the exponents are identified (the points not flat among them) and
    the bootstrap 90% CI of alpha/beta excludes 1."""
    from tokenscale.fitting.grid_fit import exponents_identified, is_flat

    if not exponents_identified(row):
        if is_flat(row):
            return "no finding: the errors are flat, within their eval noise: the law ranks no (N, V) above another"
        return "no finding: an exponent is not identified by these points"
    if max(row["alpha"], row["beta"]) < 1e-3:
        return "no measurable trend in N or V (flat errors: the law says nothing here)"
    if row["alpha"] > row["beta"]:
        ratio = f"alpha/beta = {row['alpha'] / row['beta']:.1f}" if row["beta"] > 1e-3 else "beta ~ 0"
        direction, optimum = f"LLM size matters more (alpha > beta, {ratio})", "smallest"
    else:
        direction, optimum = "tokens matter more (beta >= alpha)", "largest"
    interval = f"the 90% CI of alpha/beta [{row['ratio_lo']:.2g}, {row['ratio_hi']:.2g}]"
    if row["ratio_lo"] <= 1 <= row["ratio_hi"]:
        return f"no finding: {direction} here, but {interval} includes 1"
    return f"{direction}; cached-query optimum V* = the {optimum} budget; {interval} excludes 1"


def cmd_demo(args: argparse.Namespace) -> int:
    import requests
    from ray import serve

    from tokenscale.fitting.grid_fit import fit_grid, is_flat
    from tokenscale.orchestrator.driver import init_ray, run_grid
    from tokenscale.serve.app import start

    from .sql import query

    started = time.perf_counter()
    _port("--port", args.port)
    grid = _load_grid(args.config)
    store = _store(args)
    print(f"[1/4] running grid {grid.name!r}: {len(grid.trials())} trials -> {store.uri}", flush=True)
    summary = run_grid(grid, store, verbose=args.verbose)
    print(summary.line(), flush=True)
    if summary.errored:
        raise RunFailed(f"{summary.errored} trial(s) errored; see the Tune table above")

    # Is there anything to fit? Each benchmark must be learned, or the laws would fit noise.
    lines, unlearned = learning_report(store, grid.name)
    print("  learned, per benchmark: trials above chance (binomial test, alpha 0.001); mean score; weakest trial:")
    for line in lines:
        print(f"  {line}")
    if unlearned:
        raise RunFailed(f"no trial answered {', '.join(unlearned)} above chance: nothing was learned to fit a law to")

    print("[2/4] fitting scaling laws", flush=True)
    rows, skipped = fit_grid(store, grid.name, holdout_llms=[llm.name for llm in grid.llms if llm.holdout])
    for r in rows:
        print(
            f"  {r['task_family']:>10} {r['compressor']:>16} {r['form']:>8}: alpha={r['alpha']:.3f} "
            f"[{r['alpha_lo']:.3f}, {r['alpha_hi']:.3f}] beta={r['beta']:.3f} [{r['beta_lo']:.3f}, {r['beta_hi']:.3f}] "
            f"D={r['D']:.3f} r2={r['r2']:.3f} holdout={r['holdout_error']:.3f}" + (" [preferred form]" if r["preferred"] else "")
        )
        if r["identification"]:
            print(f"  {'':>10} {'':>16} {'':>8}  -> not identified ({r['identification']})")
        if r["form"] == "product":
            print(f"  {'':>10} {'':>16} {'':>8}  -> {law_verdict(r)}")
    for line in skipped:
        print(f"  not fitted: {line}")
    for line in heldout_lines(store, grid.name):
        print(f"  {line}")
    if rows:
        print(f"  laws: {store.laws_key(grid.name)} (N = {rows[0]['llm_params_column']}, {rows[0]['loss']} loss); "
              f"bootstrap draws: {store.draws_key(grid.name)}")
        from tokenscale.fitting.plots import write_plots

        for key in write_plots(store, grid.name):
            print(f"  plot: {key}")

    print("[3/4] serving the laws with Ray Serve", flush=True)
    init_ray()
    from tokenscale.orchestrator.status import saved_grid_status

    url = start(store.uri, grid.name, "127.0.0.1", args.port, trial_status=saved_grid_status)
    try:
        columns, result_rows = query(store, f"select min(inference_flops), max(inference_flops) from results where grid = '{grid.name}'")
        budget = math.sqrt(result_rows[0][0] * result_rows[0][1])  # a mid-range budget
        print(f"[4/4] the paper's Figure 1 at one budget: GET {url}/optimal?flops={budget:.3g}&text_tokens=0&task=…",
              flush=True)
        answers = {}
        for task in ("reasoning", "ocr"):
            reply = requests.get(f"{url}/optimal", params={"flops": budget, "text_tokens": 0, "task": task}, timeout=30)
            answers[task] = reply.json() if reply.status_code == 200 else {"error": reply.text}
        flat = {(r["task_family"], r["compressor"]) for r in rows if r["preferred"] and is_flat(r)}
        for line in figure_one(answers, budget, flat):
            print(line)
    finally:
        serve.shutdown()
    report = write_report(store, grid.name)
    print(f"\nresults: {store.results_glob(grid.name)}\nlaws:    {store.laws_key(grid.name)}")
    print(f"report:  {report} (open it in a browser; `tokenscale serve` also serves it at /)")
    print(f"try:     tokenscale sql \"select llm, visual_tokens, task_family, avg(score) from results group by all order by all\" --store {store.uri}")
    print(f"demo finished in {time.perf_counter() - started:.0f}s")
    return 0


# ---- wiring ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenscale", description="Inference-optimal VLMs: grid, fit, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    store_help = "s3://bucket/prefix or a directory (default $TOKENSCALE_STORE or ./tokenscale-store)"

    class JoinRay(argparse.Action):
        """--address: the Ray to use, handed to init_ray as RAY_ADDRESS, as `ray job submit`
        hands it to its entrypoint (grid validation then skips the local node-size check)."""

        def __call__(self, parser, namespace, values, option_string=None):
            os.environ["RAY_ADDRESS"] = values
            setattr(namespace, self.dest, values)

    address = {
        "action": JoinRay, "metavar": "ADDRESS",
        "help": "the Ray cluster to join: its GCS host:port, or `auto` for the head `ray start` started on "
                "this machine (default: $RAY_ADDRESS, set by `ray job submit`; without either, a private "
                "local Ray that joins nothing)",
    }

    p = sub.add_parser("run", help="run a grid (what `ray job submit -- tokenscale run` runs)")
    p.add_argument("config", help="grid YAML")
    p.add_argument("--store", help=store_help)
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune progress output")
    p.add_argument("--address", **address)
    p.add_argument("--adaptive", action="store_true",
                   help="run the cells that settle which (LLM, V, compressor) is optimal first, and stop once it is settled")
    p.add_argument("--max-trials", type=int, metavar="K", help="--adaptive: stop after K cells even if not settled")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="validate a grid in full and list its trials, costs and what the store has (no Ray)")
    p.add_argument("grid", help="grid YAML, or a packaged grid name (demo, paper)")
    p.add_argument("--store", help=store_help)
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--adaptive", action="store_true", help="list only the first batch `run --adaptive` would start")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("schema", help="print the grid YAML's JSON Schema (for editors: see the README)")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("resume", help="finish a grid after the driver died or trials errored")
    p.add_argument("grid", help="grid name in the store")
    p.add_argument("--store", help=store_help)
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2], help="Tune progress output")
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("status", help="done / running / errored / pending per trial of a grid")
    p.add_argument("grid", help="grid name in the store")
    p.add_argument("--store", help=store_help)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("sql", help="DuckDB SQL over the store (views: results, laws, draws, heldout, curves)")
    p.add_argument("query", help='e.g. "select count(*) from results"')
    p.add_argument("--store", help=store_help)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--write", action="store_true", help="allow statements other than SELECT/EXPLAIN")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("fit", help="fit scaling laws for a grid, or for points in a CSV")
    p.add_argument("grid", nargs="?", help="grid name in the store")
    p.add_argument("--store", help=store_help)
    p.add_argument("--points", help="CSV with columns llm_params,visual_tokens,error")
    # --form and --loss are checked in cmd_fit against tokenscale.costs.FORMS and
    # fitting.law.LOSSES: importing those (numpy) here would slow every command down
    p.add_argument("--form", help="--points only: the law's form, product (default) or sum")
    p.add_argument("--loss", help="the fit's loss, squared (default) or huber; every bootstrap resample is refitted with it")
    p.add_argument("--n-column", choices=list(LAW_N_COLUMNS), default=LAW_N_COLUMNS[0],
                   help="GRID only: the results column the laws' N comes from (default llm_params, the paper's N)")
    p.add_argument("--text-tokens", type=float, default=0.0, help="query length Q for the optimal V (default 0: cached)")
    p.add_argument("--flops", type=float, help="budget for the sum form's optimal V (default: the largest point's cost)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("eval", help="score a grid's kept trials (train.keep_final) on eval sets added later, without training")
    p.add_argument("grid", help="grid name in the store")
    p.add_argument("--eval", required=True, metavar="EVALSETS.yaml",
                   help="YAML: {eval: [{name, task_family, path, image_folder, metric, prompt_suffix, ...}]}")
    p.add_argument("--store", help=store_help)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("replay", help="judge the adaptive grid on a complete table: the same decision from how few cells?")
    p.add_argument("--points", required=True,
                   help="CSV of the full table: llm_params,visual_tokens,error and optionally compressor")
    p.add_argument("--form", help="the law's form, product (default) or sum")
    p.add_argument("--text-tokens", type=float, nargs="+", metavar="Q",
                   help="query lengths of the decisions, and of optimal_visual_tokens (default: 0 50 100)")
    p.add_argument("--max-trials", type=int, help="stop after this many cells even if the decision is not settled")
    p.add_argument("--threshold", type=float,
                   help="the stopping rule: the top candidate's share of the bootstrap draws at every decision (default 0.95)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("report", help="one self-contained HTML page of a grid: figures, laws, /optimal, trials, curves")
    p.add_argument("grid", help="grid name in the store")
    p.add_argument("--store", help=store_help)
    p.add_argument("--out", metavar="FILE.html", help="where to write it (default: <store>/<grid>/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("serve", help="the Ray Serve API over the store's laws")
    p.add_argument("--store", help=store_help)
    p.add_argument("--grid", help="grid to serve (default: the most recently fitted)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--reload-seconds", type=float, default=5.0, help="how often to look for new laws")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas (each loads the store and polls it)")
    p.add_argument("--num-cpus", type=float, default=0.1, help="CPUs reserved per replica")
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="run the demo grid, fit, serve, ask /optimal once")
    p.add_argument("--config", default=DEMO_GRID, help=f"grid YAML or packaged grid name (default: {DEMO_GRID})")
    p.add_argument("--store", help=store_help)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--address", **address)
    p.set_defaults(func=cmd_demo)
    for command in sub.choices.values():  # a command's own usage for arguments it does not take
        command.set_defaults(command_parser=command)
    return parser


def _one_line(err: BaseException) -> str:
    """Every error is one line on stderr: a multi-line message has its lines joined."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    # GridError, FitError, BudgetError, ReadOnlyError are ValueErrors: caught without
    # importing their modules (which would cost every command torch/scipy imports).
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # exits 2 with the command's usage, as argparse does for its other errors
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.func(args)
    except (CLIError, ValueError) as err:
        print(f"tokenscale {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:
        print(f"tokenscale {args.command}: failed: {_one_line(err)}", file=sys.stderr)
        return 1
    except StoreError as err:  # not the user's input: the store did not answer
        print(f"tokenscale {args.command}: store error: {_one_line(err)}", file=sys.stderr)
        return EXIT_STORE
    except BrokenPipeError:  # `tokenscale plan demo | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
