"""What an answer costs beyond Ray Serve itself: /optimal against a no-op, same instance.

Starts Ray and the Serve app on a synthetic store (4 LLM sizes x 4 visual-token counts x
2 compressors x 2 task families, laws fitted with their bootstrap draws), then load-tests two
endpoints of that one Serve instance over loopback:

  - GET /noop: a constant through the same deployment and response class (Serve's floor);
    the production app has no such route: `NoopReplica` below adds it to a subclass of
    the app's replica, deployed with `start(..., replica_class=NoopReplica)`
  - GET /optimal?flops=...&text_tokens=...&task=... (budgets cycled over 16 values)

The two are measured interleaved -- sequential requests take turns one by one, concurrent
clients switch endpoint together every `--window` seconds -- so the load of whatever else
runs on the machine hits both alike (on a shared 2-core box it moves Serve's floor by 2x
within a minute). Printed: p50/p99 latency sequential (one keep-alive connection) and with
8 concurrent clients, req/s at 8 and 16 clients and the max of the two (max sustained).
Ratios are optimal/noop for latency and noop/optimal for req/s: 1.00 = the answer is free,
the target is <= 1.2 for all. Bounded: `--pairs` sequential requests per endpoint,
`--seconds` per concurrent phase (defaults: about 1.5 minutes with Ray's startup).

Usage: python benchmarks/bench_serve.py [--pairs 1000] [--seconds 20] [--window 0.5]
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tokenscale.fitting.grid_fit import fit_grid
from tokenscale.serve.app import Replica
from tokenscale.store import Store

TESTS = Path(__file__).resolve().parent.parent / "tests"  # synthetic.py: rows from known laws

GRID = "bench-serve"
LLMS = {"xs": 1_000_000, "s": 4_000_000, "m": 16_000_000, "l": 64_000_000}
TOKENS = (1, 4, 16, 64)
TRUTH = {  # (A, alpha, beta, D) per (family, compressor)
    ("reasoning", "avgpool"): (0.6, 0.20, 0.08, 0.15),
    ("reasoning", "qformer"): (0.5, 0.15, 0.20, 0.18),
    ("ocr", "avgpool"): (0.7, 0.10, 0.30, 0.10),
    ("ocr", "qformer"): (0.7, 0.12, 0.15, 0.12),
}
BENCHMARKS = {"reasoning": ["mmmu", "scienceqa"], "ocr": ["textvqa"]}


_NOOP = {"ok": True}


class NoopReplica(Replica):
    """The app's replica plus GET /noop: a constant through the same deployment, app and
    response class, i.e. what Ray Serve and FastAPI cost before any answer is computed."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        api = super().__serve_build_asgi_app__()

        @api.get("/noop", include_in_schema=False)
        async def noop():
            return JSONResponse(_NOOP)

        return api


def synthetic_store(root: str) -> Store:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from synthetic import write_synthetic_results

    store = Store.open(root)
    write_synthetic_results(store, GRID, LLMS, TOKENS, TRUTH, BENCHMARKS)
    fit_grid(store, GRID)
    return store


def _get(conn: http.client.HTTPConnection, path: str) -> int:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return response.status


def sequential(port: int, paths: dict[str, list[str]], pairs: int) -> dict[str, np.ndarray]:
    """Latencies (s), one request at a time on one keep-alive connection, the endpoints
    taking turns request by request (who goes first alternates too): both are measured
    under the same machine load, whatever else runs on it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    names = list(paths)
    out = {name: np.empty(pairs) for name in names}
    for i in range(pairs):
        for name in names if i % 2 == 0 else names[::-1]:
            path = paths[name][i % len(paths[name])]
            t = time.perf_counter()
            status = _get(conn, path)
            out[name][i] = time.perf_counter() - t
            if status != 200:
                raise RuntimeError(f"GET {path} -> {status}")
    conn.close()
    return out


def concurrent(
    port: int, paths: dict[str, list[str]], clients: int, seconds: float, window: float
) -> dict[str, tuple[np.ndarray, float]]:
    """`clients` threads, each with its own keep-alive connection, sending back to back for
    `seconds`; all of them switch endpoint every `window` seconds (the endpoints alternate
    windows, so slow drifts in machine load hit both alike). A request counts for the
    endpoint whose window it started in. Returns per endpoint (latencies, requests/s over
    its windows)."""
    names = list(paths)
    current = [names[0]]
    stop = threading.Event()
    records: list[list[tuple[str, float]]] = [[] for _ in range(clients)]
    errors: list[str] = []
    ready = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, i = records[k], k
        ready.wait()
        while not stop.is_set():
            name = current[0]
            path = paths[name][i % len(paths[name])]
            t = time.perf_counter()
            status = _get(conn, path)
            mine.append((name, time.perf_counter() - t))
            if status != 200:
                errors.append(f"{path} -> {status}")
                break
            i += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    spent = dict.fromkeys(names, 0.0)
    ready.wait()
    for w in range(max(2, round(seconds / window))):
        current[0] = names[w % len(names)]
        began = time.perf_counter()
        time.sleep(window)
        spent[current[0]] += time.perf_counter() - began
    stop.set()
    for t in threads:
        t.join(60)
    if errors:
        raise RuntimeError(f"non-200 answers: {errors[:3]}")
    out = {}
    for name in names:
        lat = np.array([x for rec in records for n, x in rec if n == name])
        out[name] = (lat, len(lat) / spent[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=1000, help="sequential requests per endpoint")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each concurrent phase")
    parser.add_argument("--window", type=float, default=0.5, help="endpoints alternate every WINDOW seconds")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args()

    import ray
    from ray import serve

    from tokenscale.orchestrator.driver import init_ray
    from tokenscale.serve.advisor import Advisor, load_snapshot
    from tokenscale.serve.app import start

    port = args.port
    if not port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    budgets = np.geomspace(5e7, 1e10, 16)
    paths = {
        "noop": ["/noop"],
        "optimal": [
            "/optimal?" + urlencode({"flops": f"{b:.6g}", "text_tokens": 16, "task": "reasoning" if i % 2 else "ocr"})
            for i, b in enumerate(budgets)
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(tmp)
        # the answer itself, in process: what /optimal adds on top of Serve at most
        advisor = Advisor(load_snapshot(store, GRID))
        t = time.perf_counter()
        for i in range(5000):
            advisor.optimal(float(budgets[i % 16]), 16.0, "reasoning" if i % 2 else "ocr")
        in_process_us = (time.perf_counter() - t) / 5000 * 1e6

        init_ray()
        try:
            start(store.uri, GRID, "127.0.0.1", port, reload_seconds=5.0, replica_class=NoopReplica)
            sequential(port, paths, 100)  # warm connections, code paths, the proxy's routes
            seq = sequential(port, paths, args.pairs)
            conc = concurrent(port, paths, args.clients, args.seconds, args.window)
            more = concurrent(port, paths, 2 * args.clients, args.seconds, args.window)
        finally:
            serve.shutdown()
            ray.shutdown()

    def ms(x: np.ndarray, q: float) -> float:
        return float(np.percentile(x, q) * 1e3)

    rows = [  # (label, noop, optimal, higher is better)
        ("sequential p50 (ms)", ms(seq["noop"], 50), ms(seq["optimal"], 50), False),
        ("sequential p99 (ms)", ms(seq["noop"], 99), ms(seq["optimal"], 99), False),
        (f"{args.clients} clients p50 (ms)", ms(conc["noop"][0], 50), ms(conc["optimal"][0], 50), False),
        (f"{args.clients} clients p99 (ms)", ms(conc["noop"][0], 99), ms(conc["optimal"][0], 99), False),
        (f"req/s at {args.clients} clients", conc["noop"][1], conc["optimal"][1], True),
        (f"req/s at {2 * args.clients} clients", more["noop"][1], more["optimal"][1], True),
        ("max sustained req/s", max(conc["noop"][1], more["noop"][1]), max(conc["optimal"][1], more["optimal"][1]), True),
    ]
    print(f"bench_serve: loopback, 1 replica, Ray {ray.__version__}, {os.cpu_count()} CPUs; {args.pairs} sequential "
          f"requests per endpoint (interleaved), {args.seconds:g}s at {args.clients} and at {2 * args.clients} clients "
          f"(endpoints alternating every {args.window:g}s)")
    print(f"Advisor.optimal in process: {in_process_us:.1f} us per answer")
    print(f"{'':26}{'noop':>9}{'optimal':>9}{'ratio':>7}")
    worst = 0.0
    for label, noop, opt, higher_better in rows:
        ratio = noop / opt if higher_better else opt / noop
        worst = max(worst, ratio)
        print(f"{label:26}{noop:9.2f}{opt:9.2f}{ratio:7.2f}")
    print("ratio: optimal/noop for latency, noop/optimal for req/s (1.00 = free; target <= 1.2)")
    print(f"worst ratio {worst:.2f}: {'PASS' if worst <= 1.2 else 'FAIL'}")


if __name__ == "__main__":
    main()
