"""Visual-token compressors: patch features [B, P, D_vision] -> [B, V, D_llm].

Adding a compressor = one file defining a `Compressor` subclass + one line in `_REGISTRY`.
Everything that names a compressor (the grid config, the worker, the tests) goes through
`names()`, `check_budget()`, `check_options()` and `build()` below.

This module is torch-free: a grid is validated in full (names, budgets, constructor
options) without importing torch; only `get()` and `build()` import the compressor's file.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .budgets import any_budgets, full_grid, square_budgets


@dataclass(frozen=True)
class Entry:
    target: str  # "module:Class", imported lazily
    budgets: Callable[[int], list[int]] = square_budgets  # valid V for a grid of P patches
    uses_query: bool = False  # runs the LM over the user's query (priced in tokenscale.costs)


_REGISTRY: dict[str, Entry] = {
    "avgpool": Entry("avgpool:AvgPool"),
    "learned_queries": Entry("learned_queries:LearnedQueries", any_budgets),
    "none": Entry("none:NoCompression", full_grid),
    "prumerge": Entry("prumerge:PruMerge", any_budgets),
    "quecc": Entry("quecc:QueCC", uses_query=True),
    "tokenpacker": Entry("tokenpacker:TokenPacker"),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}: choose one of {', '.join(names())}")
    return _REGISTRY[name]


def get(name: str) -> type:
    """The compressor's class (imports torch)."""
    module_name, class_name = _entry(name).target.split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)


def valid_budgets(name: str, grid_tokens: int) -> list[int]:
    return _entry(name).budgets(grid_tokens)


def uses_query(name: str) -> bool:
    return _entry(name).uses_query


def check_budget(name: str, grid_tokens: int, visual_tokens: int) -> None:
    """Raise ValueError naming the valid budgets if `visual_tokens` is impossible for `name`."""
    valid = valid_budgets(name, grid_tokens)
    if visual_tokens not in valid:
        raise ValueError(
            f"compressor {name!r} cannot make {visual_tokens} visual tokens from a grid of "
            f"{grid_tokens} patches: valid choices are {valid}"
        )


# The dimensions the worker passes to every constructor; not options a grid may set.
DIMENSIONS = ("vision_dim", "llm_dim", "grid_tokens", "visual_tokens")
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


@functools.cache
def options(name: str) -> dict[str, tuple[str, Any]]:
    """The keyword options of the compressor's constructor, read from its source without
    importing it (no torch): {option: (annotation, default)}."""
    module_name, class_name = _entry(name).target.split(":")
    spec = importlib.util.find_spec(f"{__name__}.{module_name}")
    assert spec is not None and spec.origin is not None
    with open(spec.origin) as source:
        tree = ast.parse(source.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    init = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
    if init is None:
        return {}
    args = init.args
    found: dict[str, tuple[str, Any]] = {}
    positional = args.args[1:]  # after self
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults, strict=True)) + list(zip(args.kwonlyargs, args.kw_defaults, strict=True))
    for arg, default in pairs:
        if arg.arg in DIMENSIONS:
            continue
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else "Any"
        found[arg.arg] = (annotation, ast.literal_eval(default) if default is not None else None)
    return found


def check_options(name: str, given: dict[str, Any]) -> None:
    """Raise ValueError naming the option and what is accepted when `given` would not fit
    the compressor's constructor."""
    accepted = options(name)
    for key, value in given.items():
        if key not in accepted:
            valid = ", ".join(f"{k} ({a}, default {d!r})" for k, (a, d) in accepted.items()) or "none"
            raise ValueError(f"{key}: compressor {name!r} takes no option {key!r}; its options: {valid}")
        annotation = accepted[key][0]
        kinds = [part.strip() for part in annotation.split("|")]
        if value is None and "None" in kinds:
            continue
        types = tuple(t for k in kinds if k != "None" for t in _TYPES.get(k, (object,)))
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{key}: compressor {name!r} expects {annotation}, got {value!r}")


def build(name: str, *, vision_dim: int, llm_dim: int, grid_tokens: int, visual_tokens: int, **options: Any):
    check_budget(name, grid_tokens, visual_tokens)
    return get(name)(
        vision_dim=vision_dim, llm_dim=llm_dim, grid_tokens=grid_tokens, visual_tokens=visual_tokens, **options
    )


__all__ = ["build", "check_budget", "check_options", "get", "names", "options", "square_budgets", "uses_query", "valid_budgets"]
