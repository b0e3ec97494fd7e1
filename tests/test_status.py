"""`tokenscale status` without Ray: the store says what is done, Tune's own experiment
state files (read directly, local or S3) say what is running, errored or pending.

The fast tests write state files shaped as Ray 2.60 writes them; the slow one runs a tiny
real Tune experiment and checks the reading against Ray's own ExperimentAnalysis (what
`status` used before).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from conftest import tiny_grid

from tokenscale.config import grid_to_dict, parse_grid
from tokenscale.orchestrator.status import GRID_FILE, TUNE_NAME, grid_status
from tokenscale.store import Store, result_row

ERROR_TEXT = (
    "Failure # 1 (occurred at 2026-01-01_00-00-00)\n"
    "\x1b[36mray::ImplicitFunc.train()\x1b[39m (pid=1, ip=127.0.0.1, repr=run_trial)\n"
    "  File \"driver.py\", line 1, in run_trial\n"
    "RuntimeError: an earlier failure\n"
    "Failure # 2 (occurred at 2026-01-01_00-01-00)\n"
    "  File \"store.py\", line 1, in put_bytes\n"
    "tokenscale.store.StoreWriteError: could not write s3://b/k after 4 attempts (boom); nothing was written\n\n"
)


def save_grid_yaml(store: Store, raw: dict):
    grid = parse_grid(raw)
    store.put_bytes(store.join(grid.name, GRID_FILE), yaml.safe_dump(grid_to_dict(grid), sort_keys=False).encode())
    return grid


def write_result(store: Store, trial) -> None:
    row = result_row(
        grid=trial.grid, trial_id=trial.trial_id, config_hash=trial.config_hash, llm=trial.llm.name,
        llm_params=1000, llm_params_non_embedding=900, visual_tokens=trial.visual_tokens,
        compressor=trial.compressor, compressor_params=10, compressor_flops=1.0, seed=trial.seed,
        benchmark="color", task_family="reasoning", score=0.9, error=0.1, chance=0.25, n_examples=32,
        text_tokens_mean=3.0, generated_tokens=1, inference_flops=2e4, train_seconds=1.0, eval_seconds=0.1,
        code_version="test", finished_at=datetime.now(timezone.utc),
    )
    store.write_results(trial.grid, trial.compressor, trial.config_hash, [row])


def tune_state(trials: list[tuple], stamp: str = "2026-01-01_00-00-00") -> tuple[str, str]:
    """(file name, text) of an experiment_state file as Ray 2.60's Tune writes it:
    `trials` = (trial, Tune status, error file name or None)."""
    data = []
    for i, (trial, status, error_file) in enumerate(trials):
        point = {"trial": trial.to_dict(), "config_hash": trial.config_hash, "trial_id": trial.trial_id, "resources": {"workers": 1}}
        name = trial.trial_id  # how the driver names Tune's trials and their directories
        config = {"point": point, "store": "unused", "ray_storage": "unused", "max_failures": 0}
        trial_json = {
            "stub": False, "trainable_name": "run_trial", "trial_id": f"abcde_{i:05d}",
            "storage": {"_type": "CLOUDPICKLE_FALLBACK", "value": "8005"}, "config": config,
            "_Trial__unresolved_config": config, "evaluated_params": {"point": point},
            "experiment_tag": f"{i}_point=...", "status": status, "relative_logdir": name if status != "PENDING" else None,
            "custom_trial_name": name, "custom_dirname": name, "max_failures": 0,
        }
        metadata = {
            "start_time": 1.0, "num_failures": int(error_file is not None), "num_failures_after_restore": 0,
            "error_filename": error_file, "pickled_error_filename": "error.pkl" if error_file else None,
            "last_result": {}, "last_result_time": float("-inf"), "metric_analysis": {},
        }
        data.append([json.dumps(trial_json, indent=2), json.dumps(metadata, indent=2)])
    state = {"trial_data": data, "runner_data": {"_iteration": 3}, "stats": {"start_time": 1.0}}
    return f"experiment_state-{stamp}.json", json.dumps(state, indent=2)


def write_tune_dir(write, trials: list[tuple]) -> None:
    """Tune's experiment dir through `write(relative path, text)`: an older state file
    (everything pending), the newest one, and error.txt for the errored trials that have one."""
    older = [(t, "PENDING", None) for t, _, _ in trials]
    for stamp, entries in (("2026-01-01_00-00-00", older), ("2026-01-02_00-00-00", trials)):
        name, text = tune_state(entries, stamp)
        write(name, text)
    write("tuner.pkl", "")
    for trial, status, error_file in trials:
        if error_file and status == "ERROR" and trial.visual_tokens == 1:  # one errored trial lost its file
            write(f"{trial.trial_id}/{error_file}", ERROR_TEXT)


def scenario(store: Store, grid_name: str = "statusgrid"):
    """Six trials: done, running, errored (with a message), errored (its file gone),
    finished in Tune but no result in the store, never seen by Tune."""
    grid = save_grid_yaml(store, tiny_grid(grid_name, llms=3, visual_tokens=(1, 16)))
    t = grid.trials()
    assert len(t) == 6
    by = {(x.llm.name, x.visual_tokens): x for x in t}
    write_result(store, by["xs", 1])
    entries = [
        (by["xs", 1], "TERMINATED", None),
        (by["xs", 16], "RUNNING", None),
        (by["s", 1], "ERROR", "error.txt"),
        (by["s", 16], "ERROR", "error.txt"),
        (by["m", 1], "TERMINATED", None),
    ]
    expected = {
        by["xs", 1].config_hash: ("done", ""),
        by["xs", 16].config_hash: ("running", ""),
        by["s", 1].config_hash: ("errored", ERROR_TEXT.strip().splitlines()[-1]),
        by["s", 16].config_hash: ("errored", "errored (no message recorded)"),
        by["m", 1].config_hash: ("pending", ""),
        by["m", 16].config_hash: ("pending", ""),
    }
    return grid, entries, expected


def check(rows, grid, expected) -> None:
    assert [r.name for r in rows] == [t.trial_id for t in grid.trials()]
    got = {t.config_hash: (r.status, r.error) for t, r in zip(grid.trials(), rows, strict=True)}
    assert got == expected
    for t, r in zip(grid.trials(), rows, strict=True):
        assert (r.llm, r.visual_tokens, r.compressor, r.seed) == (t.llm.name, t.visual_tokens, t.compressor, t.seed)


def write_local_tune_dir(store: Store, grid, entries) -> Path:
    """The scenario's Tune state under the store's own `<grid>/tune/`."""
    tune_dir = Path(store.join(grid.name, TUNE_NAME))

    def write(rel: str, text: str) -> None:
        (tune_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (tune_dir / rel).write_text(text)

    write_tune_dir(write, entries)
    return tune_dir


def test_status_reads_local_tune_state(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    grid, entries, expected = scenario(store)
    tune_dir = write_local_tune_dir(store, grid, entries)
    check(grid_status(store, grid.name), grid, expected)

    # the Ray storage elsewhere (run_grid's ray_storage_uri): the store's own tune/ is not read
    elsewhere = tmp_path / "ray"
    (elsewhere / TUNE_NAME).mkdir(parents=True)
    only_store = {h: (s, e) if s == "done" else ("pending", "") for h, (s, e) in expected.items()}
    check(grid_status(store, grid.name, ray_storage_uri=str(elsewhere)), grid, only_store)

    # an unreadable newest state file (cut short) falls back to the one before it
    newest = sorted(tune_dir.glob("experiment_state-*.json"))[-1]
    newest.write_text(newest.read_text()[:100])
    check(grid_status(store, grid.name), grid, only_store)


def test_status_command_output(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    grid, entries, expected = scenario(store)
    write_local_tune_dir(store, grid, entries)
    cmd = [sys.executable, "-m", "tokenscale.cli", "status", grid.name, "--store", store.uri]
    out = subprocess.run([*cmd, "--format", "json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["trial"] for r in rows] == [t.trial_id for t in grid.trials()]
    assert {t.config_hash: (r["status"], r["error"]) for t, r in zip(grid.trials(), rows, strict=True)} == expected
    assert set(rows[0]) == {"trial", "llm", "V", "compressor", "seed", "status", "progress", "eta", "error",
                            "stage", "step", "steps", "eta_seconds"}
    running = {r["status"]: r for r in rows}["running"]  # no result.json: no report seen yet
    assert (running["progress"], running["eta"], running["step"]) == ("?", "?", None)
    assert {r["status"]: r for r in rows}["done"]["progress"] == ""
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert table.stdout.strip().splitlines()[-1] == "1 done, 1 running, 2 errored, 2 pending"
    assert table.stdout.splitlines()[0].split() == ["trial", "llm", "V", "compressor", "seed", "status", "progress", "eta", "error"]
    missing = subprocess.run([*cmd[:3], "status", "never-run", "--store", store.uri], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "never run" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1


def progress_lines(*reports: tuple, **extra) -> str:
    """result.json lines as Tune writes them: each report's metrics + Tune's own keys.
    A report: (stage, step, elapsed_seconds), or (stage, step, "checkpoint")."""
    lines = []
    for i, (stage, step, elapsed) in enumerate(reports):
        if elapsed == "checkpoint":
            metrics = {"stage": stage, "step": step, "checkpoint": f"stage{stage}-step{step}"}
        else:
            metrics = {"stage": stage, "step": step, "steps": 30 if stage == 1 else 150, "loss": 1.0 / (1 + step),
                       "elapsed_seconds": float(elapsed)}
        lines.append(json.dumps({**metrics, "training_iteration": i + 1, "time_this_iter_s": 1.0,
                                 "config": {"point": {"trial": {}}}, **extra}))
    return "\n".join(lines) + "\n"


def test_status_shows_a_running_trials_stage_step_and_eta(tmp_path):
    """Running trials: stage and step / steps from the last progress report in their
    result.json (Tune's, under the experiment directory), the ETA from the recent step rate
    of the latest attempt and the steps left (this stage's, then stage 2's from the grid)."""
    import time

    from tokenscale.orchestrator.status import eta_seconds, format_duration

    store = Store.open(str(tmp_path / "store"))
    grid = save_grid_yaml(store, tiny_grid("progress", llms=1, visual_tokens=(1, 4, 16),
                                           train={"micro_batch": 8, "stage1_steps": 30, "stage2_steps": 150}))
    retried, stage1, first = grid.trials()
    tune_dir = write_local_tune_dir(store, grid, [(t, "RUNNING", None) for t in grid.trials()])
    for t in grid.trials():
        (tune_dir / t.trial_id).mkdir()
    stamp = int(time.time()) - 60  # Tune's `timestamp` of the last report: a minute ago
    # a retried trial: attempt 1 reached stage 2 step 10; attempt 2 (resumed at stage 1's end,
    # its clock from 0 again) runs stage 2 at 0.5 steps/s
    (tune_dir / retried.trial_id / "result.json").write_text(
        progress_lines((1, 10, 10), (1, 20, 20), (1, 30, 30), (1, 30, "checkpoint"), (2, 10, 35))
        + progress_lines((2, 10, 20), (2, 20, 40), (2, 30, 60), timestamp=stamp)
    )
    # in stage 1 at 1 step/s: 10 steps of it and stage 2's 150 left
    (tune_dir / stage1.trial_id / "result.json").write_text(progress_lines((1, 10, 12), (1, 20, 22)))
    # no result.json yet; the state file's last_result is a progress report: stage and step, no rate
    newest = sorted(tune_dir.glob("experiment_state-*.json"))[-1]
    state = json.loads(newest.read_text())
    for pair in state["trial_data"]:
        if json.loads(pair[0])["custom_trial_name"] == first.trial_id:
            metadata = json.loads(pair[1])
            metadata["last_result"] = {"stage": 1, "step": 10, "steps": 30, "loss": 0.5, "elapsed_seconds": 9.0}
            pair[1] = json.dumps(metadata)
    newest.write_text(json.dumps(state))

    rows = {r.name: r for r in grid_status(store, grid.name)}
    got = rows[retried.trial_id]
    assert (got.status, got.progress, got.stage, got.step, got.steps) == ("running", "stage 2 30/150", 2, 30, 150)
    assert got.eta_seconds == pytest.approx(120 / 0.5 - 60, abs=2)  # less the minute since that report
    got = rows[stage1.trial_id]
    assert (got.progress, got.eta_seconds, got.eta) == ("stage 1 20/30", pytest.approx(160.0), "2m40s")
    got = rows[first.trial_id]
    assert (got.progress, got.eta, got.eta_seconds) == ("stage 1 10/30", "?", None)

    # the rate is the latest attempt's (attempt 1's stage-2 report is not in it), within its stage
    reports = [json.loads(line) for line in progress_lines((1, 30, 30), (2, 10, 35), (2, 10, 20), (2, 20, 40)).splitlines()]
    assert eta_seconds(reports, retried) == pytest.approx(130 / 0.5)
    assert eta_seconds(reports[:3], retried) is None  # one report of the latest attempt: no rate
    assert [format_duration(s) for s in (None, 45, 100, 7500, 90000)] == ["?", "45s", "1m40s", "2h05m", "1d01h"]


def test_status_reads_s3_tune_state(s3_endpoint):
    import boto3

    store = Store.open("s3://tokenscale/statusprefix")
    grid, entries, expected = scenario(store, "s3grid")
    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def write(rel: str, text: str) -> None:
        client.put_object(Bucket="tokenscale", Key=f"statusprefix/{grid.name}/{TUNE_NAME}/{rel}", Body=text.encode())

    write_tune_dir(write, entries)
    running = entries[1][0]
    write(f"{running.trial_id}/result.json", progress_lines((1, 1, 1.0), (1, 2, 3.0)))  # a ranged read on S3
    rows = grid_status(store, grid.name)
    check(rows, grid, expected)
    got = next(r for r in rows if r.name == running.trial_id)
    assert (got.progress, got.eta_seconds) == ("stage 1 2/30", pytest.approx(2.0 * (28 + 4)))


@pytest.mark.slow
def test_status_matches_ray_experiment_analysis(tmp_path):
    """A real Tune experiment (Ray 2.60's files): one trial reports, one raises, one
    reports but writes no result, one never runs. Status reads them as Ray's own
    ExperimentAnalysis does, and says done / errored / pending accordingly. While the third
    runs, status shows the stage and step of its last progress report (Tune uploads the
    trial's result.json with its experiment state, every 10 s)."""
    import threading
    import time

    import ray
    from ray import tune

    store = Store.open(str(tmp_path / "store"))
    grid = save_grid_yaml(store, tiny_grid("realtune", llms=2, visual_tokens=(1, 16)))
    trials = grid.trials()
    done, bad, no_result, never = trials
    write_result(store, done)
    message = "could not write the result after 4 attempts"

    seen_running = tmp_path / "seen-running"
    running_rows: list = []

    def trainable(config):
        if config["point"]["config_hash"] == bad.config_hash:
            raise RuntimeError(f"first line\n{message}")
        if config["point"]["config_hash"] == no_result.config_hash:
            for step in (1, 2):  # progress reports as workers/train.py's Curve makes them
                tune.report({"stage": 2, "step": step, "steps": 4, "loss": 1.0, "elapsed_seconds": float(step)})
            deadline = time.time() + 60
            while not os.path.exists(seen_running) and time.time() < deadline:  # until status has seen it
                time.sleep(0.2)
        tune.report({"mean_score": 1.0})

    def watch() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not running_rows:
            row = {r.name: r for r in grid_status(store, grid.name)}[no_result.trial_id]
            if row.status == "running" and row.progress == "stage 2 2/4":
                running_rows.append(row)
            time.sleep(0.5)
        seen_running.write_text("")

    def name(trial):  # as the driver names them
        return trial.config["point"]["trial_id"]

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search([
                {"trial": t.to_dict(), "config_hash": t.config_hash, "trial_id": t.trial_id} for t in (done, bad, no_result)
            ])},
            tune_config=tune.TuneConfig(trial_name_creator=name, trial_dirname_creator=name),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=store.join(grid.name), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        ).fit()
        analysis = tune.ExperimentAnalysis(store.join(grid.name, TUNE_NAME))
        by_ray = {t.config["point"]["config_hash"]: (t.status, t.get_error()) for t in analysis.trials}
    finally:
        ray.shutdown()
    watcher.join(timeout=5)
    assert running_rows, "status never showed the running trial's progress"
    assert running_rows[0].eta_seconds is not None and running_rows[0].eta_seconds <= 2.0  # 2 steps left at 1 step/s
    assert by_ray[bad.config_hash][0] == "ERROR" and by_ray[done.config_hash][0] == "TERMINATED"
    ray_error = [line.strip() for line in by_ray[bad.config_hash][1].splitlines() if line.strip()][-1]
    assert ray_error == message
    rows = grid_status(store, grid.name)
    assert {t.config_hash: (r.status, r.error) for t, r in zip(trials, rows, strict=True)} == {
        done.config_hash: ("done", ""),
        bad.config_hash: ("errored", message),
        no_result.config_hash: ("pending", ""),
        never.config_hash: ("pending", ""),
    }
