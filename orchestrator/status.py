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
                                        run_metadata_json: "error_filename" (error.txt)
    <trial dir>/error.txt                the trial's tracebacks, appended per failure
    <trial dir>/result.json, params.json, error.pkl, ...   (not read)

The newest state file (by name, as Tune's ExperimentAnalysis picks it) wins.
"""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Any

import yaml

from tokenscale.config import Grid, GridError, parse_grid
from tokenscale.store import Store, StoreError, one_line, s3_endpoint

GRID_FILE = "grid.yaml"
TUNE_NAME = "tune"
STATE_FILES = "experiment_state-*.json"


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


def _store_error(path: str, action: str, err: BaseException) -> StoreError:
    """A pyarrow filesystem error reading Tune's state at `path` as a one-line StoreError
    naming where and why (pyarrow's S3 client has retried it by then)."""
    return StoreError(f"store {path}: could not {action}: {one_line(err)}")


def tune_trial_states(path: str) -> dict[str, tuple[str, str]]:
    """config_hash -> (Tune's status, last error line) for every trial of the Tune
    experiment at `path` (local directory or s3://...); {} when Tune never wrote state;
    StoreError when the state cannot be listed or read."""
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
        found: dict[str, tuple[str, str]] = {}
        for trial, metadata in entries:
            point = (trial.get("config") or {}).get("point") or {}
            config_hash = point.get("config_hash") if isinstance(point, dict) else None
            if not config_hash:
                continue
            status = trial.get("status") or "PENDING"
            error = _trial_error(filesystem, experiment, trial, metadata) if status == "ERROR" else ""
            found[config_hash] = (status, error)
        return found
    return {}


def grid_status(store: Store, name: str, ray_storage_uri: str | None = None) -> list[TrialStatus]:
    """Per trial: done (its result is in the store), else what Tune last recorded: running,
    errored (with the error's last line) or pending."""
    grid = load_saved_grid(store, name)
    ray_root = (ray_storage_uri or store.join(grid.name)).rstrip("/")
    tune_state = tune_trial_states(f"{ray_root}/{TUNE_NAME}")
    in_store = set(store.list(store.join(grid.name, "results"), ".parquet"))  # one listing, not a HEAD per trial
    rows = []
    for t in grid.trials():
        state, error = tune_state.get(t.config_hash, ("PENDING", ""))
        if store.result_key(t.grid, t.compressor, t.config_hash) in in_store:
            status, error = "done", ""
        else:
            status = {"RUNNING": "running", "ERROR": "errored"}.get(state, "pending")
            error = error if status == "errored" else ""
        rows.append(TrialStatus(t.trial_id, t.llm.name, t.visual_tokens, t.compressor, t.seed, status, error))
    return rows
