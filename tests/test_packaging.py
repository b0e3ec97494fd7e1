"""A non-editable install works on its own: the grid YAMLs ship inside the package
(`tokenscale.configs`), so `tokenscale demo` and `tokenscale plan demo` find the demo grid
without the checkout.

Fast and offline: a fresh venv without pip, the package built from a copy of the sources
and installed `--no-deps --no-build-isolation --no-index` by this interpreter's pip; its
dependencies come from this interpreter's site-packages through a .pth line (a directory
named in a .pth is put on sys.path, but the .pth files inside it, such as an editable
install's finder, are not run, so the checkout stays out of reach). Everything runs from a
temporary directory with PYTHONPATH unset.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

# the demo grid: 4 LLMs x 4 visual-token budgets x 2 compressors x 1 seed
DEMO_TRIALS = 32
TRIAL_LINE = re.compile(r"\bqwen2-(xs|s|m|l)\b.*\b(avgpool|quecc)\b")
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    "tokenscale-store", "*.pyc",
)


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """(venv bin dir, environment, working dir) of a fresh non-editable install."""
    root = tmp_path_factory.mktemp("packaging")
    source, venv, work = root / "src", root / "venv", root / "work"
    shutil.copytree(REPO, source, ignore=SKIP)
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    # this interpreter's site dirs (its venv's, and any a .pth of it adds); the checkout is
    # not among them (an editable install's finder .pth in them is not run from here)
    ours = [
        p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path])
        if ("site-packages" in p or "dist-packages" in p) and Path(p).is_dir()
    ]
    Path(purelib, "_tokenscale_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["TOKENSCALE_STORE"] = str(root / "store")
    install = run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-build-isolation",
         "--no-index", str(source)],
        cwd=work, env=env,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return venv / "bin", env, work


def test_installed_package_is_the_venvs_not_the_checkout(installed):
    bin_dir, env, work = installed
    out = run(
        [str(bin_dir / "python"), "-c",
         "import tokenscale, tokenscale.cli; from tokenscale.configs import grid_path, packaged_grids; "
         "print(tokenscale.__file__); print(tokenscale.cli.__file__); print(grid_path('demo')); "
         "print(grid_path('demo.yaml')); print(','.join(packaged_grids()))"],
        cwd=work, env=env,
    )
    assert out.returncode == 0, out.stderr
    package, cli, demo, demo_yaml, grids = out.stdout.strip().splitlines()
    venv = bin_dir.parent.resolve()
    for path in (package, cli, demo, demo_yaml):
        assert Path(path).resolve().is_relative_to(venv), f"{path} is not inside the fresh venv {venv}"
        assert not Path(path).resolve().is_relative_to(REPO.resolve()), f"{path} comes from the checkout"
    assert Path(demo).name == "demo.yaml" and Path(demo).read_text() == (REPO / "configs" / "demo.yaml").read_text()
    assert demo == demo_yaml
    shipped = {p.name for p in Path(demo).parent.iterdir()}
    in_repo = {p.name for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".yml", ".json")}
    assert in_repo <= shipped, f"not shipped: {sorted(in_repo - shipped)}"  # the grids and the schema they name
    assert {"demo", "paper"} <= set(grids.split(","))


def test_installed_demo_help(installed):
    bin_dir, env, work = installed
    out = run([str(bin_dir / "tokenscale"), "demo", "--help"], cwd=work, env=env)
    assert out.returncode == 0, out.stderr
    assert "usage: tokenscale demo" in out.stdout and "demo" in out.stdout


def test_installed_plan_demo(installed):
    bin_dir, env, work = installed
    out = run([str(bin_dir / "tokenscale"), "plan", "demo"], cwd=work, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    trial_lines = [line for line in out.stdout.splitlines() if TRIAL_LINE.search(line)]
    assert len(trial_lines) == DEMO_TRIALS, out.stdout


def test_unknown_packaged_grid_is_a_one_line_error(installed):
    bin_dir, env, work = installed
    out = run([str(bin_dir / "tokenscale"), "plan", "no-such-grid"], cwd=work, env=env)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "demo" in lines[0] and "paper" in lines[0], out.stderr
