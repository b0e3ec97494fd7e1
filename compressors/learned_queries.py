"""V learned queries cross-attending to all P patch tokens (Q-Former / Matryoshka-Query style).

Unlike the region compressors, a query is free to gather from anywhere in the image, so any
V in 1..P works. One attention layer, then the MLP projector to the LLM width.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import CrossAttention
from .base import Compressor, MLPProjector


class LearnedQueries(Compressor):
    def __init__(self, *, heads: int | None = None, **dims):
        super().__init__(**dims)
        # small init, like BLIP-2's query tokens: the pre-LayerNorm rescales them anyway
        self.queries = nn.Parameter(torch.randn(self.visual_tokens, self.vision_dim) * 0.02)
        self.attention = CrossAttention(self.vision_dim, heads)
        self.projector = MLPProjector(self.vision_dim, self.llm_dim)

    def forward(self, patch_features: torch.Tensor, query_embedding: torch.Tensor | None = None) -> torch.Tensor:
        queries = self.queries.to(patch_features.dtype).expand(len(patch_features), -1, -1)
        return self.projector(self.attention(queries, patch_features))

    def flops(self) -> float:
        p, v, d = self.grid_tokens, self.visual_tokens, self.vision_dim
        return CrossAttention.flops(v, p, p, d) + MLPProjector.flops(v, d, self.llm_dim)
