"""No compression: LLaVA-1.5's two-layer MLP projector on all P patch tokens (V = P)."""

from __future__ import annotations

import torch

from .base import Compressor, MLPProjector


class NoCompression(Compressor):
    def __init__(self, **dims):
        super().__init__(**dims)
        self.projector = MLPProjector(self.vision_dim, self.llm_dim)

    def forward(self, patch_features: torch.Tensor, query_embedding: torch.Tensor | None = None) -> torch.Tensor:
        return self.projector(patch_features)

    def flops(self) -> float:
        return MLPProjector.flops(self.grid_tokens, self.vision_dim, self.llm_dim)
