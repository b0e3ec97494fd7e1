"""Visual-token compressors: patch features [B, P, D_vision] -> [B, V, D_llm].

Adding a compressor = one file defining a `Compressor` subclass + one line in `_REGISTRY`.
Everything that names a compressor (the grid YAML, the worker, the tests) goes through
`names()`, `check_budget()` and `build()` below.
"""

from __future__ import annotations

import importlib

from .base import Compressor, square_budgets

# name -> "module:Class" (imported lazily so listing names costs nothing)
_REGISTRY: dict[str, str] = {
    "avgpool": "avgpool:AvgPool",
    "learned_queries": "learned_queries:LearnedQueries",
    "none": "none:NoCompression",
    "prumerge": "prumerge:PruMerge",
    "quecc": "quecc:QueCC",
    "tokenpacker": "tokenpacker:TokenPacker",
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Compressor]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}: choose one of {', '.join(names())}")
    module_name, class_name = _REGISTRY[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)


def check_budget(name: str, grid_tokens: int, visual_tokens: int) -> None:
    """Raise ValueError naming the valid budgets if `visual_tokens` is impossible for `name`."""
    valid = get(name).valid_budgets(grid_tokens)
    if visual_tokens not in valid:
        raise ValueError(
            f"compressor {name!r} cannot make {visual_tokens} visual tokens from a grid of "
            f"{grid_tokens} patches: valid choices are {valid}"
        )


def build(
    name: str, *, vision_dim: int, llm_dim: int, grid_tokens: int, visual_tokens: int, **options
) -> Compressor:
    check_budget(name, grid_tokens, visual_tokens)
    return get(name)(
        vision_dim=vision_dim, llm_dim=llm_dim, grid_tokens=grid_tokens, visual_tokens=visual_tokens, **options
    )


__all__ = ["Compressor", "build", "check_budget", "get", "names", "square_budgets"]
