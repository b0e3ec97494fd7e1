"""The VLM: vision tower -> compressor -> causal LM (transformers Qwen2).

Sequence layout, as LLaVA: [V visual tokens][question][answer]; the loss is on the answer
only. The embedded default builds every part from a config (random init); the cluster path
loads the LM and a CLIP vision tower with `from_pretrained` from a path in the grid YAML.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from tokenscale import compressors

from .benchmarks import VOCAB
from .trial import LLMSpec, TrialConfig, VisionSpec


class TinyViT(nn.Module):
    """A small ViT: patchify, a CLS token, learned positions, a few encoder layers."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        dim = spec.hidden_size
        self.patch = nn.Conv2d(3, dim, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, spec.grid_tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, spec.heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.hidden_size = dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.patch(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(images), -1, -1), patches], dim=1) + self.position
        hidden = self.norm(self.encoder(tokens))
        return hidden[:, 0], hidden[:, 1:]


class CLIPTower(nn.Module):
    """A CLIP vision checkpoint; LLaVA takes the penultimate layer's patch tokens."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import CLIPVisionModel

        self.model = CLIPVisionModel.from_pretrained(path)
        self.hidden_size = self.model.config.hidden_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(pixel_values=images, output_hidden_states=True).hidden_states[-2]
        return hidden[:, 0], hidden[:, 1:]


def build_llm(spec: LLMSpec, vocab_size: int) -> Qwen2ForCausalLM:
    if spec.path:
        return Qwen2ForCausalLM.from_pretrained(spec.path)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config)


def non_embedding_params(llm: nn.Module) -> int:
    """N in the scaling law: parameters outside the token embedding and the LM head."""
    embedding = {id(p) for p in llm.get_input_embeddings().parameters()}
    embedding |= {id(p) for p in llm.get_output_embeddings().parameters()}
    return sum(p.numel() for p in llm.parameters() if id(p) not in embedding)


class VLM(nn.Module):
    def __init__(self, trial: TrialConfig):
        super().__init__()
        self.vision = CLIPTower(trial.vision.path) if trial.vision.path else TinyViT(trial.vision)
        self.llm = build_llm(trial.llm, len(VOCAB))
        llm_dim = self.llm.config.hidden_size
        grid_tokens = trial.vision.grid_tokens
        self.compressor = compressors.build(
            trial.compressor,
            vision_dim=self.vision.hidden_size,
            llm_dim=llm_dim,
            grid_tokens=grid_tokens,
            visual_tokens=trial.visual_tokens,
            **trial.compressor_options,
        )

    @property
    def llm_params(self) -> int:
        return non_embedding_params(self.llm)

    def query_embedding(self, question_embeds: torch.Tensor) -> torch.Tensor:
        """The LM's last hidden state of the question (QueCC's query). One pass per example;
        for a fixed question it is the same vector and can be cached."""
        out = self.llm.model(inputs_embeds=question_embeds)
        return out.last_hidden_state[:, -1]

    def forward(self, images: torch.Tensor, questions: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss over answer tokens, logits at the answer positions [B, G, vocab])."""
        embed = self.llm.get_input_embeddings()
        question_embeds = embed(questions)
        _, patches = self.vision(images)
        query = self.query_embedding(question_embeds) if self.compressor.uses_query else None
        visual = self.compressor(patches, query).to(question_embeds.dtype)
        inputs = torch.cat([visual, question_embeds, embed(answers)], dim=1)
        hidden = self.llm.model(inputs_embeds=inputs).last_hidden_state
        # position t predicts token t+1: the answer is predicted from the token before it
        start = visual.shape[1] + questions.shape[1] - 1
        logits = self.llm.lm_head(hidden[:, start : start + answers.shape[1]])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), answers.flatten())
        return loss, logits
