"""Results generated from known product laws: a grid's worth of rows without training.

For the tests and benchmarks of everything downstream of the trials (fit, SQL, Serve):
the truth is known, so a fit can be checked against it. Every row is built by
`tokenscale.store.result_row`, the one typed row builder, so these rows have every
column a trial writes. Tests import it directly (tests/ is on their path); benchmarks
add tests/ to `sys.path` first (see benchmarks/bench_serve.py).
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np

from tokenscale.costs import inference_flops
from tokenscale.store import Store, result_row

NON_EMBEDDING_SHARE = 0.8  # llm_params_non_embedding = this share of llm_params


def synthetic_row(**values) -> dict:
    """One result row: `values` (at least grid, llm, llm_params, visual_tokens, compressor,
    benchmark, task_family, error) over plausible defaults for every other column. The
    score is 1 - error, the trial id and config hash name (LLM, V, compressor, seed), the
    inference FLOPs are `inference_flops` at the row's query and answer lengths."""
    n, v, compressor = values["llm_params"], values["visual_tokens"], values["compressor"]
    seed = values.get("seed", 0)
    config_hash = values.get("config_hash", f"{values['llm']}-{v}-{compressor}-{seed}")
    text_tokens, generated = values.get("text_tokens_mean", 0.0), values.get("generated_tokens", 0)
    defaults = {
        "trial_id": f"t-{config_hash}", "config_hash": config_hash, "seed": seed,
        "llm_params_non_embedding": round(NON_EMBEDDING_SHARE * n), "compressor_params": 0, "compressor_flops": 0.0,
        "score": 1.0 - values["error"], "chance": 0.0, "n_examples": 32, "text_tokens_mean": text_tokens,
        "generated_tokens": generated,
        "inference_flops": float(inference_flops(n, text_tokens, v, generated, compressor=compressor)),
        "train_seconds": 0.0, "eval_seconds": 0.0, "code_version": "synthetic",
        "finished_at": datetime.now(timezone.utc),
    }
    return result_row(**(defaults | values))


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
    for compressor in sorted({c for _, c in truth}):
        for llm, n in llms.items():
            for v in visual_tokens:
                config_hash = f"{llm}-{v}-{compressor}"
                rows = []
                for family, names in benchmarks.items():
                    a, alpha, beta, d = truth[(family, compressor)]
                    for bench in names:
                        error = float(np.clip(a * (n / 1e6) ** -alpha * v**-beta + d + rng.normal(0, noise), 0, 1))
                        rows.append(synthetic_row(
                            grid=grid, config_hash=config_hash, llm=llm, llm_params=n, visual_tokens=v,
                            compressor=compressor, benchmark=bench, task_family=family, error=error,
                        ))
                store.write_results(grid, compressor, config_hash, rows)
