"""PruMerge-style training-free token selection + merging, then the MLP projector.

PruMerge (Shang et al. 2024) ranks patches by the CLS token's attention to them, keeps the
top ones and merges the pruned ones into the kept ones by key similarity. The worker hands
compressors the patch tokens only (no CLS, no attention maps), so here:

- CLS proxy = the mean patch token; a patch's score = cosine similarity to that mean (cosine,
  not dot product, so that feature norm alone does not decide what is kept);
- keep the V highest-scoring patches (ties broken by torch.topk, deterministic on a device),
  in raster order so the LLM sees them in a stable spatial order;
- every dropped patch joins its nearest kept patch by cosine similarity; each output token is
  the plain average of its kept patch and the patches that joined it.

Exactly V tokens come out, for any V in 1..P. Only the projector is trained.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .base import Compressor, MLPProjector


class PruMerge(Compressor):
    def __init__(self, **dims):
        super().__init__(**dims)
        self.projector = MLPProjector(self.vision_dim, self.llm_dim)

    @torch.no_grad()
    def assign(self, patch_features: torch.Tensor) -> torch.Tensor:
        """[B, P, D] -> [B, P]: the output slot (0..V-1) each patch is merged into.

        Selection is discrete and training-free, so no graph is kept for it.
        """
        batch, _, _ = patch_features.shape
        unit = F.normalize(patch_features, dim=-1)
        cls_proxy = F.normalize(patch_features.mean(dim=1), dim=-1)
        scores = (unit @ cls_proxy.unsqueeze(-1)).squeeze(-1)  # [B, P]
        keep = scores.topk(self.visual_tokens, dim=1).indices.sort(dim=1).values  # [B, V]
        kept_unit = unit.gather(1, keep.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
        slot = (unit @ kept_unit.transpose(1, 2)).argmax(dim=-1)  # nearest kept patch, [B, P]
        # a kept patch owns its own slot even if it duplicates another kept patch
        own = torch.arange(self.visual_tokens, device=keep.device).expand(batch, -1)
        return slot.scatter(1, keep, own)

    def forward(self, patch_features: torch.Tensor, query_embedding: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, dim = patch_features.shape
        slot = self.assign(patch_features)
        sums = patch_features.new_zeros(batch, self.visual_tokens, dim)
        sums = sums.scatter_add(1, slot.unsqueeze(-1).expand(-1, -1, dim), patch_features)
        counts = patch_features.new_zeros(batch, self.visual_tokens)
        counts = counts.scatter_add(1, slot, torch.ones_like(slot, dtype=patch_features.dtype))
        return self.projector(sums / counts.unsqueeze(-1))  # every slot holds >= 1 patch

    def flops(self) -> float:
        p, v, d = self.grid_tokens, self.visual_tokens, self.vision_dim
        mean = p * d  # token reduction: one add per element
        scores = 2.0 * p * d  # [P, D] @ [D]
        nearest = 2.0 * p * v * d  # [P, D] @ [D, V]
        merge = p * d  # scatter-add of every patch into its slot
        return mean + scores + nearest + merge + MLPProjector.flops(v, d, self.llm_dim)
