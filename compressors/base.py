"""What every compressor shares: the interface, the LLaVA-1.5 MLP projector, budgets."""

from __future__ import annotations

import torch
from torch import nn


class MLPProjector(nn.Module):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    @staticmethod
    def flops(tokens: int, in_dim: int, out_dim: int) -> float:
        """Multiply-adds x 2 of both matmuls for `tokens` rows."""
        return 2.0 * tokens * (in_dim * out_dim + out_dim * out_dim)


class Compressor(nn.Module):
    """Maps patch features [B, P, vision_dim] (+ optional query [B, llm_dim]) to [B, V, llm_dim]."""

    uses_query: bool = False

    def __init__(self, *, vision_dim: int, llm_dim: int, grid_tokens: int, visual_tokens: int):
        super().__init__()
        self.vision_dim = vision_dim
        self.llm_dim = llm_dim
        self.grid_tokens = grid_tokens
        self.visual_tokens = visual_tokens

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops(self) -> float:
        """Forward FLOPs for one example, a formula in (P, V, dims), not a measurement.

        Convention, shared by every compressor: each matmul (linear layers, attention scores
        and values, convolutions, similarity products) counts 2 FLOPs per multiply-add; bias
        adds are not counted. Reductions *across tokens* that are not matmuls (average
        pooling, the mean patch, merging tokens by summation) count 1 FLOP per element summed.
        Pointwise work (activations, LayerNorm, softmax, scaling, adding the query) is ignored:
        it is O(tokens x width), small next to the O(tokens x width^2) matmuls.
        """
        raise NotImplementedError

    def forward(self, patch_features: torch.Tensor, query_embedding: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError
