"""Which visual-token budgets V a compressor can make from a square patch grid of P tokens.

Torch-free: the grid config checks every (compressor, V) before anything is built.
"""

from __future__ import annotations

import math


def grid_side(grid_tokens: int) -> int:
    side = math.isqrt(grid_tokens)
    if side * side != grid_tokens:
        raise ValueError(f"grid_tokens={grid_tokens} is not a square patch grid")
    return side


def square_budgets(grid_tokens: int) -> list[int]:
    """Square V whose side divides the grid side: each token then owns an equal region."""
    side = grid_side(grid_tokens)
    return [s * s for s in range(1, side + 1) if side % s == 0]


def any_budgets(grid_tokens: int) -> list[int]:
    """Every V in 1..P: for compressors whose tokens are not tied to grid regions."""
    grid_side(grid_tokens)  # still insist on a square grid, like every other compressor
    return list(range(1, grid_tokens + 1))


def full_grid(grid_tokens: int) -> list[int]:
    """Only V = P: no compression, the baseline every compressor is measured against."""
    grid_side(grid_tokens)
    return [grid_tokens]
