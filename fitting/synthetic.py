"""Results generated from known product laws: a grid's worth of rows without training.

For benchmarks and tests of everything downstream of the trials (fit, SQL, Serve), and
for trying the service: the truth is known, so a fit can be checked against it.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from tokenscale.store import RESULT_SCHEMA, Store


def write_synthetic_results(
    store: Store,
    grid: str,
    llms: dict[str, int],
    visual_tokens: tuple[int, ...],
    truth: dict[tuple[str, str], tuple[float, float, float, float]],
    benchmarks: dict[str, list[str]],
    seed: int = 0,
    noise: float = 0.004,
) -> None:
    """One result object per (LLM, V, compressor); each benchmark's error is
    A (N/1e6)^-alpha V^-beta + D + N(0, noise), with (A, alpha, beta, D) = truth[(family,
    compressor)]. Seeded, so the same call writes the same rows."""
    rng = np.random.default_rng(seed)
    base = {f.name: None for f in RESULT_SCHEMA}
    for compressor in sorted({c for _, c in truth}):
        for llm, n in llms.items():
            for v in visual_tokens:
                config_hash = f"{llm}-{v}-{compressor}"
                rows = []
                for family, names in benchmarks.items():
                    a, alpha, beta, d = truth[(family, compressor)]
                    for bench in names:
                        error = float(np.clip(a * (n / 1e6) ** -alpha * v**-beta + d + rng.normal(0, noise), 0, 1))
                        rows.append(base | {
                            "grid": grid, "trial_id": f"t-{config_hash}", "config_hash": config_hash, "llm": llm,
                            "llm_params": n, "visual_tokens": v, "compressor": compressor, "seed": 0,
                            "benchmark": bench, "task_family": family, "score": 1 - error, "error": error,
                            "n_examples": 32, "text_tokens_mean": 0.0, "generated_tokens": 0,
                            "inference_flops": 2.0 * n * v, "finished_at": datetime.now(timezone.utc),
                        })
                store.write_results(grid, compressor, config_hash, rows)
