"""The facts every layer shares, written once: the law's forms and the inference cost.

Torch-, Ray- and SciPy-free: the CLI, the config model, the fitter and the Serve app all
import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from tokenscale import compressors

if TYPE_CHECKING:  # annotations only: the CLI imports this module, and numpy costs ~0.05 s
    import numpy as np

# E(N, V) = A·N^-α·V^-β + D (the authors' code) and A·N^-α + B·V^-β + D (Chinchilla-style)
FORMS: tuple[str, ...] = ("product", "sum")
Form = Literal["product", "sum"]

# Compressors that run the LM over the user's query to build their visual tokens (QueCC's
# query embedding). That pass cannot share the KV cache of the image-first sequence that
# answers, so it costs another 2·N·Q per query.
QUERY_CONDITIONED: frozenset[str] = frozenset(n for n in compressors.names() if compressors.uses_query(n))


def inference_flops(
    llm_params: float | np.ndarray,
    text_tokens: float | np.ndarray,
    visual_tokens: float | np.ndarray,
    generated_tokens: float | np.ndarray = 0.0,
    compressor: str | None = None,
) -> float | np.ndarray:
    """FLOPs of one query: 2·N·(Q + V + G) (the paper's cost; the vision tower is held
    fixed and left out), plus 2·N·Q for a compressor that embeds the query with the LM.

    Arrays broadcast, so the frontier and the Serve app price whole candidate sets at once."""
    tokens = text_tokens + visual_tokens + generated_tokens
    if compressor in QUERY_CONDITIONED:
        tokens = tokens + text_tokens
    return 2.0 * llm_params * tokens


def llm_params_within(
    flops: float | np.ndarray,
    text_tokens: float | np.ndarray,
    visual_tokens: float | np.ndarray,
    generated_tokens: float | np.ndarray = 0.0,
    compressor: str | None = None,
) -> float | np.ndarray:
    """The N that spends exactly `flops` per query at these token counts (the inverse of
    `inference_flops` in N)."""
    return flops / inference_flops(1.0, text_tokens, visual_tokens, generated_tokens, compressor)


def training_flops(llm_params: float, tokens: float) -> float:
    """≈ 6·N·D: forward + backward over `tokens` training tokens (Kaplan et al.)."""
    return 6.0 * llm_params * tokens
