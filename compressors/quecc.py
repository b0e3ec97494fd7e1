"""QueCC (Li et al., arXiv 2411.03312): query-based convolutional cross-attention compression.

1. The question's embedding (the LLM's last hidden state, [B, llm_dim]) is projected to the
   vision width and added to every patch token, so what is kept depends on the question.
2. An MLP over those tokens makes per-patch queries; a learnable depth-wise conv with
   kernel = stride = r (r = side / sqrt(V)) downsamples them to one query per r x r region.
3. Each region query cross-attends only to the (query-injected) patch tokens of its region.
4. LLaVA's MLP projector maps the V tokens to the LLM width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import CrossAttention
from .base import Compressor, MLPProjector
from .budgets import grid_side


class QueCC(Compressor):
    uses_query = True

    def __init__(self, *, heads: int | None = None, **dims):
        super().__init__(**dims)
        self.side = grid_side(self.grid_tokens)
        self.out_side = math.isqrt(self.visual_tokens)
        stride = self.side // self.out_side
        dim = self.vision_dim
        # The LLM's hidden state lives on another scale than the vision features: the
        # LayerNorm (as in the reference code) puts the injected query on the patches' scale.
        self.query_proj = nn.Sequential(nn.Linear(self.llm_dim, dim), nn.LayerNorm(dim))
        self.query_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.LayerNorm(dim))
        # groups=dim: one r x r kernel per channel, a learned weighting of the region's queries
        self.downsample = nn.Conv2d(dim, dim, kernel_size=stride, stride=stride, groups=dim)
        self.attention = CrossAttention(dim, heads)
        self.projector = MLPProjector(dim, self.llm_dim)

    def forward(self, patch_features: torch.Tensor, query_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if query_embedding is None:
            raise ValueError(
                "quecc needs query_embedding [B, llm_dim] (the LLM's last hidden state of the "
                "question); got None"
            )
        batch, _, dim = patch_features.shape
        tokens = patch_features + self.query_proj(query_embedding.to(patch_features.dtype)).unsqueeze(1)
        queries = self.query_mlp(tokens).transpose(1, 2).reshape(batch, dim, self.side, self.side)
        queries = self.downsample(queries).flatten(2).transpose(1, 2)  # [B, V, D], raster order
        compressed = self.attention(queries, tokens, regions=(self.side, self.out_side))
        return self.projector(compressed)

    def flops(self) -> float:
        p, v, d = self.grid_tokens, self.visual_tokens, self.vision_dim
        query_proj = 2.0 * self.llm_dim * d  # once per example, not per patch
        query_mlp = 2.0 * p * 2 * d * d
        downsample = 2.0 * p * d  # depth-wise: r*r multiply-adds per channel per output = P*D
        attention = CrossAttention.flops(v, p, p // v, d)
        return query_proj + query_mlp + downsample + attention + MLPProjector.flops(v, d, self.llm_dim)
