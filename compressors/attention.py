"""Cross-attention shared by the attention compressors (tokenpacker, quecc, learned_queries).

Global mode: every query attends to all P patch tokens (Q-Former style). Region mode: the
patch grid is cut into V equal square regions, one query per region, and each query attends
only to the r x r patches of its own region (TokenPacker / QueCC). Region mode is done by
folding the regions into the batch dimension, so it is one ordinary attention call with
B * V "examples" of 1 query x r^2 keys: no mask, and no work spent on keys outside the region.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def default_heads(dim: int) -> int:
    """8 heads (QueCC's choice for CLIP-L) when the width allows, else the largest divisor of 8."""
    return math.gcd(dim, 8)


def to_regions(tokens: torch.Tensor, side: int, out_side: int) -> torch.Tensor:
    """[B, side*side, D] in raster order -> [B * out_side^2, r*r, D], r = side // out_side.

    Region (i, j) lands at batch index b * out_side^2 + i * out_side + j: the same raster order
    as adaptive_avg_pool2d / a stride-r conv over the grid, so queries and regions line up.
    """
    batch, _, dim = tokens.shape
    r = side // out_side
    grid = tokens.reshape(batch, out_side, r, out_side, r, dim)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch * out_side * out_side, r * r, dim)


class CrossAttention(nn.Module):
    """Multi-head cross-attention with pre-LayerNorms (nn.MultiheadAttention's maths on SDPA).

    No residual and no FFN: as in TokenPacker and QueCC, the attention output *is* the
    compressed token, and the MLP projector that follows is the FFN.
    """

    def __init__(self, dim: int, heads: int | None = None):
        super().__init__()
        heads = default_heads(dim) if heads is None else heads
        if heads < 1 or dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.dim = dim
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)  # one matmul for K and V over the P tokens
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, queries: torch.Tensor, tokens: torch.Tensor, regions: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """queries [B, V, D], tokens [B, P, D] -> [B, V, D].

        `regions=(side, out_side)` restricts query v to the patches of region v (V = out_side^2).
        """
        batch, num_queries, dim = queries.shape
        q = self.q_proj(self.norm_q(queries))
        # K/V are projected once on all P tokens, then cut into regions: each patch belongs to
        # exactly one region, so this costs the same as projecting region by region.
        k, v = self.kv_proj(self.norm_kv(tokens)).chunk(2, dim=-1)
        if regions is not None:
            side, out_side = regions
            q = q.reshape(batch * num_queries, 1, dim)
            k, v = to_regions(k, side, out_side), to_regions(v, side, out_side)
        n, lq, lk, hd = q.shape[0], q.shape[1], k.shape[1], dim // self.heads
        q = q.view(n, lq, self.heads, hd).transpose(1, 2)
        k = k.reshape(n, lk, self.heads, hd).transpose(1, 2)
        v = v.reshape(n, lk, self.heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, num_queries, dim)
        return self.out_proj(out)

    @staticmethod
    def flops(num_queries: int, num_tokens: int, keys_per_query: int, dim: int) -> float:
        """Matmul FLOPs (2 per multiply-add) for one example; independent of the head count.

        q/out projections on the queries, K/V projection on all tokens, then QK^T and AV, each
        num_queries x keys_per_query x dim multiply-adds summed over heads.
        """
        projections = 2.0 * dim * dim * (2 * num_queries + 2 * num_tokens)
        attention = 2.0 * 2 * num_queries * keys_per_query * dim
        return projections + attention
