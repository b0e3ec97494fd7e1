"""Fault tolerance for real: a Train worker killed mid-trial, the driver killed mid-grid
and `tokenscale resume`; each test starts and stops its own Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import yaml
from conftest import tiny_grid

from tokenscale.config import parse_grid
from tokenscale.orchestrator.driver import init_ray, run_grid
from tokenscale.orchestrator.status import grid_status
from tokenscale.sql import query
from tokenscale.store import Store

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _ours(proc: psutil.Process) -> bool:
    """A process started under this test process (not another Ray on the machine)."""
    try:
        return any(parent.pid == os.getpid() for parent in proc.parents())
    except psutil.Error:
        return False


def _find_process(marker: str) -> psutil.Process | None:
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if marker in cmdline and _ours(proc):
            return proc
    return None


def _checkpoint_steps(ray_dir: Path) -> dict[str, tuple[int, int]]:
    """The trial's checkpoints in Ray's storage (Train's `train/<trial>/checkpoint_*` or
    Tune's `tune/<trial>/checkpoint_*`), by folder: (stage, step) from their state.json."""
    found = {}
    for path in ray_dir.glob("*/*/checkpoint_*/state.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):  # being written, or deleted
            continue
        found[path.parent.name] = (state["stage"], state["step"])
    return found


_REFERENCE: dict[str, tuple[dict, list[dict]]] = {}  # config hash -> the unkilled run's (metrics, rows)


# The process that trains: a Ray Train worker (its group fails, which fails the Tune trial;
# Tune's retry starts a new group, which Train restores from its last checkpoint) or,
# in_trial, the Tune trial's own process (Tune retries the trial from its last checkpoint).
@pytest.mark.parametrize("execution, marker", [("workers", "RayTrainWorker"), ("in_trial", "ImplicitFunc")])
def test_killed_train_worker_resumes_at_its_checkpoint_step(tmp_path, execution, marker):
    from test_distributed import train_in_process, tune_trials

    every = 400  # checkpoints: stage 1's end, stage 2 at 400 and 800 (kill here), none at 1200 (the end)
    resume_step = 2 * every
    grid = parse_grid(tiny_grid(
        "killworker", llms=1, visual_tokens=(4,), max_failures=2,
        train={"zero_stage": 1, "micro_batch": 8, "stage1_steps": 2, "stage2_steps": 3 * every, "checkpoint_every": every},
        resources={"workers": 1, "cpus_per_worker": 1, "execution": execution},
    ))
    trial = grid.trials()[0]
    store = Store.open(str(tmp_path / "store"))
    ray_dir = tmp_path / "store" / "killworker"
    killed: list[int] = []

    def killer() -> None:
        # The event: stage 2's checkpoint at `resume_step` is in Ray's storage and Ray has
        # registered it as the trial's latest. Registering it, the third, deleted the first
        # (stage 1's end; 2 are kept), which happens only after the reporting worker handed
        # it over: a worker killed before that would resume from the step before. Then
        # `every` steps of training are left to kill it in.
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = set(_checkpoint_steps(ray_dir).values())
            if (2, resume_step) in steps and all(stage == 2 for stage, _ in steps):
                worker = _find_process(marker)
                if worker is not None:
                    worker.send_signal(signal.SIGKILL)
                    killed.append(worker.pid)
                return
            time.sleep(0.05)

    init_ray()
    try:
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        summary = run_grid(grid, store, verbose=0)
        thread.join(timeout=5)
    finally:
        ray.shutdown()
    assert killed, f"the training process ({marker}) was not found once step {resume_step}'s checkpoint was registered"
    assert summary.errored == 0 and summary.finished == 1, summary
    metrics = summary.trial_metrics[0]
    assert (metrics["resumed_from_stage"], metrics["resumed_from_step"]) == (2, resume_step)
    assert tune_trials(ray_dir / "tune")[trial.trial_id] == {"status": "TERMINATED", "num_failures": 1}, "one kill, one retry"
    _, rows = query(store, "select count(*), count(distinct config_hash) from results")
    assert rows == [(2, 1)]

    # The same trial unbroken, in this process (one worker, one thread, as the killed one):
    # the resumed run restarts from the exact fp32 weights, Adam moments, LR schedule and
    # RNG state, on the same examples (a function of the step), so the numbers are the same
    # bit for bit (as observed); rel 1e-6 leaves room for last-bit noise only, and the
    # scores (counts of exact answers) must be equal.
    if trial.config_hash not in _REFERENCE:
        reference = Store.open(str(tmp_path / "reference"))
        _REFERENCE[trial.config_hash] = (*train_in_process(trial, store=reference.uri),
                                         reference.read_curves("killworker").to_pylist())
    expected, expected_rows, expected_curve = _REFERENCE[trial.config_hash]
    for key in ("stage2_loss", "last_step_loss", "mean_score"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), key
    stored = store.read_results("killworker").to_pylist()
    assert sorted((r["benchmark"], r["score"]) for r in stored) == sorted((r["benchmark"], r["score"]) for r in expected_rows)
    # the training curve: every point once (those up to step 800 carried in its checkpoint,
    # the killed attempt's later ones reported again by the retry), as the unbroken run's
    curve = store.read_curves("killworker").to_pylist()
    steps = [(1, 2)] + [(2, step) for step in range(10, 3 * every + 1, 10)]  # train.report_every: 10
    assert [(r["stage"], r["step"]) for r in curve] == [(r["stage"], r["step"]) for r in expected_curve] == steps
    for got, want in zip(curve, expected_curve, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-12), (got["stage"], got["step"])


def test_driver_killed_then_resume_runs_only_missing_trials(s3_endpoint, tmp_path):
    """The production setting: results and Tune's own experiment state both on s3:// (the
    loopback endpoint). The driver dies mid-grid; `resume` restores Tune's experiment from
    S3 and runs only what is missing."""
    import boto3

    grid_file = tmp_path / "grid.yaml"
    # long enough trials (in-trial ones start in well under a second) to kill the driver between two
    grid_file.write_text(yaml.safe_dump(tiny_grid(
        "resumable", llms=2, visual_tokens=(1, 4), max_concurrent_trials=1,
        train={"zero_stage": 1, "micro_batch": 8, "stage1_steps": 2, "stage2_steps": 400},
    )))
    store_uri = "s3://tokenscale/resume-store"
    store = Store.open(store_uri)
    bucket = boto3.client("s3", endpoint_url=s3_endpoint)

    def tune_state_saved() -> bool:
        listing = bucket.list_objects_v2(Bucket="tokenscale", Prefix="resume-store/resumable/tune/experiment_state-")
        return listing.get("KeyCount", 0) > 0

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen(
        [str(BIN / "tokenscale"), "run", str(grid_file), "--store", store_uri, "--verbose", "0"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 300
        # the event: a first result is in the store and Tune has saved its experiment state
        while time.time() < deadline and not (store.read_results("resumable").num_rows and tune_state_saved()):
            assert driver.poll() is None, "the driver ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
        driver.wait(timeout=30)
    before = store.read_results("resumable")
    done_before = {h: t for h, t in zip(before["config_hash"].to_pylist(), before["finished_at"].to_pylist(), strict=True)}
    assert 1 <= len(done_before) < 4, "kill the driver mid-grid"

    statuses = grid_status(store, "resumable")
    assert len(statuses) == 4
    assert sum(s.status == "done" for s in statuses) == len(done_before)

    resume = subprocess.run(
        [str(BIN / "tokenscale"), "resume", "resumable", "--store", store_uri, "--verbose", "0"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert resume.returncode == 0, resume.stdout[-2000:] + resume.stderr[-3000:]
    assert "4/4 trials done" in resume.stdout
    # Tune's experiment was restored from S3, not run afresh (which would also finish the
    # grid: the store alone tells which trials are done)
    assert f"restored Tune's experiment from {store_uri}/resumable/tune" in resume.stdout
    _, rows = query(store, "select count(*), count(distinct config_hash) from results")
    assert rows == [(4 * 2, 4)], "every result exactly once"
    after = store.read_results("resumable")
    for config_hash, finished in zip(after["config_hash"].to_pylist(), after["finished_at"].to_pylist(), strict=True):
        if config_hash in done_before:
            assert finished == done_before[config_hash], "a finished trial must not run again"
    assert all(s.status == "done" for s in grid_status(store, "resumable"))


def test_store_down_during_write_errors_cleanly_then_resume_completes(s3_endpoint, tmp_path, monkeypatch):
    """The S3 endpoint fails every write: the trial's result write fails after bounded
    retries, the trial ends errored with a clear message and leaves nothing in the bucket;
    `resume` once the endpoint is healthy completes it."""
    import boto3
    from conftest import TcpProxy

    moto_port = int(s3_endpoint.rsplit(":", 1)[1])
    proxy = TcpProxy(moto_port)
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    grid = parse_grid(tiny_grid(
        "storedown", llms=1, visual_tokens=(4,), max_failures=0,
        train={"zero_stage": 1, "micro_batch": 8, "stage1_steps": 2, "stage2_steps": 300},
    ))
    store = Store.open("s3://tokenscale/flaky")
    ray_dir = str(tmp_path / "ray")

    init_ray()
    try:
        # the grid's own objects (grid.yaml) go through; then every PUT is cut mid-request
        from tokenscale.orchestrator.driver import save_grid

        save_grid(grid, store)
        proxy.refuse_writes = True
        summary = run_grid(grid, store, verbose=0, ray_storage_uri=ray_dir)
        assert summary.errored == 1, summary
        assert proxy.refused >= 2, "the write was retried"
        listing = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket="tokenscale", Prefix="flaky/storedown/results/")
        assert listing.get("KeyCount", 0) == 0, "nothing partial may reach the bucket"

        proxy.refuse_writes = False  # the endpoint is healthy again
        status = grid_status(store, "storedown", ray_storage_uri=ray_dir)
        assert [s.status for s in status] == ["errored"]
        assert "could not write" in status[0].error and "attempts" in status[0].error

        from tokenscale.orchestrator.driver import resume_grid

        resumed = resume_grid(store, "storedown", verbose=0, ray_storage_uri=ray_dir)
        assert resumed.errored == 0 and resumed.finished == 1, resumed
        _, rows = query(store, "select count(*), count(distinct config_hash) from results")
        assert rows == [(2, 1)]
    finally:
        ray.shutdown()
        proxy.stop()


def wandb_offline_run(path: Path) -> tuple[Any, dict, dict]:
    """(run record, config, summary) of an offline W&B run's `.wandb` log: since wandb-core
    (0.18+), offline runs write their config and summary nowhere else. The file is a
    LevelDB-style log (a 7-byte header, 32 KiB blocks of chunks: crc32, length, type; FULL=1,
    FIRST=2, MIDDLE=3, LAST=4) of W&B's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    run, config, summary, pos, pending = None, {}, {}, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        which = record.WhichOneof("record_type")
        if which == "run":
            run = record.run
        elif which == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif which == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return run, config, summary


def test_a_grown_grid_runs_only_its_new_cells(tmp_path, monkeypatch):
    """An LLM, a token budget added to the YAML: `run` starts only the new cells, and so does
    `resume` when the saved grid has cells its Tune experiment never had. The grown grid
    also gained a `tracking:` section (W&B offline, MLflow in a folder), which moves no
    config hash (the cells done stay done) and which `resume` follows, its restored Tuner
    included: each new trial is a run in both trackers, with its config and final metrics;
    nothing reaches a network."""
    from tokenscale.orchestrator import driver
    from tokenscale.orchestrator.driver import resume_grid, save_grid

    tracking = {
        "wandb": {"project": "tokenscale-test", "mode": "offline", "dir": str(tmp_path / "wandb")},
        "mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri()},
    }

    def grid(llms: int, visual_tokens: tuple[int, ...], **tracked):
        return parse_grid(tiny_grid("grows", llms=llms, visual_tokens=visual_tokens, max_concurrent_trials=1, **tracked))

    # W&B's server is a listener that counts who calls; telemetry and error reports off
    wandb_server = socket.create_server(("127.0.0.1", 0))
    wandb_server.settimeout(0)
    for key, value in {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
        "WANDB_DISABLE_CODE": "true", "WANDB_BASE_URL": f"http://127.0.0.1:{wandb_server.getsockname()[1]}",
        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
    }.items():
        monkeypatch.setenv(key, value)  # before Ray starts: its workers (W&B's logging actor) inherit them
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the driver sets it for a file:// URI
    store = Store.open(str(tmp_path / "store"))

    def finished_at() -> dict[str, object]:
        table = store.read_results("grows")
        return dict(zip(table["config_hash"].to_pylist(), table["finished_at"].to_pylist(), strict=True))

    init_ray()
    try:
        first = run_grid(grid(1, (1,)), store, verbose=0)
        assert (first.finished, first.errored) == (1, 0)
        before = finished_at()
        again = run_grid(grid(1, (1, 4)), store, verbose=0)  # a token budget more
        assert (again.already_done, again.finished, again.errored) == (1, 1, 0), again
        # the grid grows again (an LLM more), gains trackers, and the driver dies before Tune sees it
        save_grid(grid(2, (1, 4), tracking=tracking), store)
        restored_trackers, track = [], driver._track_as_saved

        def track_as_saved(tuner, callbacks):  # what the restored Tuner (pickled without trackers) runs with
            track(tuner, callbacks)
            restored_trackers.extend(type(c).__name__ for c in tuner._local_tuner.get_run_config().callbacks)

        monkeypatch.setattr(driver, "_track_as_saved", track_as_saved)
        resumed = resume_grid(store, "grows", verbose=0)
        assert resumed.restored_from, "Tune's experiment was restored first"
        assert restored_trackers == ["WandbLoggerCallback", "MLflowLoggerCallback"], "the restored Tuner tracks"
        assert (resumed.trials, resumed.already_done, resumed.finished, resumed.errored) == (4, 2, 2, 0), resumed
    finally:
        ray.shutdown()
    after = finished_at()
    assert len(after) == 4 and all(after[h] == t for h, t in before.items()), "a finished cell never runs again"
    _, rows = query(store, "select count(*), count(distinct config_hash) from results")
    assert rows == [(4 * 2, 4)]
    _, rows = query(store, "select config_hash, avg(score) from results group by 1")
    tracked = {t.config_hash for t in grid(2, (1, 4)).trials()} - {t.config_hash for t in grid(1, (1, 4)).trials()}
    mean_score = {h: score for h, score in rows if h in tracked}  # of the cells that ran under `tracking:`
    assert len(mean_score) == 2
    llms = {t.config_hash: t.llm.name for t in grid(2, (1, 4)).trials()}

    # MLflow: one finished run per trial, the trial's config as params, its final metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking["mlflow"]["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("grows").experiment_id])
    logged = {r.data.params["point/config_hash"]: r for r in runs}
    assert len(runs) == 2 and set(logged) == set(mean_score), [r.data.params.get("point/config_hash") for r in runs]
    for config_hash, run in logged.items():
        assert run.info.status == "FINISHED" and run.data.tags["tokenscale.grid"] == "grows"
        assert run.data.params["point/trial/llm/name"] == llms[config_hash]
        assert run.data.metrics["mean_score"] == pytest.approx(mean_score[config_hash])
        assert {"stage2_loss", "train_seconds"} <= set(run.data.metrics)

    # W&B offline: one run folder per trial, whose log (what `wandb sync` uploads) has the
    # trial's config and its final metrics in the run's summary
    folders = sorted((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2, folders
    summaries = {}
    for folder in folders:
        run, config, summary = wandb_offline_run(next(folder.glob("run-*.wandb")))
        assert (run.project, run.run_group, run.display_name) == ("tokenscale-test", "grows", config["point"]["trial_id"])
        summaries[config["point"]["config_hash"]] = summary
    assert set(summaries) == set(mean_score)
    for config_hash, summary in summaries.items():
        assert summary["mean_score"] == pytest.approx(mean_score[config_hash])
        assert {"stage2_loss", "train_seconds"} <= set(summary)
    try:
        wandb_server.accept()
        raise AssertionError("offline W&B called its server")
    except BlockingIOError:
        pass  # nobody called
    finally:
        wandb_server.close()


def test_adaptive_run_starts_space_filling_then_acquires_and_resume_continues_the_loop(tmp_path):
    """`run --adaptive`: the initial design (corners + centre of the LLM x V grid) as one
    batch, then cells chosen by the decision's uncertainty, ordinary trials in the store;
    `--max-trials` caps it, and `resume` goes on with the loop (the store is its memory)."""
    from tokenscale.fitting.adaptive import initial_design
    from tokenscale.orchestrator.adaptive import cells, run_adaptive_grid
    from tokenscale.orchestrator.driver import resume_grid

    grid = parse_grid(tiny_grid("adapt", llms=3, visual_tokens=(1, 4, 16), max_concurrent_trials=2))
    store = Store.open(str(tmp_path / "store"))
    table = cells(grid)
    assert len(table) == 9
    start = {t.trial_id for c in initial_design(list(table)) for t in table[c]}
    init_ray()
    try:
        first = run_adaptive_grid(grid, store, max_trials=5, verbose=0)
        assert (first.stopped, first.cells_run, len(first.batches)) == ("max_trials", 5, 1), first
        assert set(first.batches[0]) == start  # the corners and the centre
        resumed = resume_grid(store, "adapt", verbose=0)  # the saved cap: nothing more to run
        assert resumed.errored == 0 and "5/9 cells run" in resumed.line(), resumed.line()
        more = run_adaptive_grid(grid, store, max_trials=7, verbose=0)
    finally:
        ray.shutdown()
    assert (more.cells_run, len(more.batches), more.stopped) == (7, 1, "max_trials"), more
    assert not set(more.batches[0]) & start, "acquired cells, not the start again"
    assert set(more.p_optimal_min) == {"reasoning", "ocr"}
    _, rows = query(store, "select count(distinct config_hash) from results")
    assert rows == [(7,)]
