"""Adaptive average pooling of the patch grid to sqrt(V) x sqrt(V), then the MLP projector."""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from .base import Compressor, MLPProjector
from .budgets import grid_side


class AvgPool(Compressor):
    def __init__(self, **dims):
        super().__init__(**dims)
        self.side = grid_side(self.grid_tokens)
        self.out_side = math.isqrt(self.visual_tokens)
        self.projector = MLPProjector(self.vision_dim, self.llm_dim)

    def forward(self, patch_features: torch.Tensor, query_embedding: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, dim = patch_features.shape
        grid = patch_features.transpose(1, 2).reshape(batch, dim, self.side, self.side)
        pooled = F.adaptive_avg_pool2d(grid, self.out_side).flatten(2).transpose(1, 2)
        return self.projector(pooled)

    def flops(self) -> float:
        pooling = self.grid_tokens * self.vision_dim  # one add per input element
        return pooling + MLPProjector.flops(self.visual_tokens, self.vision_dim, self.llm_dim)
