"""Store faults at the CLI and below it: a store that cannot be reached or refuses is one
line naming the store and the cause, exit status 3 (bad input is 2), never a traceback.

The store is a moto S3 server behind a loopback `TcpProxy`: stopping the proxy makes the
endpoint unreachable for every read and write (the data behind it stays), `refuse_writes`
drops every PUT mid-request while reads go through, and a bucket that does not exist is
an S3 error answer. Each command runs as its own process, as a user runs it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from conftest import TcpProxy, free_port, run_tokenscale_all, tiny_grid
from synthetic import write_synthetic_results

from tokenscale.store import Store, StoreError

GRID = "faults"
LLMS = {"xs": 1_000_000, "s": 4_000_000, "m": 16_000_000}
TOKENS = (1, 4, 16)
TRUTH = {("reasoning", "avgpool"): (0.6, 0.20, 0.08, 0.15)}
BENCHMARKS = {"reasoning": ["color", "digits"]}


def stop_proxy(proxy: TcpProxy) -> None:
    proxy.stop()


def run_all(commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess]:
    return run_tokenscale_all(commands, timeout=60)


def assert_store_error(out: subprocess.CompletedProcess, store: Store, *causes: str) -> str:
    command = out.args[0]
    assert out.returncode == 3, (out.args, out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, (out.args, out.stderr)
    line = lines[0]
    assert line.startswith(f"tokenscale {command}: store error: store {store.uri}"), line
    assert any(cause.lower() in line.lower() for cause in causes), line
    return line


@pytest.fixture
def proxied(s3_endpoint, tmp_path, monkeypatch):
    """An S3 store reached through a proxy (AWS_ENDPOINT_URL points at it) holding what
    every command reads: results, fitted laws and their draws, the grid as run. Yields
    (store, grid file, proxy, moto's endpoint)."""
    from tokenscale.fitting.grid_fit import fit_grid

    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    proxy.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = Store.open("s3://tokenscale/faults")
    grid = tiny_grid(GRID, llms=1, visual_tokens=(4,))
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(grid))
    store.put_bytes(store.join(GRID, "grid.yaml"), yaml.safe_dump(grid).encode())  # as `run` saves it
    write_synthetic_results(store, GRID, LLMS, TOKENS, TRUTH, BENCHMARKS)
    rows, _ = fit_grid(store, GRID, resamples=20)
    assert rows
    try:
        yield store, grid_file, proxy, s3_endpoint
    finally:
        stop_proxy(proxy)


def test_every_command_on_an_unreachable_store_exits_3_with_one_line(proxied):
    """The endpoint stops answering (connection refused): sql, fit, status, plan, resume,
    run and serve each say which store and why, on one line, exit 3, after the bounded
    retries, before any Ray starts."""
    from tokenscale.sql import query

    store, grid_file, proxy, _ = proxied
    assert query(store, "select count(*) from results")[1] == [(len(LLMS) * len(TOKENS) * 2,)]  # healthy first
    stop_proxy(proxy)
    commands = [
        ("sql", "select count(*) from results", "--store", store.uri),
        ("sql", "select * from laws", "--store", store.uri, "--format", "json"),
        ("fit", GRID, "--store", store.uri),
        ("status", GRID, "--store", store.uri),
        ("plan", str(grid_file), "--store", store.uri),
        ("resume", GRID, "--store", store.uri),
        ("run", str(grid_file), "--store", store.uri),
        ("serve", "--store", store.uri, "--grid", GRID, "--port", str(free_port())),
    ]
    outs = run_all(commands)
    for out in outs:
        line = assert_store_error(out, store, "could not connect")
        assert f"after {4} attempts" in line, line  # boto3's bounded retries, then the answer


def test_a_refusing_store_exits_3_naming_the_s3_error(s3_endpoint, tmp_path):
    """A store that answers with an error (its bucket does not exist) is the store's
    fault, not the input's: exit 3 with S3's own reason."""
    store = Store.open("s3://no-such-bucket/runs")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(tiny_grid(GRID, llms=1, visual_tokens=(4,))))
    outs = run_all([
        ("sql", "select count(*) from results", "--store", store.uri),
        ("fit", GRID, "--store", store.uri),
    ])
    for out in outs:
        line = assert_store_error(out, store, "NoSuchBucket")
        assert "attempts" not in line, line  # an answer, not an outage: nothing to retry


def test_fit_whose_writes_are_refused_exits_3_and_writes_nothing(proxied):
    """Reads go through, every PUT is cut mid-request: `fit` reads and fits, then fails
    its first write after the retries; the laws in the store are the old ones."""
    store, _, proxy, endpoint = proxied
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket, key = store.laws_key(GRID)[len("s3://"):].split("/", 1)
    before = client.head_object(Bucket=bucket, Key=key)["ETag"]
    proxy.refuse_writes = True
    (out,) = run_all([("fit", GRID, "--store", store.uri)])
    line = assert_store_error(out, store, "could not write")
    assert "attempts" in line and "nothing was written" in line, line
    assert proxy.refused >= 2, "the write was retried"
    assert client.head_object(Bucket=bucket, Key=key)["ETag"] == before


def test_sql_reads_that_fail_after_the_listing_are_store_errors(proxied, monkeypatch):
    """DuckDB's own S3 reads (httpfs) failing -- the store went down between the listing
    and the read -- are a StoreError naming the store, not an SQL error."""
    from tokenscale.sql import query

    store, _, proxy, _ = proxied
    listing = store.list(store.uri, ".parquet")
    monkeypatch.setattr(Store, "list", lambda self, prefix, suffix="": listing)
    stop_proxy(proxy)
    with pytest.raises(StoreError) as raised:
        query(store, "select count(*) from results")
    message = str(raised.value)
    assert message.startswith(f"store {store.uri}: could not read it through DuckDB") and "HTTP" in message, message
    assert "\n" not in message


def test_status_reads_of_tune_state_on_an_unreachable_store_are_store_errors(monkeypatch):
    """`status` reads Tune's experiment state through pyarrow's S3 filesystem: an endpoint
    that does not answer is a StoreError naming where, not an empty (all pending) state."""
    from tokenscale.orchestrator.status import tune_trial_states

    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StoreError, match=r"^store s3://tokenscale/g/tune: could not list Tune's experiment state: .*connect"):
        tune_trial_states("s3://tokenscale/g/tune")


def test_unreadable_objects_are_store_errors(tmp_path):
    """Locally too: an object that is not parquet, or one that is gone, is a StoreError
    naming the store and the object."""
    store = Store.open(str(tmp_path / "s"))
    key = store.laws_key("g")
    store.put_bytes(key, b"not parquet")
    with pytest.raises(StoreError, match=r"could not read .*laws\.parquet as parquet"):
        store.read_laws("g")
    with pytest.raises(StoreError, match=f"^store {store.uri}: could not read .*missing"):
        store.get_bytes(store.join("missing"))
    blocker = Path(store.uri) / "g" / "results"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where a folder belongs")
    with pytest.raises(StoreError, match=r"could not write .*nothing was written"):
        store.write_results("g", "avgpool", "abc", [{"grid": "g"}])
