"""The CLI starts fast: `--help`, `sql`, `status`, `plan` and `schema` import neither torch
nor Ray (each costs seconds). Each case runs `tokenscale.cli.main` in a fresh interpreter
and then lists what got imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_status import scenario, write_tune_dir

from tokenscale.orchestrator.status import TUNE_NAME
from tokenscale.store import Store

HEAVY = ("torch", "ray")
# what `sql` must not import either: each costs tens of ms, and `tokenscale sql` is meant to
# take at most 1.5x the time of the same query in plain DuckDB (benchmarks/bench_cli.py)
NUMERIC = ("numpy", "pyarrow", "scipy", "pandas")

PROBE = """
import json, sys
from tokenscale.cli import main
argv, prefixes = json.loads(sys.argv[1]), tuple(json.loads(sys.argv[2]))
try:
    rc = main(argv)
except SystemExit as exit:  # --help
    rc = exit.code
heavy = sorted(m for m in sys.modules if m.split(".")[0].startswith(prefixes))
print(json.dumps({"rc": rc, "heavy": heavy}), file=sys.stderr)
"""


def probe(argv: list[str], cwd: Path, heavy: tuple[str, ...] = HEAVY) -> tuple[int, list[str], str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(heavy)],
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )
    assert out.stderr.strip(), out.stdout
    report = json.loads(out.stderr.strip().splitlines()[-1])
    return report["rc"], report["heavy"], out.stdout + "\n".join(out.stderr.strip().splitlines()[:-1])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """A small store: a saved grid, one trial's result, Tune state files with running and
    errored trials."""
    root = tmp_path_factory.mktemp("cli-imports")
    store = Store.open(str(root / "store"))
    grid, entries, _ = scenario(store, "imports")
    tune_dir = Path(store.join(grid.name, TUNE_NAME))

    def write(rel: str, text: str) -> None:
        (tune_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (tune_dir / rel).write_text(text)

    write_tune_dir(write, entries)
    return store


CASES = {
    "help": ["--help"],
    "command-help": ["run", "--help"],
    "sql": ["sql", "select llm, visual_tokens, avg(score) from results group by all", "--format", "json"],
    "sql-laws": ["sql", "select count(*) from laws"],
    "status": ["status", "imports", "--format", "json"],
    "schema": ["schema"],
    "plan": ["plan", "demo"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_light_commands_import_neither_torch_nor_ray(case, store, tmp_path):
    argv = CASES[case]
    if argv[0] not in ("--help", "schema") and "--help" not in argv:
        argv = [*argv, "--store", store.uri]
    rc, heavy, output = probe(argv, tmp_path)
    assert rc == 0, output
    assert heavy == [], f"tokenscale {' '.join(argv)} imported {heavy[:10]}"


def test_every_subcommand_help_is_light(tmp_path):
    for command in ("run", "resume", "status", "sql", "fit", "serve", "demo", "plan", "schema"):
        rc, heavy, output = probe([command, "--help"], tmp_path)
        assert rc == 0 and f"usage: tokenscale {command}" in output, output
        assert heavy == [], f"tokenscale {command} --help imported {heavy[:10]}"


def test_sql_answers_from_the_store(store, tmp_path):
    rc, heavy, output = probe(["sql", "select llm, visual_tokens, score from results", "--format", "json", "--store", store.uri], tmp_path)
    assert rc == 0 and heavy == [], output
    rows = json.loads(output.strip().splitlines()[0])
    assert rows == [{"llm": "xs", "visual_tokens": 1, "score": 0.9}]


def test_sql_imports_duckdb_and_little_else(store, tmp_path):
    for argv in (["sql", "select count(*) from results"], ["sql", "select * from laws"], ["--help"]):
        if argv[0] == "sql":
            argv = [*argv, "--store", store.uri]
        rc, heavy, output = probe(argv, tmp_path, HEAVY + NUMERIC)
        assert rc == 0, output
        assert heavy == [], f"tokenscale {' '.join(argv)} imported {heavy[:10]}"


def test_errors_are_caught_without_their_modules(store, tmp_path):
    """main() reports a GridError / FitError / bad SQL as one line, exit 2, without having
    imported torch or Ray to know the error classes."""
    for argv in (
        ["status", "never-run", "--store", store.uri],
        ["sql", "drop table results", "--store", store.uri],
        ["plan", "no-such-grid", "--store", store.uri],
    ):
        rc, heavy, output = probe(argv, tmp_path)
        assert rc == 2, (argv, output)
        assert "error" in output and "Traceback" not in output, (argv, output)
        assert heavy == [], f"tokenscale {' '.join(argv)} imported {heavy[:10]}"
