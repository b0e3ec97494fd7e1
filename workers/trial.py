"""One trial's configuration: everything a worker needs, nothing about how it is scheduled.

The orchestrator expands a grid YAML into `TrialConfig`s; the worker receives one as a
plain dict (Ray passes it to every Train worker). `config_hash` covers exactly the fields
that change the trial's result, so a rerun of the same grid point maps to the same key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class LLMSpec:
    """A causal LM: a tiny Qwen2 built from its config (embedded) or a checkpoint path."""

    name: str
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    # Untied: with tied embeddings a 1-layer LM's last question token starts out predicting
    # itself and tiny models got stuck answering the prior; untied they learn in seconds.
    tie_embeddings: bool = False
    path: str | None = None  # HF from_pretrained directory (local or s3://): the cluster path


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower: a tiny ViT (embedded) or a CLIP checkpoint path."""

    image_size: int = 32
    patch_size: int = 4
    hidden_size: int = 48
    layers: int = 2
    heads: int = 4
    stem_channels: int = 0  # > 0: a 3x3 conv stem of this width before the patchify conv
    stem_layers: int = 1  # 3x3 convs in that stem
    mlp_ratio: int = 2
    token_norm: str = "batch"  # "batch": BatchNorm over the visual tokens' features; "none"
    # Tiny tower pretraining on dense scene labels (once per spec, cached; 0 = random init)
    pretrain_steps: int = 0
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    pretrain_examples: int = 2000  # per benchmark, from the "pretrain" split
    # Frozen tower, as in LLaVA (CLIP is never trained): patch features are then computed
    # once per split (cached on disk for a pretrained tower) and trials train only the
    # compressor + LM. None = frozen when pretrained or loaded from `path`, else trained.
    freeze: bool | None = None
    path: str | None = None

    @property
    def frozen(self) -> bool:
        return self.freeze if self.freeze is not None else bool(self.path or self.pretrain_steps > 0)

    @property
    def grid_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TrainSpec:
    zero_stage: int = 1
    micro_batch: int = 32
    stage1_steps: int = 30
    stage2_steps: int = 150
    stage1_lr: float = 2e-3
    stage2_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1  # of each stage's steps; then cosine decay to 0
    bf16: str = "auto"  # auto = on where the device supports it (GPU with bf16), else off


@dataclass(frozen=True)
class LlavaEvalSpec:
    """One eval set in LLaVA format, scored by exact match like the generated benchmarks."""

    name: str
    task_family: str  # reasoning | ocr: which law its error goes into
    path: str  # the JSON (local or s3://)
    image_folder: str | None = None  # default: the training data's image_folder
    chance: float = 0.0  # expected score of guessing, reported beside the score


@dataclass(frozen=True)
class LlavaSpec:
    """LLaVA-format data (JSON conversations + an image folder, local or s3://), tokenized
    with the LLM checkpoint's tokenizer; see workers/llava_data.py."""

    train: str
    image_folder: str
    eval: tuple[LlavaEvalSpec, ...] = ()
    max_question_tokens: int = 128  # longer questions keep their first tokens
    max_answer_tokens: int = 64  # answer + <eos>, cut to this many tokens


@dataclass(frozen=True)
class DataSpec:
    benchmarks: tuple[str, ...] = ("color", "shape", "count", "digits", "letters")
    train_examples: int = 2000
    eval_examples: int = 200
    data_seed: int = 1234  # the benchmark set; trial `seed` only changes init and order
    # LLaVA-format data instead of the generated benchmarks (which are then not used)
    llava: LlavaSpec | None = None


@dataclass(frozen=True)
class TrialConfig:
    grid: str
    llm: LLMSpec
    visual_tokens: int
    compressor: str
    seed: int = 0
    vision: VisionSpec = field(default_factory=VisionSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    data: DataSpec = field(default_factory=DataSpec)
    compressor_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrialConfig:
        nested = {"llm": LLMSpec, "vision": VisionSpec, "train": TrainSpec, "data": DataSpec}
        kwargs = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if f.name in nested and isinstance(value, dict):
                value = dict(value)
                if f.name == "data" and "benchmarks" in value:
                    value["benchmarks"] = tuple(value["benchmarks"])
                if f.name == "data" and isinstance(value.get("llava"), dict):
                    llava = dict(value["llava"])
                    llava["eval"] = tuple(LlavaEvalSpec(**e) for e in llava.get("eval", ()))
                    value["llava"] = LlavaSpec(**llava)
                value = nested[f.name](**value)
            kwargs[f.name] = value
        return cls(**kwargs)

    @property
    def config_hash(self) -> str:
        raw = self.to_dict()
        if raw["data"]["llava"] is None:
            del raw["data"]["llava"]  # a grid without LLaVA data hashes as it did before the field
        canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def trial_id(self) -> str:
        """Readable and unique within a grid."""
        return f"{self.llm.name}-v{self.visual_tokens}-{self.compressor}-s{self.seed}-{self.config_hash[:6]}"
