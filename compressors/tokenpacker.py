"""TokenPacker (Li et al. 2024c): region cross-attention from a downsampled grid.

The grid is average-pooled to sqrt(V) x sqrt(V); each pooled token is the query of its own
r x r region (r = side / sqrt(V)) and cross-attends only to that region's patch tokens; the
MLP projector then maps to the LLM width. TokenPacker interpolates bilinearly; with an integer
factor r the region mean is the natural exact-region equivalent, and it keeps every output
token a function of its own region only. No question/query injection: that is QueCC's step.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .attention import CrossAttention
from .base import Compressor, MLPProjector
from .budgets import grid_side


class TokenPacker(Compressor):
    def __init__(self, *, heads: int | None = None, **dims):
        super().__init__(**dims)
        self.side = grid_side(self.grid_tokens)
        self.out_side = math.isqrt(self.visual_tokens)
        self.attention = CrossAttention(self.vision_dim, heads)
        self.projector = MLPProjector(self.vision_dim, self.llm_dim)

    def forward(self, patch_features: torch.Tensor, query_embedding: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, dim = patch_features.shape
        grid = patch_features.transpose(1, 2).reshape(batch, dim, self.side, self.side)
        queries = F.adaptive_avg_pool2d(grid, self.out_side).flatten(2).transpose(1, 2)
        packed = self.attention(queries, patch_features, regions=(self.side, self.out_side))
        return self.projector(packed)

    def flops(self) -> float:
        region = self.grid_tokens // self.visual_tokens
        pooling = self.grid_tokens * self.vision_dim  # one add per input element
        attention = CrossAttention.flops(self.visual_tokens, self.grid_tokens, region, self.vision_dim)
        return pooling + attention + MLPProjector.flops(self.visual_tokens, self.vision_dim, self.llm_dim)
