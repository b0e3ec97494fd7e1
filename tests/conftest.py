"""Shared fixtures: a loopback S3 endpoint (moto_server) and tiny grids."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tokenscale.workers import pin_cpu_kernels

# the test process trains trials in-process and compares them with Ray trials and worker
# subprocesses, which pin their CPU kernels: this one computes with the same ones
pin_cpu_kernels()

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on loopback with bucket `tokenscale`; AWS env points at it."""
    port = free_port()
    # the moto installed with this interpreter, never another one found on PATH: moto 5.2.1
    # (seen in a pyenv on PATH) answers CompleteMultipartUpload with an empty 200 body
    # that pyarrow reads as INTERNAL_FAILURE, which breaks Ray's storage on s3://
    exe = str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="tokenscale")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m tokenscale.workers` / torchrun subprocess: this
    process's, without the launcher variables a test may have set (a world of one has
    RANK=0 set in this process) or a Ray to join, quiet progress bars, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")}
    return {**env, "TQDM_DISABLE": "1", **extra}


def final_metrics(stderr: str, rank: int = 0) -> dict:
    """A `python -m tokenscale.workers` run's final metrics of `rank`, from the
    `[rank R/W] {...}` line it reports on stderr once both stages ran."""
    lines = [line for line in stderr.splitlines() if line.startswith(f"[rank {rank}/") and '"stage2_loss"' in line]
    return json.loads(lines[-1].split(" ", 2)[2])


def stop_processes(family: list, group: int | None = None) -> None:
    """Stop exactly these processes (psutil.Process, collected by pid from what a test
    started), and the process group `group` when given: SIGTERM, then SIGKILL to any left
    after 15 s. Never by name or pattern: other processes on the machine stay."""
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        if group is not None:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        for proc in family:
            try:
                proc.send_signal(sig)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(family, timeout=15)
        if not alive:
            return


def tiny_grid(name: str = "tiny", llms: int = 3, visual_tokens=(1, 16), **overrides) -> dict:
    """A grid small enough for a test: seconds of training per trial."""
    sizes = [
        {"name": "xs", "hidden_size": 16, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 32},
        {"name": "s", "hidden_size": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate_size": 64},
        {"name": "m", "hidden_size": 48, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate_size": 96},
    ]
    grid = {
        "grid": name,
        "llms": sizes[:llms],
        "visual_tokens": list(visual_tokens),
        "compressors": ["avgpool"],
        "vision": {"image_size": 16, "patch_size": 4, "hidden_size": 16, "layers": 1, "heads": 2},
        "data": {"benchmarks": ["color", "digits"], "train_examples": 64, "eval_examples": 32},
        "train": {"zero_stage": 1, "micro_batch": 8, "stage1_steps": 2, "stage2_steps": 4},
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "max_concurrent_trials": 2,
        "max_failures": 0,
    }
    grid.update(overrides)
    return grid


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("RAY_TRAIN_V2_ENABLED", os.environ.get("RAY_TRAIN_V2_ENABLED", "1"))
    monkeypatch.setenv("TQDM_DISABLE", "1")


class TcpProxy:
    """A loopback TCP forwarder in front of an HTTP server. `refuse_writes = True` makes it
    drop every connection that sends a PUT (the endpoint fails mid-write, the server behind
    it keeps its data and never sees the request); stopping it makes the endpoint unreachable."""

    def __init__(self, target_port: int, port: int | None = None):
        self.target_port = target_port
        self.port = port or free_port()
        self.refuse_writes = False
        self.refused = 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []

    def start(self) -> None:
        import threading

        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for a, b, requests in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(a, b, requests), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and self.refuse_writes and data.startswith(b"PUT "):
                    self.refused += 1
                    break  # drop the connection before the server sees the write
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.close()
                except OSError:
                    pass

    def stop(self) -> None:
        if self._server is not None:
            # shut down before closing: on Linux, close() alone does not wake the thread
            # blocked in accept(), which would let one more connection through
            try:
                self._server.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._server.close()
            self._server = None
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass
        self._conns = []


def run_tokenscale_all(commands: list[tuple[str, ...]], cwd=None, timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Every command as its own `tokenscale` process, in its own process group (one that got
    as far as starting Ray is stopped with everything it started), started together, each
    awaited."""
    import signal

    procs = [
        subprocess.Popen([sys.executable, "-m", "tokenscale.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=cwd, start_new_session=True)
        for args in commands
    ]
    out = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, nothing else
            stdout, stderr = proc.communicate()
        out.append(subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr))
    return out


# ---- a real browser ---------------------------------------------------------------------

CHROMIUM_FLAGS = (
    # as root in a container: no sandbox; no GPU; and none of Chromium's own network traffic
    # (this machine's network is closed: those connections would only be refused)
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0",
)


def chromium() -> str:
    """Debian's Chromium (`make test` installs the package where it is missing)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium on PATH: `make test` installs Debian's chromium package (apt-get install chromium)"
    return found


@dataclass
class Rendered:
    dom: str  # the document after its scripts ran
    console: list[str]  # every console message and uncaught error the page produced
    screenshot: Path


def render_page(page: Path, out: Path, width: int = 1280, height: int = 2400) -> Rendered:
    """Open a local page in headless Chromium twice, each in a fresh profile under `out`:
    once to dump its DOM after the scripts ran (and collect what it logged to the
    console), once for a PNG screenshot."""
    url = page.resolve().as_uri()
    dom = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={out / 'profile-dom'}",
                          "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    shot = out / "screenshot.png"
    subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={out / 'profile-shot'}", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={shot}", url],
                   capture_output=True, text=True, timeout=120, check=True)
    return Rendered(dom.stdout, console, shot)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


class ChartCounter(HTMLParser):
    """Each `<svg class="chart" data-chart=ID>` in a DOM with its number of
    `<g class="series">`, by ID."""

    def __init__(self, dom: str):
        super().__init__()
        self.series: dict[str, int] = {}
        self._chart: str | None = None
        self._depth = 0
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "svg" and "chart" in (a.get("class") or "").split():
            self._chart, self._depth = a.get("data-chart") or "", 0
            self.series[self._chart] = 0
        elif self._chart is not None:
            self._depth += 1
            if tag == "g" and "series" in (a.get("class") or "").split():
                self.series[self._chart] += 1

    def handle_endtag(self, tag: str) -> None:
        if self._chart is None:
            return
        if tag == "svg" and self._depth == 0:
            self._chart = None
        else:
            self._depth -= 1
