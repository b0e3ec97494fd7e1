"""The VLM: vision tower -> compressor -> causal LM (transformers Qwen2).

Sequence layout, as LLaVA: [V visual tokens][question][answer]; the loss is on the answer
only. The embedded default builds every part from a config (random init); the cluster path
loads the LM and a CLIP vision tower with `from_pretrained` from a path in the grid YAML.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from tokenscale import compressors
from tokenscale.config import LLMSpec, TrialConfig, VisionSpec
from tokenscale.store import write_atomically

from . import benchmarks
from .benchmarks import VOCAB

log = logging.getLogger(__name__)

# What is cached and shared between trials (the pretrained tower, its patch features) is
# computed with this many torch threads, whoever computes it: a matmul's reduction order
# depends on the thread count, so a tower pretrained with 1 thread and one pretrained with
# 2 differ (by up to 0.61 in a weight, measured), and every trial's scores with them. The
# cache key cannot tell them apart, so the count is fixed here rather than taken from the
# trial that happens to build the file first (a `--threads 1` Tune trial, a debugging run
# with torch's default). 2: the trial that pretrains uses the core the trial waiting on
# the lock leaves idle (the demo's tower: 34.5 s against 48.6 s with 1 thread).
SHARED_CACHE_THREADS = 2


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count set to `count` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TinyViT(nn.Module):
    """A small ViT: (conv stem,) patchify, a CLS token, learned positions, encoder layers.

    With `stem_channels > 0` a 3x3 conv + GELU runs at full resolution before the patchify
    conv (an "early convolution" ViT): a tiny tower trained for seconds then sees strokes and
    edges instead of raw pixels, which OCR needs and which costs little on a CPU.
    """

    def __init__(self, spec: VisionSpec):
        super().__init__()
        dim = spec.hidden_size
        patchify = nn.Conv2d(spec.stem_channels or 3, dim, kernel_size=spec.patch_size, stride=spec.patch_size)
        if spec.stem_channels:
            stem: list[nn.Module] = [nn.Conv2d(3, spec.stem_channels, 3, padding=1), nn.GELU()]
            for _ in range(spec.stem_layers - 1):
                stem += [nn.Conv2d(spec.stem_channels, spec.stem_channels, 3, padding=1), nn.GELU()]
            self.patch = nn.Sequential(*stem, patchify)
        else:
            self.patch = patchify
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, spec.grid_tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, spec.heads, spec.mlp_ratio * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.hidden_size = dim

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.patch(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(images), -1, -1), patches], dim=1) + self.position
        hidden = self.norm(self.encoder(tokens))
        return hidden[:, 0], hidden[:, 1:]


# ---- the tiny tower's pretraining: our stand-in for CLIP ---------------------------------
#
# The paper's vision encoder is a pretrained CLIP, held fixed across the grid. A tiny tower
# trained from scratch inside a 15-second trial learns next to nothing (measured: even a
# direct per-task classifier stays near chance on shape/digits after 600 steps), so every
# trial would score chance. Instead the tower is pretrained once per VisionSpec on *dense
# scene labels* of a separate "pretrain" split: for every patch, which ink, which shape and
# which glyph cover it (soft targets: the fraction of the patch's pixels). That is "what is
# where", never a question or an answer: counting, spatial relations and reading the k-th
# character are still left to the compressor + LLM. The result is cached as a file keyed by
# everything that changes it, so the whole grid shares it; trials then fine-tune it.

_LABEL_CLASSES = (len(benchmarks.INK) + 1, len(benchmarks.SHAPES) + 1, len(benchmarks.GLYPHS) + 1)


def _pretrain_key(spec: VisionSpec, data_seed: int) -> str:
    # what the tower's pretraining depends on (not how its tokens are normalised or whether it stays frozen)
    fields = spec.model_dump(mode="json", exclude={"path", "freeze", "token_norm"})
    # the thread count it is built with is part of what it is (a tower cached before it was fixed
    # was built with the building trial's own count: a new key leaves such files unread)
    blob = json.dumps({"vision": fields, "data_seed": data_seed, "generator": benchmarks.GENERATOR_VERSION,
                       "threads": SHARED_CACHE_THREADS}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _patch_targets(labels: torch.Tensor, patch: int) -> list[torch.Tensor]:
    """labels [B, K, S, S] uint8 -> per kind [B, P, C_k]: each class's share of the patch."""
    out = []
    for kind, classes in enumerate(_LABEL_CLASSES):
        onehot = F.one_hot(labels[:, kind].long(), classes).permute(0, 3, 1, 2).float()
        out.append(F.avg_pool2d(onehot, patch).flatten(2).transpose(1, 2))
    return out


def pretrain_tower(spec: VisionSpec, data_seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train a TinyViT on dense scene labels; deterministic in (spec, data_seed), with
    SHARED_CACHE_THREADS threads whatever the caller's."""
    with torch_threads(SHARED_CACHE_THREADS):
        return _pretrain_tower(spec, data_seed)


def _pretrain_tower(spec: VisionSpec, data_seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    started = time.perf_counter()
    names = benchmarks.PRETRAIN_BENCHMARKS
    splits = [benchmarks.generate(b, "pretrain", spec.pretrain_examples, data_seed, spec.image_size) for b in names]
    images = torch.from_numpy(np.concatenate([sp.images for sp in splits]))
    labels = torch.from_numpy(np.concatenate([sp.labels for sp in splits]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data_seed)
        tower = TinyViT(spec)
        heads = nn.ModuleList(nn.Linear(spec.hidden_size, c) for c in _LABEL_CLASSES)
        params = [*tower.parameters(), *heads.parameters()]
        opt = torch.optim.AdamW(params, lr=spec.pretrain_lr, weight_decay=0.0)
        rng = np.random.default_rng([data_seed, 7])
        steps, batch = spec.pretrain_steps, spec.pretrain_batch
        warmup = max(1, steps // 20)
        loss_value = float("nan")
        for step in range(steps):
            scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            for group in opt.param_groups:
                group["lr"] = spec.pretrain_lr * scale
            index = torch.from_numpy(rng.integers(0, len(images), batch))
            _, patches = tower(images[index])
            targets = _patch_targets(labels[index], spec.patch_size)
            loss = sum(-(t * F.log_softmax(h(patches), -1)).sum(-1).mean() for h, t in zip(heads, targets, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            loss_value = loss.item()
    info = {"pretrain_loss": loss_value, "pretrain_seconds": time.perf_counter() - started}
    return tower.state_dict(), info


def pretrained_tower(spec: VisionSpec, data_seed: int) -> dict[str, torch.Tensor]:
    """The pretrained tower's weights, from the cache file if there (else trained and
    written atomically; a lock file keeps two concurrent trials from both training it)."""
    root = benchmarks.cache_dir()
    if root is None:
        return pretrain_tower(spec, data_seed)[0]
    path = os.path.join(root, "towers", f"tinyvit-{_pretrain_key(spec, data_seed)}.pt")

    def build():
        state, info = pretrain_tower(spec, data_seed)
        log.info("pretrained the vision tower in %.1fs (loss %.3f): %s", info["pretrain_seconds"], info["pretrain_loss"], path)
        return state

    return _locked_cache(path, build, lambda p: torch.load(p, map_location="cpu", weights_only=True), torch.save)


def _locked_cache(path: str, build, load, save):
    """`load(path)` if the file is there, else `build()`, written atomically with `save`;
    an exclusive lock file keeps two concurrent trials from both building it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = None
    try:
        import fcntl

        lock = open(path + ".lock", "w")  # noqa: SIM115 - held until the file exists
        fcntl.flock(lock, fcntl.LOCK_EX)
    except (ImportError, OSError):
        lock = None
    try:
        if os.path.exists(path):
            try:
                return load(path)
            except Exception:  # noqa: BLE001 - a corrupt file is rebuilt below
                pass
        value = build()
        try:
            write_atomically(path, lambda f: save(value, f))
        except OSError:
            pass  # a read-only or full disk only costs rebuilding next time
        return value
    finally:
        if lock is not None:
            lock.close()


@torch.no_grad()
def encode_images(tower: nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Patch features [n, P, D] float32 of a frozen tower (on whatever device it lives, in
    its dtype), in chunks of `batch` images: a CLIP-L/14-336 keeps every layer's hidden
    states for the penultimate one, ~60 MB an image in fp32."""
    was_training = tower.training
    tower.eval()
    parameter = next(tower.parameters())
    device, dtype = parameter.device, parameter.dtype
    out = [
        tower(torch.from_numpy(images[i : i + batch]).to(device, dtype))[1].float().cpu().numpy()
        for i in range(0, len(images), batch)
    ]
    tower.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0, 0), np.float32)


def split_features(tower: nn.Module, spec: VisionSpec, data_seed: int, split: benchmarks.Split, tag: str) -> np.ndarray:
    """A frozen tower's patch features of a whole split. For a pretrained tiny tower (a
    deterministic function of (spec, data_seed)) they are cached on disk next to the tower,
    keyed by the tower and the split (`tag`), so a grid encodes each image once."""
    root = benchmarks.cache_dir()
    if spec.path or spec.pretrain_steps <= 0:
        return encode_images(tower, split.images)

    def build() -> np.ndarray:
        # stored as float16: the trial that builds the file trains on the same rounded
        # features as every trial that reads it (results must not depend on a warm cache)
        with torch_threads(SHARED_CACHE_THREADS):
            return encode_images(tower, split.images).astype(np.float16).astype(np.float32)

    if root is None:
        return build()
    path = os.path.join(root, "features", f"{_pretrain_key(spec, data_seed)}-{tag}.npy")

    return _locked_cache(path, build, lambda p: np.load(p).astype(np.float32), lambda value, f: np.save(f, value.astype(np.float16)))


class CLIPTower(nn.Module):
    """A CLIP vision checkpoint; LLaVA takes the penultimate layer's patch tokens."""

    def __init__(self, path: str, dtype: torch.dtype | None = None):
        super().__init__()
        from transformers import CLIPVisionModel

        from .llava_data import local_dir  # s3:// checkpoints: fetched once into the local cache

        self.model = CLIPVisionModel.from_pretrained(local_dir(path), dtype=dtype)
        self.hidden_size = self.model.config.hidden_size

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model(pixel_values=images, output_hidden_states=True).hidden_states[-2]
        return hidden[:, 0], hidden[:, 1:]


def build_llm(spec: LLMSpec, vocab_size: int, dtype: torch.dtype | None = None, attention: str = "sdpa") -> Qwen2ForCausalLM:
    """The LM, in `dtype` as it loads (a 7B checkpoint never sits in fp32 when training in
    bf16), with the attention kernel `attention` (sdpa | eager)."""
    if spec.path:
        from .llava_data import local_dir  # s3:// checkpoints: fetched once into the local cache

        return Qwen2ForCausalLM.from_pretrained(local_dir(spec.path), dtype=dtype, attn_implementation=attention)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=spec.tie_embeddings,
        attn_implementation=attention,
    )
    llm = Qwen2ForCausalLM(config)
    return llm if dtype is None else llm.to(dtype)


def non_embedding_params(llm: nn.Module) -> int:
    """N in the scaling law: parameters outside the token embedding and the LM head."""
    embedding = {id(p) for p in llm.get_input_embeddings().parameters()}
    embedding |= {id(p) for p in llm.get_output_embeddings().parameters()}
    return sum(p.numel() for p in llm.parameters() if id(p) not in embedding)


class VLM(nn.Module):
    def __init__(self, trial: TrialConfig, dtype: torch.dtype | None = None):
        super().__init__()
        if trial.vision.path:
            self.vision: nn.Module = CLIPTower(trial.vision.path, dtype)
        else:
            self.vision = TinyViT(trial.vision)
            if trial.vision.pretrain_steps > 0:
                self.vision.load_state_dict(pretrained_tower(trial.vision, trial.data.data_seed))
        if trial.vision.frozen:
            self.vision.requires_grad_(False)
        self.llm = build_llm(trial.llm, len(VOCAB), dtype, trial.train.attention)
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
        # Per-feature standardization of the visual tokens over the batch. A tiny tower
        # trained from scratch emits patch features dominated by a constant (the background):
        # pooled to a few tokens, images differed by ~2% of the token's norm and the LM never
        # picked the signal up once it had learned the answer priors. BatchNorm rescales the
        # variation between images to O(1) from step one (eval uses the running statistics).
        # A learned position per visual token (after the norm): raster order under the LM's 1-D
        # RoPE hides which column a token is in; "left of" and "the k-th character" need it.
        if trial.vision.visual_norm == "batch":
            self.visual_norm: nn.Module = nn.BatchNorm1d(llm_dim)
            self.visual_position: nn.Parameter | None = nn.Parameter(torch.zeros(1, trial.visual_tokens, llm_dim))
        else:  # LLaVA's projector as it is: its output goes straight to the LM
            self.visual_norm = nn.Identity()
            self.visual_position = None

    @property
    def llm_params(self) -> int:
        return non_embedding_params(self.llm)

    def query_embedding(self, question_embeds: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """The LM's last hidden state of the question (QueCC's query), its left padding masked
        out. One pass per example; for a fixed question it is the same vector and can be cached."""
        out = self.llm.model(inputs_embeds=question_embeds, attention_mask=question_mask, position_ids=positions(question_mask))
        return out.last_hidden_state[:, -1]

    def prefix(
        self,
        images: torch.Tensor,
        questions: torch.Tensor,
        question_mask: torch.Tensor | None = None,
        heads: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings [head][visual][question] the answer follows, and their attention
        mask. `heads`: what a chat template puts before the image (system prompt, user
        header; none for the generated benchmarks); `image_mask` 0 masks a row's visual
        tokens out (a text-only conversation)."""
        if question_mask is None:
            question_mask = torch.ones_like(questions)
        embed = self.llm.get_input_embeddings()
        question_embeds = embed(questions)
        # images [B, 3, S, S], or a frozen tower's precomputed patch features [B, P, D]
        patches = images if images.dim() == 3 else self.vision(images)[1]
        query = self.query_embedding(question_embeds, question_mask) if self.compressor.uses_query else None
        visual = self.compressor(patches, query)
        visual = self.visual_norm(visual.transpose(1, 2)).transpose(1, 2)
        if self.visual_position is not None:
            visual = visual + self.visual_position
        visual = visual.to(question_embeds.dtype)
        visual_mask = torch.ones(visual.shape[:2], dtype=question_mask.dtype, device=visual.device)
        if image_mask is not None:
            visual_mask = visual_mask * image_mask[:, None].to(visual_mask.dtype)
        parts, masks = [visual, question_embeds], [visual_mask, question_mask]
        if heads is not None and heads.shape[1] > 0:
            parts.insert(0, embed(heads))
            masks.insert(0, torch.ones_like(heads) if head_mask is None else head_mask.to(question_mask.dtype))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    @torch.no_grad()
    def generate(
        self, images: torch.Tensor, questions: torch.Tensor, question_mask: torch.Tensor, max_new_tokens: int, eos_id: int,
        **prefix_inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Greedy decoding with the KV cache: [B, max_new_tokens] token ids, `eos_id` from
        each sequence's first <eos> on. Always `max_new_tokens` forward passes, so that the
        ranks of a ZeRO-3 group, which gather weights in every pass, stay in step.
        `prefix_inputs`: heads, head_mask, image_mask (see `prefix`)."""
        prefix, mask = self.prefix(images, questions, question_mask, **prefix_inputs)
        out = self.llm(inputs_embeds=prefix, attention_mask=mask, position_ids=positions(mask), use_cache=True)
        tokens, done = [], torch.zeros(len(prefix), dtype=torch.bool, device=prefix.device)
        for _ in range(max_new_tokens):
            next_token = out.logits[:, -1].argmax(-1)
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
            tokens.append(next_token)
            done |= next_token == eos_id
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.llm(
                input_ids=next_token[:, None], attention_mask=mask, position_ids=positions(mask)[:, -1:],
                past_key_values=out.past_key_values, use_cache=True,
            )
        return torch.stack(tokens, dim=1)

    def forward(
        self,
        images: torch.Tensor,
        questions: torch.Tensor,
        answers: torch.Tensor,
        question_mask: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        **prefix_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss over the answer tokens, logits at the answer positions [B, G, vocab]).

        The sequence is [head][visual][question][answer]. `question_mask` marks the real
        question tokens (0 on the left padding), `answer_mask` the answer tokens up to and
        including the first <eos> (0 on the padding after it): both are masked out of
        attention, the positions count real tokens only (as if the padding were not there),
        and the loss covers exactly the masked-in answer tokens, or those of `loss_mask`
        when given (a multi-turn conversation: the gpt turns, not the human ones).
        `prefix_inputs`: heads, head_mask, image_mask (see `prefix`)."""
        if answer_mask is None:
            answer_mask = torch.ones_like(answers)
        prefix, prefix_mask = self.prefix(images, questions, question_mask, **prefix_inputs)
        inputs = torch.cat([prefix, self.llm.get_input_embeddings()(answers)], dim=1)
        mask = torch.cat([prefix_mask, answer_mask.to(prefix_mask.dtype)], dim=1)
        hidden = self.llm.model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        # position t predicts token t+1: the answer is predicted from the token before it
        start = prefix.shape[1] - 1
        logits = self.llm.lm_head(hidden[:, start : start + answers.shape[1]])
        per_token = nn.functional.cross_entropy(logits.float().flatten(0, 1), answers.flatten(), reduction="none")
        weights = (answer_mask if loss_mask is None else loss_mask * answer_mask).flatten().to(per_token.dtype)
        loss = (per_token * weights).sum() / weights.sum().clamp(min=1)
        return loss, logits


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only the masked-in tokens: a left-padded sequence starts at 0
    at its first real token, and padding in the middle does not shift what follows."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
