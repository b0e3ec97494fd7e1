"""Where a grid stands, without Ray: `tokenscale status` reads the store and Tune's own
experiment state files directly (through pyarrow's filesystem, local or S3), so it starts
in a fraction of a second and works where Ray is not even installed.

Also home of the grid's state in the store that the driver shares with `status`: the grid
as run (`<store>/<grid>/grid.yaml`), Tune's experiment directory (`<store>/<grid>/tune/`)
and how Ray reaches it (`ray_storage`).

What Tune (Ray 2.60) writes under the experiment directory, and what is read here:

    experiment_state-<timestamp>.json   {"trial_data": [[trial_json, run_metadata_json], ...]}
                                        trial_json: "config" (our param space, with
                                        config["point"]["config_hash"]), "status"
                                        (PENDING / RUNNING / PAUSED / TERMINATED / ERROR),
                                        "relative_logdir" (the trial's directory);
                                        run_metadata_json: "error_filename" (error.txt),
                                        "last_result" (the latest report only)
    <trial dir>/error.txt                the trial's tracebacks, appended per failure
    <trial dir>/result.json              one JSON line per report the trial made, all
                                         attempts (a retry restores it and appends)
    <trial dir>/params.json, error.pkl, ...   (not read)

The newest state file (by name, as Tune's ExperimentAnalysis picks it) wins.

A running trial's progress: every `train.report_every` optimizer steps the trial reports
{stage, step, steps, loss, elapsed_seconds} (workers/train.py's Curve). Tune's driver writes
both the state file (whose `last_result` holds only the latest report, which may be a
checkpoint's) and result.json into its local staging directory and uploads them together
to the experiment directory, when it saves its experiment state: every 10 s
(TuneController.checkpoint; Tune stretches the period to 19 x the time a save takes, so on a
slow store it is longer), plus whatever the upload takes. So what `status` shows is up to
that old (measured locally: a new step every 10 s), and the state file adds nothing fresher
than result.json. `status` reads the tail of a running trial's result.json (the state
file's `last_result` when there is none yet): the last progress report gives stage and
step, the last few of the same attempt the recent step rate (Δstep / Δelapsed_seconds),
and the ETA is the trial's remaining optimizer steps (the rest of this stage, then the
later stages' as the grid fixes them) at that rate, less the time since that report.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from tokenscale.config import Grid, GridError, TrialConfig, parse_grid, planned_stage_steps
from tokenscale.store import Store, StoreError, one_line, s3_endpoint

GRID_FILE = "grid.yaml"
TUNE_NAME = "tune"
STATE_FILES = "experiment_state-*.json"
RESULT_FILE = "result.json"
RESULT_TAIL_BYTES = 256 * 1024  # of a running trial's result.json: its last reports (each ~3 KB with the config)
PROGRESS_KEYS = ("stage", "step", "steps", "elapsed_seconds")  # of a progress report (CURVE_COLUMNS' names)
RATE_POINTS = 5  # the step rate is measured over the last reports (at most this many) of one attempt


def ray_storage(path: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: S3 through pyarrow with the
    endpoint from the AWS environment, or a local directory (created)."""
    if not path.startswith("s3://"):
        os.makedirs(path, exist_ok=True)
        return path, None
    from pyarrow import fs

    endpoint = s3_endpoint()
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint_override"] = endpoint
        options["scheme"] = "https" if endpoint.startswith("https") else "http"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return path[len("s3://") :], fs.S3FileSystem(**options)


def load_saved_grid(store: Store, name: str) -> Grid:
    """The grid as `tokenscale run` saved it beside its results."""
    key = store.join(name, GRID_FILE)
    if not store.exists(key):
        raise GridError(f"grid {name!r} was never run with store {store.uri} (no {key}); start it with `tokenscale run`")
    return parse_grid(yaml.safe_load(store.get_bytes(key)), key)


@dataclass
class TrialStatus:
    name: str
    llm: str
    visual_tokens: int
    compressor: str
    seed: int
    status: str  # done | running | errored | pending
    error: str = ""
    progress: str = ""  # a running trial's "stage 2 120/150" ("?" before its first report)
    eta: str = ""  # a running trial's time left, "1m40s" ("?" when unknown)
    stage: int | None = None
    step: int | None = None
    steps: int | None = None  # the stage's optimizer steps
    eta_seconds: float | None = None


@dataclass
class TuneTrial:
    """What Tune recorded of a trial: its status, its last error line, and (running) its
    latest progress reports from result.json, oldest first."""

    status: str
    error: str = ""
    reports: list[dict[str, Any]] = field(default_factory=list)


def _filesystem(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path on it) for a local directory or s3://bucket/prefix,
    creating nothing."""
    if path.startswith("s3://"):
        fs_path, filesystem = ray_storage(path)
        return filesystem, fs_path.rstrip("/")
    from pyarrow import fs

    return fs.LocalFileSystem(), os.path.abspath(path)


def _read_text(filesystem: Any, path: str) -> str:
    with filesystem.open_input_stream(path) as stream:
        return stream.readall().decode("utf-8", errors="replace")


def _last_error_line(text: str | None) -> str:
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "errored (no message recorded)"


def _trial_error(filesystem: Any, experiment: str, trial: dict[str, Any], metadata: dict[str, Any]) -> str:
    folder = trial.get("relative_logdir") or trial.get("custom_dirname")
    filename = metadata.get("error_filename")
    text = ""
    if folder and filename:
        try:
            text = _read_text(filesystem, f"{experiment}/{folder}/{filename}")
        except Exception:  # the error file may live on a node that is gone
            text = ""
    return _last_error_line(text)


def _is_progress(report: Any) -> bool:
    """A progress report: a mapping with a number (not a bool) at each of PROGRESS_KEYS."""
    return isinstance(report, dict) and all(
        isinstance(report.get(k), (int, float)) and not isinstance(report.get(k), bool) for k in PROGRESS_KEYS
    )


def _progress_reports(filesystem: Any, path: str) -> list[dict[str, Any]]:
    """The progress reports (PROGRESS_KEYS numbers) among the last RESULT_TAIL_BYTES of a
    result.json, oldest first; [] when it is not there (yet) or cannot be read: the trial's
    status still stands without them."""
    try:
        with filesystem.open_input_file(path) as f:
            size = f.size()
            start = max(0, size - RESULT_TAIL_BYTES)
            data = f.read_at(size - start, start)
    except Exception:  # missing, not uploaded yet, or the store hiccuped: progress unknown
        return []
    lines = bytes(data).decode("utf-8", errors="replace").splitlines()
    if start > 0:
        lines = lines[1:]  # cut by the tail
    reports = []
    for line in lines:
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if _is_progress(report):
            reports.append(report)
    return reports


def _store_error(path: str, action: str, err: BaseException) -> StoreError:
    """A pyarrow filesystem error reading Tune's state at `path` as a one-line StoreError
    naming where and why (pyarrow's S3 client has retried it by then)."""
    return StoreError(f"store {path}: could not {action}: {one_line(err)}")


def tune_trial_states(path: str) -> dict[str, TuneTrial]:
    """config_hash -> TuneTrial (Tune's status, last error line, a running trial's latest
    progress reports) for every trial of the Tune experiment at `path` (local directory or
    s3://...); {} when Tune never wrote state; StoreError when the state cannot be listed
    or read."""
    from pyarrow import fs

    filesystem, experiment = _filesystem(path)
    try:
        infos = filesystem.get_file_info(fs.FileSelector(experiment, allow_not_found=True))
    except FileNotFoundError:
        return {}
    except OSError as err:
        if "NO_SUCH_BUCKET" in str(err):  # a bucket that does not exist yet: Tune never wrote
            return {}
        raise _store_error(path, "list Tune's experiment state", err) from None
    names = sorted((i.base_name for i in infos if i.is_file and fnmatch.fnmatch(i.base_name, STATE_FILES)), reverse=True)
    for name in names:  # the newest; an unreadable one (cut short) falls back to the one before
        try:
            state = json.loads(_read_text(filesystem, f"{experiment}/{name}"))
            entries = [(json.loads(trial), json.loads(metadata)) for trial, metadata in state["trial_data"]]
        except FileNotFoundError:  # replaced by a newer one since the listing
            continue
        except OSError as err:  # the store, not the file: say so instead of guessing from an older one
            raise _store_error(path, f"read {name}", err) from None
        except (ValueError, KeyError, TypeError):
            continue
        found: dict[str, TuneTrial] = {}
        for trial, metadata in entries:
            point = (trial.get("config") or {}).get("point") or {}
            config_hash = point.get("config_hash") if isinstance(point, dict) else None
            if not config_hash:
                continue
            status = trial.get("status") or "PENDING"
            error = _trial_error(filesystem, experiment, trial, metadata) if status == "ERROR" else ""
            reports: list[dict[str, Any]] = []
            folder = trial.get("relative_logdir") or trial.get("custom_dirname")
            if status == "RUNNING" and folder:
                reports = _progress_reports(filesystem, f"{experiment}/{folder}/{RESULT_FILE}")
            last = metadata.get("last_result")
            if status == "RUNNING" and not reports and _is_progress(last):
                reports = [last]  # no result.json (yet): the state file's latest report
            found[config_hash] = TuneTrial(status, error, reports)
        return found
    return {}


def _position(report: dict[str, Any], trial: TrialConfig) -> float | None:
    """Optimizer steps the trial has done at `report`, over both stages."""
    if int(report["stage"]) == 1:
        return float(report["step"])
    first = planned_stage_steps(trial, 1)
    return None if first is None else float(first + report["step"])


def step_rate(reports: list[dict[str, Any]], trial: TrialConfig) -> float | None:
    """Optimizer steps per second over the last RATE_POINTS progress reports of the latest
    attempt (a retry's clock starts again: elapsed_seconds goes down), within the latest
    report's stage when it has two there (stage 2 trains the LM too: slower than stage 1);
    None with fewer than two."""
    attempt = reports[-1:]
    for report in reversed(reports[:-1]):
        if report["elapsed_seconds"] >= attempt[0]["elapsed_seconds"] or len(attempt) == RATE_POINTS:
            break
        attempt.insert(0, report)
    same_stage = [r for r in attempt if r["stage"] == attempt[-1]["stage"]]
    window = same_stage if len(same_stage) >= 2 else attempt
    if len(window) < 2:
        return None
    start, end = _position(window[0], trial), _position(window[-1], trial)
    seconds = window[-1]["elapsed_seconds"] - window[0]["elapsed_seconds"]
    if start is None or end is None or end <= start or seconds <= 0:
        return None
    return (end - start) / seconds


def eta_seconds(reports: list[dict[str, Any]], trial: TrialConfig, now: float | None = None) -> float | None:
    """Seconds until the trial's last optimizer step: its remaining steps (the rest of the
    latest report's stage, then stage 2's as the grid fixes them) at the recent step rate,
    less the time since that report (Tune's `timestamp`, whole seconds); None when unknown.
    Evaluation after the last step is not counted."""
    if not reports:
        return None
    last, rate = reports[-1], step_rate(reports, trial)
    remaining: float | None = float(last["steps"] - last["step"])
    if int(last["stage"]) == 1:
        second = planned_stage_steps(trial, 2)
        remaining = None if second is None else remaining + second
    if rate is None or remaining is None:
        return None
    eta = remaining / rate
    stamp = last.get("timestamp")
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool):
        eta -= max(0.0, (time.time() if now is None else now) - stamp)
    return max(0.0, eta)


def format_duration(seconds: float | None) -> str:
    """1m40s, 2h05m, 3d04h, 45s; "?" for None."""
    if seconds is None:
        return "?"
    total = int(round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def saved_grid_status(store: Store, name: str) -> list[TrialStatus] | None:
    """`grid_status`, or None for a grid that `tokenscale run` never saved in this store
    (its results written by other means): the report page then lists the trials it has
    results of. A store that cannot be read is still a StoreError."""
    try:
        return grid_status(store, name)
    except GridError:
        return None


def grid_status(store: Store, name: str, ray_storage_uri: str | None = None) -> list[TrialStatus]:
    """Per trial: done (its result is in the store), else what Tune last recorded: running
    (with its stage, step / steps and ETA from its progress reports), errored (with the
    error's last line) or pending."""
    grid = load_saved_grid(store, name)
    ray_root = (ray_storage_uri or store.join(grid.name)).rstrip("/")
    tune_state = tune_trial_states(f"{ray_root}/{TUNE_NAME}")
    in_store = set(store.list(store.join(grid.name, "results"), ".parquet"))  # one listing, not a HEAD per trial
    now = time.time()
    rows = []
    for t in grid.trials():
        tune = tune_state.get(t.config_hash, TuneTrial("PENDING"))
        row = TrialStatus(t.trial_id, t.llm.name, t.visual_tokens, t.compressor, t.seed, "pending")
        if store.result_key(t.grid, t.compressor, t.config_hash) in in_store:
            row.status = "done"
        else:
            row.status = {"RUNNING": "running", "ERROR": "errored"}.get(tune.status, "pending")
            row.error = tune.error if row.status == "errored" else ""
        if row.status == "running":
            row.progress, row.eta = "?", "?"
            if tune.reports:
                last = tune.reports[-1]
                row.stage, row.step, row.steps = int(last["stage"]), int(last["step"]), int(last["steps"])
                row.progress = f"stage {row.stage} {row.step}/{row.steps}"
                row.eta_seconds = eta_seconds(tune.reports, t, now)
                row.eta = format_duration(row.eta_seconds)
        rows.append(row)
    return rows
