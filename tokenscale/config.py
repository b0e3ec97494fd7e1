"""The one typed config: a grid YAML and each of its trials, from file to result row.

One path: YAML -> `Grid` (validated in full: types, ranges, cross-field rules, compressor
options against the compressor's own constructor, paths that must exist) -> `TrialConfig`
per grid point -> the plain dict a worker receives (`TrialConfig.to_dict()`) ->
`TrialConfig.model_validate` in the worker. Every error names the field
(`llms[2].hidden_size`), what is wrong and what is accepted, before any trial starts.

Torch- and Ray-free: `tokenscale plan`, `schema`, `status` and the CLI's start-up import it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from tokenscale import compressors
from tokenscale.costs import inference_flops, training_flops
from tokenscale.store import check_name
from tokenscale.workers.benchmarks import BENCHMARKS, GENERATOR_VERSION, VOCAB

TASK_FAMILIES = ("reasoning", "ocr")


class GridError(ValueError):
    """A grid YAML that cannot run; the message names the field and the fix."""


def _number(value: Any) -> Any:
    """A float field takes ints and floats, and strings YAML leaves unparsed (PyYAML reads
    `1e-3` as a string), but not true/false."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


Number = Annotated[float, BeforeValidator(_number)]
PositiveNumber = Annotated[float, Field(gt=0), BeforeValidator(_number)]
Name = Annotated[StrictStr, BeforeValidator(lambda v: check_name("name", v) if isinstance(v, str) else v)]


class Model(BaseModel):
    """Frozen, unknown keys rejected, ints strict (0.5 is not a seed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- one trial --------------------------------------------------------------------------


class LLMSpec(Model):
    """A causal LM: a tiny Qwen2 built from its config (embedded) or a checkpoint path."""

    name: Name
    hidden_size: StrictInt = Field(64, ge=1)
    layers: StrictInt = Field(2, ge=1)
    heads: StrictInt = Field(4, ge=1)
    kv_heads: StrictInt = Field(2, ge=1)
    intermediate_size: StrictInt = Field(128, ge=1)
    # Untied: with tied embeddings a 1-layer LM's last question token starts out predicting
    # itself and tiny models got stuck answering the prior; untied they learn in seconds.
    tie_embeddings: StrictBool = False
    path: StrictStr | None = Field(None, description="HF from_pretrained folder (local or s3://): the cluster path")
    params: PositiveNumber | None = Field(
        None,
        description="N as the model is named (e.g. 0.5e9 for Qwen-1.5-0.5B), the N the paper's "
        "law is fitted on; default: the counted total",
    )
    holdout: StrictBool = Field(
        False,
        description="train and evaluate this LLM but leave it out of the fit: `fit` reports its observed error "
        "against the law's prediction (the paper checked its law on Qwen-1.5-14B so)",
    )

    @model_validator(mode="after")
    def _shape(self) -> LLMSpec:
        if not self.path and (self.hidden_size % self.heads or self.heads % self.kv_heads):
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads}) "
                f"and heads by kv_heads ({self.kv_heads})"
            )
        return self


class VisionSpec(Model):
    """The vision tower: a tiny ViT (embedded) or a CLIP checkpoint path."""

    image_size: StrictInt = Field(32, ge=1)
    patch_size: StrictInt = Field(4, ge=1)
    hidden_size: StrictInt = Field(48, ge=1)
    layers: StrictInt = Field(2, ge=1)
    heads: StrictInt = Field(4, ge=1)
    stem_channels: StrictInt = Field(0, ge=0, description="> 0: a 3x3 conv stem of this width before the patchify conv")
    stem_layers: StrictInt = Field(1, description="3x3 convs in that stem")
    mlp_ratio: StrictInt = Field(2, ge=1)
    # BatchNorm + a learned position over the visual tokens (what a tiny tower trained from
    # scratch needs), or none (LLaVA's projector); auto = batch for the tiny tower, none for
    # a checkpoint tower
    token_norm: Literal["auto", "batch", "none"] = "auto"
    # Tiny tower pretraining on dense scene labels (once per spec, cached; 0 = random init)
    pretrain_steps: StrictInt = Field(0, ge=0)
    pretrain_batch: StrictInt = Field(64, ge=1)
    pretrain_lr: Number = Field(3e-3, gt=0)
    pretrain_examples: StrictInt = Field(2000, ge=1, description="per benchmark, from the 'pretrain' split")
    # Frozen tower, as in LLaVA (CLIP is never trained): patch features are then computed
    # once per split and trials train only the compressor + LM. None = frozen when
    # pretrained or loaded from `path`, else trained.
    freeze: StrictBool | None = None
    path: StrictStr | None = None

    @model_validator(mode="after")
    def _geometry(self) -> VisionSpec:
        if self.image_size % self.patch_size:
            raise _at("patch_size", f"{self.patch_size} must divide image_size ({self.image_size})")
        if self.path:
            return self
        if self.hidden_size % self.heads:
            raise _at("heads", f"{self.heads} must divide hidden_size ({self.hidden_size})")
        if self.stem_layers < 1:
            raise _at("stem_layers", f"must be >= 1, got {self.stem_layers} (set stem_channels: 0 for no stem)")
        return self

    @property
    def visual_norm(self) -> str:
        """The resolved token_norm: batch | none."""
        return self.token_norm if self.token_norm != "auto" else ("none" if self.path else "batch")

    @property
    def frozen(self) -> bool:
        return self.freeze if self.freeze is not None else bool(self.path or self.pretrain_steps > 0)

    @property
    def grid_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


ZeroStage = Literal[0, 1, 2, 3]


class TrainSpec(Model):
    """Both LLaVA stages. Stage 1 trains the compressor (LM frozen), stage 2 compressor + LM.

    A global batch is the examples of one optimizer step over all workers: each worker runs
    global ÷ (micro_batch × workers) micro-batches per step (gradient accumulation), so a
    trial's result does not depend on how many workers it had."""

    zero_stage: ZeroStage | None = Field(None, description="sets stage1_zero_stage and stage2_zero_stage")
    stage1_zero_stage: ZeroStage = 1
    stage2_zero_stage: ZeroStage = 1
    micro_batch: StrictInt = Field(32, ge=1, description="examples per forward/backward on one worker")
    global_batch: StrictInt | None = Field(None, ge=1, description="sets stage1_global_batch and stage2_global_batch")
    stage1_global_batch: StrictInt = Field(0, ge=0, description="examples per optimizer step, all workers; 0: micro_batch")
    stage2_global_batch: StrictInt = Field(0, ge=0, description="examples per optimizer step, all workers; 0: micro_batch")
    stage1_steps: StrictInt = Field(30, ge=0)
    stage2_steps: StrictInt = Field(150, ge=1)
    stage1_lr: Number = Field(2e-3, gt=0, lt=1)
    stage2_lr: Number = Field(1e-3, gt=0, lt=1)
    weight_decay: Number = Field(0.0, ge=0)
    warmup_fraction: Number = Field(0.1, ge=0, le=1, description="of each stage's steps; then cosine decay to 0")
    bf16: Literal["auto", "on", "off"] = "auto"  # auto = on where the device supports it
    checkpoint_every: StrictInt = Field(
        0, ge=0, description="optimizer steps between checkpoints in both stages (0: only at the end of stage 1)",
    )
    report_every: StrictInt = Field(
        10, ge=0,
        description="optimizer steps between progress reports (stage, step, loss: the trial's training curve, stored "
        "beside its result, and what `tokenscale status` shows of a running trial); 0: none",
    )
    gradient_checkpointing: StrictBool = Field(False, description="recompute the LM's activations in backward")
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="the LM's attention kernel")
    keep_final: StrictBool = Field(
        False,
        description="keep the trial's final trainable weights (compressor + LM) in the store, so that "
        "`tokenscale eval` can score it on eval sets added later",
    )

    @model_validator(mode="before")
    @classmethod
    def _both_stages(cls, raw: Any) -> Any:
        """`zero_stage` and `global_batch` set both stages; a stage's own field wins."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for shared, valid in (("zero_stage", lambda v: v in (0, 1, 2, 3)), ("global_batch", lambda v: v >= 1)):
            value = raw.get(shared)
            # an invalid value stays where it was written, so the error names that field
            if type(value) is int and valid(value):
                del raw[shared]
                for stage in ("stage1_", "stage2_"):
                    raw.setdefault(stage + shared, value)
        return raw

    def global_batch_of(self, stage: int) -> int:
        return (self.stage1_global_batch if stage == 1 else self.stage2_global_batch) or self.micro_batch

    def zero_stage_of(self, stage: int) -> int:
        return self.stage1_zero_stage if stage == 1 else self.stage2_zero_stage

    def accumulation(self, stage: int, workers: int) -> int:
        """Micro-batches per worker per optimizer step; ValueError naming the fields when the
        global batch does not split evenly over the workers."""
        global_batch, per_pass = self.global_batch_of(stage), self.micro_batch * workers
        if global_batch % per_pass:
            lower, upper = (global_batch // per_pass) * per_pass, (global_batch // per_pass + 1) * per_pass
            nearest = " or ".join(str(v) for v in (lower, upper) if v > 0)
            raise ValueError(
                f"stage{stage}_global_batch: {global_batch} examples per step do not split into micro_batch "
                f"({self.micro_batch}) x {workers} worker(s); use a multiple of {per_pass} (nearest: {nearest}), "
                "or change micro_batch"
            )
        return global_batch // per_pass


EVAL_METRICS = ("vqa", "exact", "multiple_choice", "yes_no", "anls", "relaxed")  # workers/metrics.py SET_METRICS


class LlavaEvalSpec(Model):
    """One eval set in LLaVA format: answers generated greedily, scored by the set's metric."""

    name: Name
    task_family: Literal[TASK_FAMILIES]  # which law its error goes into
    path: StrictStr  # the JSON (local or s3://)
    image_folder: StrictStr | None = None  # default: the training data's image_folder
    chance: Number = Field(0.0, ge=0, lt=1, description="expected score of guessing, reported beside the score")
    metric: Literal[EVAL_METRICS] = Field(
        "exact",
        description="vqa (VQAv2/TextVQA accuracy), exact (GQA), multiple_choice (MMBench, ScienceQA), "
        "yes_no (POPE: F1), anls (DocVQA), relaxed (ChartQA)",
    )
    prompt_suffix: StrictStr = Field(
        "", description="appended to every question, e.g. 'Answer the question using a single word or phrase.'",
    )
    max_new_tokens: StrictInt = Field(16, ge=1, description="greedy decoding stops here or at <eos>")


def _unique_eval_names(evals: tuple[LlavaEvalSpec, ...]) -> None:
    """Eval sets are told apart by name (their result rows' `benchmark`)."""
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        raise _at("eval", f"names must be unique, got {names}")


LLAVA_TEMPLATES = ("auto", "chat", "plain", "none")


class LlavaStageSpec(Model):
    """One stage's LLaVA data: LLaVA trains stage 1 on the 558k caption pairs and stage 2 on
    the 665k instruction mix."""

    path: StrictStr = Field(description="the JSON (local or s3://)")
    image_folder: StrictStr | None = Field(None, description="default: data.llava.image_folder")
    epochs: Number | None = Field(None, gt=0, description="passes over the data; sets the stage's optimizer steps")
    steps: StrictInt | None = Field(None, ge=0, description="optimizer steps; default train.stage{1,2}_steps")
    template: Literal[LLAVA_TEMPLATES] | None = Field(
        None,
        description="plain: the image, then the first gpt turn (LLaVA's caption pretraining; stage 1's default); "
        "chat: the tokenizer's chat template, the image where <image> stands, every gpt turn trained; "
        "none: turns joined by newlines; auto (stage 2's default): chat when the tokenizer has a chat template, "
        "else none",
    )

    @model_validator(mode="after")
    def _one_length(self) -> LlavaStageSpec:
        if self.epochs is not None and self.steps is not None:
            raise _at("epochs", f"give epochs or steps, not both (got epochs={self.epochs}, steps={self.steps})")
        return self


class LlavaSpec(Model):
    """LLaVA-format data (JSON conversations + an image folder, local or s3://), tokenized
    with the LLM checkpoint's tokenizer and streamed; see workers/llava_data.py."""

    train: StrictStr | None = Field(None, description="one JSON for both stages (when stage1 / stage2 are not given)")
    image_folder: StrictStr | None = Field(None, description="the images of every JSON that names no folder of its own")
    stage1: LlavaStageSpec | None = None
    stage2: LlavaStageSpec | None = None
    eval: tuple[LlavaEvalSpec, ...] = Field(min_length=1)
    image_aspect: Literal["pad", "crop"] = Field(
        "pad", description="pad: pad to a square with the processor's mean colour first (LLaVA-1.5); crop: the processor's own",
    )
    max_question_tokens: StrictInt = Field(128, ge=1, description="the prompt before the first answer keeps its first tokens")
    max_answer_tokens: StrictInt = Field(
        64, ge=1, description="the conversation after the prompt (every later turn; answers end with <eos>), cut here",
    )
    loader_workers: StrictInt = Field(
        1, ge=0, description="processes that read, decode and tokenize ahead of training (0: in the training process)",
    )

    @model_validator(mode="after")
    def _unique(self) -> LlavaSpec:
        _unique_eval_names(self.eval)
        for number in (1, 2):
            stage = self.stage(number)
            if stage is None:
                raise _at(
                    f"stage{number}",
                    f"no data for stage {number}: give data.llava.stage{number} {{path: JSON, image_folder: DIR}} "
                    "or data.llava.train (one JSON for both stages)",
                )
            if stage.image_folder is None:
                raise _at(f"stage{number}.image_folder", "no image folder: give it here or as data.llava.image_folder")
        for i, ev in enumerate(self.eval):
            if ev.image_folder is None and self.image_folder is None:
                raise _at(f"eval[{i}].image_folder", "no image folder: give it here or as data.llava.image_folder")
        return self

    def stage(self, number: int) -> LlavaStageSpec | None:
        """Stage `number`'s data with the defaults filled in (folder, template)."""
        given = self.stage1 if number == 1 else self.stage2
        if given is None:
            if self.train is None:
                return None
            given = LlavaStageSpec(path=self.train)
        return given.model_copy(update={
            "image_folder": given.image_folder or self.image_folder,
            "template": given.template or ("plain" if number == 1 else "auto"),
        })


class DataSpec(Model):
    benchmarks: tuple[Literal[tuple(BENCHMARKS)], ...] = Field(("color", "shape", "count", "digits", "letters"), min_length=1)
    train_examples: StrictInt = Field(2000, ge=1)
    eval_examples: StrictInt = Field(200, ge=1)
    data_seed: StrictInt = Field(1234, description="the benchmark set; trial `seed` only changes init and order")
    llava: LlavaSpec | None = Field(None, description="LLaVA-format data instead of the generated benchmarks")


def _check_compressor(name: str, options: dict[str, Any], grid_tokens: int, budgets: tuple[int, ...]) -> None:
    """Raise ValueError naming the sub-field when the compressor cannot be built."""
    if name not in compressors.names():
        raise ValueError(f"unknown compressor {name!r}; choose from {', '.join(compressors.names())}")
    try:
        compressors.check_options(name, options)
    except ValueError as err:
        raise ValueError(f"options.{err}") from None
    for tokens in budgets:
        compressors.check_budget(name, grid_tokens, tokens)


class TrialConfig(Model):
    """Everything a worker needs for one grid point, nothing about how it is scheduled.
    `config_hash` covers exactly the fields that change the trial's result."""

    grid: Name
    llm: LLMSpec
    visual_tokens: StrictInt = Field(ge=1)
    compressor: StrictStr
    seed: StrictInt = 0
    vision: VisionSpec = VisionSpec()
    train: TrainSpec = TrainSpec()
    data: DataSpec = DataSpec()
    compressor_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _buildable(self) -> TrialConfig:
        _check_compressor(self.compressor, self.compressor_options, self.vision.grid_tokens, (self.visual_tokens,))
        return self

    def to_dict(self) -> dict[str, Any]:
        """What a worker receives: plain JSON-able data."""
        return self.model_dump(mode="json")

    @property
    def config_hash(self) -> str:
        raw = self.to_dict()
        # fields added after results were stored hash as before while they are unset
        if raw["data"]["llava"] is None:
            del raw["data"]["llava"]
            # generated benchmarks: what their generator draws, and the vocabulary it encodes
            # with (its size shapes every embedded LLM), are part of what the trial computes
            raw["data"]["generator"] = GENERATOR_VERSION
        else:
            raw["data"]["llava"].pop("loader_workers", None)  # how the data is read, not what
        if raw["llm"]["params"] is None:
            del raw["llm"]["params"]
        raw["llm"].pop("holdout", None)  # how the result is used, not what it is
        # how a trial is run, not what it computes
        for key in ("checkpoint_every", "report_every", "gradient_checkpointing", "zero_stage", "global_batch", "keep_final"):
            raw["train"].pop(key, None)
        canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def trial_id(self) -> str:
        """Readable and unique within a grid."""
        return f"{self.llm.name}-v{self.visual_tokens}-{self.compressor}-s{self.seed}-{self.config_hash[:6]}"


# ---- the grid: scheduling around the trials ---------------------------------------------


class CompressorSpec(Model):
    name: StrictStr = Field(json_schema_extra={"enum": compressors.names()})
    options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the compressor's constructor")


# A compressor may be given as a bare name (`compressors: [avgpool, quecc]`).
CompressorEntry = Annotated[
    CompressorSpec,
    BeforeValidator(lambda v: {"name": v} if isinstance(v, str) else v, json_schema_input_type=CompressorSpec | Literal[tuple(compressors.names())]),
]


class Band(Model):
    """Resources for LLMs of at most `max_params` non-embedding parameters, or for the LLMs
    named in `llms` (for checkpoints that cannot be sized before they load, e.g. on S3)."""

    max_params: PositiveNumber | None = Field(None, description="no limit when unset")
    llms: tuple[StrictStr, ...] = ()
    workers: StrictInt = Field(1, ge=1)
    cpus_per_worker: Number = Field(1, gt=0)
    gpus_per_worker: Number = Field(0, ge=0)


class NodeType(Model):
    """The largest node a trial's worker can land on (what a bundle must fit in)."""

    cpus: Number = Field(gt=0)
    gpus: Number = Field(0, ge=0)


class Resources(Model):
    workers: StrictInt = Field(1, ge=1, description="Ray Train workers per trial (data parallel)")
    cpus_per_worker: Number = Field(1, gt=0)
    gpus_per_worker: Number = Field(0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # of one trial's workers
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto = nccl when GPUs are asked for, else gloo
    # Where a trial's training runs. `workers`: a Ray Train TorchTrainer worker group
    # (actors, placement group, process group; Train's retries from the last checkpoint).
    # `in_trial`: a world of one inside the Tune trial's own process, which Tune reuses for
    # the next trial: no worker group to start and no imports to repeat per trial (on 2
    # CPU cores that start-up was ~30 s a trial); Tune's retries, same stage checkpoints.
    # auto = in_trial for one CPU-only worker, else workers.
    execution: Literal["auto", "in_trial", "workers"] = "auto"
    # Size bands, smallest first: an LLM takes the first band whose max_params >= its size;
    # larger LLMs than every band (or of unknown size) take the defaults above.
    bands: tuple[Band, ...] = ()
    # The node types of the cluster; default: this machine (local runs) — used to reject a
    # per-worker request that no node can satisfy, before anything starts.
    node_types: tuple[NodeType, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Resources:
        if self.execution == "in_trial":
            counts = [("workers", self.workers)] + [(f"bands[{i}].workers", b.workers) for i, b in enumerate(self.bands)]
            for where, workers in counts:
                if workers != 1:
                    raise _at(where, "in_trial runs one process; set workers: 1 or resources.execution: workers")
        limits = [b.max_params for b in self.bands if not b.llms]
        if None in limits[:-1] or limits != sorted(limits, key=lambda x: float("inf") if x is None else x) or len(set(limits)) != len(limits):
            raise _at("bands", f"max_params must increase strictly from band to band, got {limits}")
        return self

    def for_llm(self, llm: LLMSpec) -> dict[str, Any]:
        params = estimate_llm_params(llm)
        for band in self.bands:
            fits = params is not None and (band.max_params is None or params <= band.max_params)
            if llm.name in band.llms or (not band.llms and fits):
                return self._shape(band.workers, band.cpus_per_worker, band.gpus_per_worker)
        return self._shape(self.workers, self.cpus_per_worker, self.gpus_per_worker)

    def _shape(self, workers: int, cpus: float, gpus: float) -> dict[str, Any]:
        backend = self.backend if self.backend != "auto" else ("nccl" if gpus > 0 else "gloo")
        execution = self.execution
        if execution == "auto":
            execution = "in_trial" if workers == 1 and gpus == 0 else "workers"
        return {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
                "placement_strategy": self.placement_strategy, "backend": backend, "execution": execution}


# ---- experiment trackers: Ray Tune's own logger callbacks, in the driver -----------------


class WandbSpec(Model):
    """Weights & Biases: one W&B run per trial (Ray Tune's WandbLoggerCallback), its metrics
    as Tune sees them. The API key comes from the environment (WANDB_API_KEY) or `wandb
    login`, never from the grid."""

    project: StrictStr = Field(min_length=1)
    entity: StrictStr | None = Field(None, description="the W&B team or user; default: the API key's own")
    group: StrictStr | None = Field(None, description="the runs' W&B group; default: the grid's name")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None,
        description="offline: runs are written locally only (`wandb sync` uploads them later); default: "
        "WANDB_MODE from the environment, else online",
    )
    dir: StrictStr | None = Field(
        None,
        description="the folder W&B writes its run folders into (<dir>/wandb/), on the driver's machine; "
        "required offline. Default: each trial's folder in Ray's staging directory (/tmp/ray/session_*/), "
        "which Ray copies beside the trial's result files, but the last trials' copies can be cut short",
    )

    @model_validator(mode="after")
    def _offline_dir(self) -> WandbSpec:
        if self.mode == "offline" and self.dir is None:
            raise _at(
                "dir",
                "required with mode: offline (the runs are only their files, for `wandb sync` later): give a "
                "folder on the driver's machine",
            )
        return self


_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class MlflowSpec(Model):
    """MLflow: one MLflow run per trial (Ray Tune's MLflowLoggerCallback, in the driver),
    the trial's config as params and its reports as metrics. Credentials come from the
    environment (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME / _PASSWORD)."""

    tracking_uri: StrictStr = Field(
        min_length=1,
        description="an MLflow server (http(s)://...), a database (sqlite:///mlflow.db; needs SQLAlchemy and "
        "Alembic) or a local folder (file:///...)",
    )
    experiment_name: StrictStr | None = Field(None, description="default: the grid's name")

    @model_validator(mode="after")
    def _no_secret(self) -> MlflowSpec:
        from urllib.parse import urlsplit

        if urlsplit(self.tracking_uri).password:
            raise _at(
                "tracking_uri",
                "holds a password; the grid is saved beside its results and shown in logs: give the URI without "
                "it and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                "in the driver's environment",
            )
        return self

    @property
    def scheme(self) -> str:
        """file (a local folder, with or without file://), http(s), a database's, ..."""
        from urllib.parse import urlsplit

        scheme = urlsplit(self.tracking_uri).scheme.split("+")[0]
        return "file" if len(scheme) <= 1 else scheme  # a drive letter (C:) is a folder too


class TrackingSpec(Model):
    """Experiment trackers the trials report to, besides the store (which stays the record).
    How a grid is watched, not what a trial computes: no trial's config hash depends on it."""

    wandb: WandbSpec | None = None
    mlflow: MlflowSpec | None = None


def check_tracking(grid: Grid) -> None:
    """The packages the grid's trackers need, installed here: Ray's logger callbacks run in
    the driver (W&B's in an actor on the driver's node). A GridError naming the field and the
    fix, before anything starts; nothing is imported."""
    import importlib.util

    def found(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ValueError:  # imported already, without a spec
            return True

    def installed(*modules: str) -> bool:
        return all(found(m) for m in modules)

    for name in ("wandb", "mlflow"):
        if getattr(grid.tracking, name) is not None and not installed(name):
            raise GridError(
                f"tracking.{name}: the {name} package is not installed; pip install 'tokenscale[{name}]' "
                f"(or drop tracking.{name} from the grid)"
            )
    mlflow = grid.tracking.mlflow
    if mlflow is not None and mlflow.scheme in _DATABASE_SCHEMES and not installed("sqlalchemy", "alembic"):
        raise GridError(
            f"tracking.mlflow.tracking_uri: a database URI ({mlflow.scheme}) needs SQLAlchemy and Alembic, which "
            "tokenscale[mlflow] (mlflow-skinny) does not install; pip install sqlalchemy alembic, or log to an "
            "MLflow server (http(s)://...)"
        )


class Grid(Model):
    """A grid YAML: LLMs x visual-token budgets x compressors x seeds, and how to run it."""

    grid: Name
    llms: tuple[LLMSpec, ...] = Field(min_length=1)
    visual_tokens: tuple[Annotated[StrictInt, Field(ge=1)], ...] = Field(min_length=1)
    compressors: tuple[CompressorEntry, ...] = Field(min_length=1)
    seeds: tuple[StrictInt, ...] = Field((0,), min_length=1)
    vision: VisionSpec = VisionSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    resources: Resources = Resources()
    max_concurrent_trials: StrictInt = Field(2, ge=1)
    max_failures: StrictInt = Field(1, ge=0)
    tracking: TrackingSpec = Field(
        TrackingSpec(), description="experiment trackers (W&B, MLflow) that every trial reports to",
    )

    @model_validator(mode="after")
    def _cross_fields(self) -> Grid:
        names = [llm.name for llm in self.llms]
        if len(set(names)) != len(names):
            raise _at("llms", f"names must be unique, got {names}")
        if len(set(self.visual_tokens)) != len(self.visual_tokens):
            raise _at("visual_tokens", f"duplicates in {list(self.visual_tokens)}")
        for i, band in enumerate(self.resources.bands):
            for name in band.llms:
                if name not in names:
                    raise _at(f"resources.bands[{i}].llms", f"{name!r} is not an LLM of this grid ({', '.join(names)})")
        for i, comp in enumerate(self.compressors):
            if comp.name not in compressors.names():
                raise _at(f"compressors[{i}]", f"unknown compressor {comp.name!r}; choose from {', '.join(compressors.names())}")
            try:
                compressors.check_options(comp.name, comp.options)
            except ValueError as err:
                raise _at(f"compressors[{i}].options.{str(err).split(':', 1)[0]}", str(err).split(": ", 1)[1]) from None
            for tokens in self.visual_tokens:
                try:
                    compressors.check_budget(comp.name, self.vision.grid_tokens, tokens)
                except ValueError as err:
                    raise _at("visual_tokens", str(err)) from None
        for i, llm in enumerate(self.llms):
            if llm.path:
                _check_local(f"llms[{i}].path", llm.path, folder=True, fix="give a HF from_pretrained folder (local or s3://)")
        fitted = [llm.name for llm in self.llms if not llm.holdout]
        if len(fitted) < 2 and any(llm.holdout for llm in self.llms):
            raise _at("llms", f"holdout leaves {len(fitted)} LLM(s) to fit the law on ({', '.join(fitted) or 'none'}); "
                      "a law in N needs at least two: hold out fewer")
        if self.vision.path:
            _check_local("vision.path", self.vision.path, folder=True, fix="give a HF from_pretrained folder (local or s3://)")
            _check_vision_checkpoint(self.vision)
        _check_llava(self)
        _check_nodes(self.resources)
        for i, llm in enumerate(self.llms):
            workers = self.resources.for_llm(llm)["workers"]
            for stage in (1, 2):
                try:
                    self.train.accumulation(stage, workers)
                except ValueError as err:
                    raise _at(f"train.{err}".split(": ", 1)[0], f"{str(err).split(': ', 1)[1]} (llms[{i}] {llm.name!r} "
                              f"runs on {workers} worker(s))") from None
            if workers > 1 and self.vision.visual_norm == "batch":
                raise _at(
                    "vision.token_norm",
                    f"batch keeps per-worker BatchNorm statistics, but llms[{i}] {llm.name!r} trains on {workers} "
                    "workers; set vision.token_norm: none (LLaVA's projector) or run it on one worker",
                )
        return self

    @property
    def name(self) -> str:
        return self.grid

    def trials(self) -> list[TrialConfig]:
        """Every grid point, in the order they are scheduled: alternately the smallest and
        the largest remaining LLM, so the first results come back early (smallest first)
        and the longest trials start early too instead of waiting behind every small one."""
        llms = sorted(self.llms, key=_llm_size)
        llms = [llms[i // 2] if i % 2 == 0 else llms[-1 - i // 2] for i in range(len(llms))]
        return [
            TrialConfig(
                grid=self.grid, llm=llm, visual_tokens=tokens, compressor=comp.name, seed=seed,
                vision=self.vision, train=self.train, data=self.data, compressor_options=dict(comp.options),
            )
            for llm, tokens, comp, seed in itertools.product(llms, self.visual_tokens, self.compressors, self.seeds)
        ]


# ---- sizes and costs, before anything is built -------------------------------------------


def _llm_dims(llm: LLMSpec) -> dict[str, Any] | None:
    """hidden, layers, heads, kv_heads, intermediate, vocab (None when unknown) of the LM, from
    its spec or its config.json (None for a checkpoint we cannot read here, e.g. on s3://)."""
    if llm.path:
        config_file = Path(llm.path) / "config.json"
        if not config_file.is_file():
            return None
        cfg = json.loads(config_file.read_text())
        cfg = cfg.get("text_config", cfg)
        return {
            "hidden": cfg["hidden_size"], "layers": cfg["num_hidden_layers"], "heads": cfg["num_attention_heads"],
            "kv_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]), "inter": cfg["intermediate_size"],
            "vocab": cfg.get("vocab_size"), "tied": bool(cfg.get("tie_word_embeddings", False)),
        }
    return {"hidden": llm.hidden_size, "layers": llm.layers, "heads": llm.heads, "kv_heads": llm.kv_heads,
            "inter": llm.intermediate_size, "vocab": None, "tied": llm.tie_embeddings}


def estimate_llm_params(llm: LLMSpec) -> float | None:
    """Non-embedding parameters of a Qwen2-style LM, from its spec or its config.json
    (None for a checkpoint we cannot read here, e.g. on s3://)."""
    dims = _llm_dims(llm)
    if dims is None:
        return None
    hidden, layers, heads, kv_heads, inter = dims["hidden"], dims["layers"], dims["heads"], dims["kv_heads"], dims["inter"]
    kv_dim = kv_heads * (hidden // heads)
    attention = hidden * hidden + hidden + 2 * (hidden * kv_dim + kv_dim) + hidden * hidden  # q(+b) k,v(+b) o
    mlp = 3 * hidden * inter
    return float(layers * (attention + mlp + 2 * hidden) + hidden)  # + 2 norms per layer, final norm


def _llm_size(llm: LLMSpec) -> float:
    if llm.params is not None:
        return llm.params
    params = estimate_llm_params(llm)
    return float("inf") if params is None else params


def planned_llm_params(llm: LLMSpec, vocab_size: int | None = None) -> float | None:
    """N as the law will use it, before the model is built: the declared `params`, else the
    counted total (non-embedding + embeddings when the vocabulary is known: a checkpoint's
    own, else `vocab_size`, else the generated benchmarks' for a tiny LLM)."""
    if llm.params is not None:
        return llm.params
    dims, non_embedding = _llm_dims(llm), estimate_llm_params(llm)
    if dims is None or non_embedding is None:
        return None
    vocab = dims["vocab"] or vocab_size or (None if llm.path else len(VOCAB))
    if vocab is None:
        return non_embedding
    return non_embedding + vocab * dims["hidden"] * (1 if dims["tied"] else 2)


def _tokens_per_example(trial: TrialConfig) -> float:
    """Sequence length of one training example: visual tokens + question + answer (the
    generated benchmarks' questions and answers are a few words; LLaVA's are capped)."""
    llava = trial.data.llava
    text = (llava.max_question_tokens + llava.max_answer_tokens) if llava else 16
    return float(trial.visual_tokens + text)


def planned_stage_steps(trial: TrialConfig, number: int) -> int | None:
    """Stage `number`'s optimizer steps as the grid fixes them: the LLaVA stage's own
    `steps`, else the train section's; None when the stage is given in `epochs` (the
    worker counts the examples: workers/llava_data.py's stage_steps)."""
    steps = trial.train.stage1_steps if number == 1 else trial.train.stage2_steps
    stage = trial.data.llava.stage(number) if trial.data.llava is not None else None
    if stage is not None and stage.epochs is not None:
        return None
    return stage.steps if stage is not None and stage.steps is not None else steps


def trial_training_flops(trial: TrialConfig) -> float | None:
    """≈ 6·N·tokens over both stages (stage 1 trains only the compressor, but its forward
    and backward run through the whole LM); the same on any number of workers."""
    params = planned_llm_params(trial.llm)
    if params is None:
        return None
    train = trial.train
    steps = {number: planned_stage_steps(trial, number) for number in (1, 2)}
    if None in steps.values():
        return None  # steps = epochs x examples / batch: the examples are counted by the worker
    examples = steps[1] * train.global_batch_of(1) + steps[2] * train.global_batch_of(2)
    return training_flops(params, examples * _tokens_per_example(trial))


def trial_inference_flops(trial: TrialConfig, text_tokens: float = 0.0) -> float | None:
    """One query at Q = `text_tokens` (0: a cached query), no generated tokens."""
    params = planned_llm_params(trial.llm)
    if params is None:
        return None
    return float(inference_flops(params, text_tokens, trial.visual_tokens, 0.0, trial.compressor))


# ---- checks that look outside the document ----------------------------------------------


def _at(where: str, message: str) -> ValueError:
    """An error whose message starts with the field path (kept when pydantic wraps it)."""
    return ValueError(f"@{where}: {message}")


def _check_local(where: str, path: str, folder: bool, fix: str = "give an existing local path or an s3:// URI") -> None:
    """A file or folder that must exist. s3:// ones are checked by the worker that fetches
    them: the driver may have no credentials."""
    if path.startswith("s3://"):
        return
    kind, ok = ("folder", os.path.isdir(path)) if folder else ("file", os.path.isfile(path))
    if not ok:
        raise _at(where, f"{path!r} is not a {kind}; {fix}")


def _check_vision_checkpoint(vision: VisionSpec) -> None:
    """The compressors are sized from vision.image_size / patch_size: they must be the
    checkpoint's (a local one; an s3:// config is not read here)."""
    config_file = Path(vision.path or "") / "config.json"
    if vision.path is None or vision.path.startswith("s3://") or not config_file.is_file():
        return
    cfg = json.loads(config_file.read_text())
    cfg = cfg.get("vision_config", cfg)  # a whole CLIP checkpoint or its vision tower
    size, patch = cfg.get("image_size"), cfg.get("patch_size")
    if (size, patch) != (vision.image_size, vision.patch_size) and size and patch:
        raise _at(
            "vision.image_size/patch_size",
            f"{vision.image_size}/{vision.patch_size}, but the checkpoint {vision.path!r} has {size}/{patch}; "
            f"set vision: {{path: ..., image_size: {size}, patch_size: {patch}}}",
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_llava(grid: Grid) -> None:
    """LLaVA-format data: a tokenizer for every LLM, files that exist. Checkpoints need it:
    the generated benchmarks speak the toy vocabulary and their pixels are not CLIP's."""
    llava = grid.data.llava
    if llava is None:
        for i, llm in enumerate(grid.llms):
            if llm.path:
                raise _at(
                    f"llms[{i}].path",
                    "a checkpoint LLM needs data.llava: the generated benchmarks are tokenized with the toy "
                    "vocabulary, not the checkpoint's tokenizer; give data.llava or a tiny LLM (no path)",
                )
        if grid.vision.path:
            raise _at(
                "vision.path",
                "a checkpoint tower needs data.llava: the generated benchmarks' pixels are not normalised the way "
                "the checkpoint's image processor expects; give data.llava or a tiny tower (no path)",
            )
        return
    for i, llm in enumerate(grid.llms):
        if not llm.path:
            raise _at(
                f"llms[{i}].path",
                f"data.llava is tokenized with the LLM's own tokenizer, but {llm.name!r} has no checkpoint path; "
                "give every LLM a path (an HF from_pretrained folder with its tokenizer) or drop data.llava",
            )
        if not llm.path.startswith("s3://") and not any((Path(llm.path) / f).is_file() for f in _TOKENIZER_FILES):
            raise _at(
                f"llms[{i}].path",
                f"{llm.path!r} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); data.llava needs it: save the "
                "tokenizer into the checkpoint folder (tokenizer.save_pretrained)",
            )
    if llava.train is not None:
        _check_local("data.llava.train", llava.train, folder=False)
    if llava.image_folder is not None:
        _check_local("data.llava.image_folder", llava.image_folder, folder=True)
    for number in (1, 2):
        given = llava.stage1 if number == 1 else llava.stage2
        if given is not None:
            _check_local(f"data.llava.stage{number}.path", given.path, folder=False)
            if given.image_folder is not None:
                _check_local(f"data.llava.stage{number}.image_folder", given.image_folder, folder=True)
    for i, ev in enumerate(llava.eval):
        _check_local(f"data.llava.eval[{i}].path", ev.path, folder=False)
        if ev.image_folder is not None:
            _check_local(f"data.llava.eval[{i}].image_folder", ev.image_folder, folder=True)


def local_node_type() -> NodeType:
    """This machine, for local runs (GPUs counted from the device files: no torch import)."""
    gpus = len([d for d in os.listdir("/dev") if d.startswith("nvidia") and d[6:].isdigit()]) if os.path.isdir("/dev") else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = min(gpus, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return NodeType(cpus=float(os.cpu_count() or 1), gpus=float(gpus))


def _check_nodes(res: Resources) -> None:
    shapes = [("resources", res.cpus_per_worker, res.gpus_per_worker)]
    shapes += [(f"resources.bands[{i}]", b.cpus_per_worker, b.gpus_per_worker) for i, b in enumerate(res.bands)]
    nodes = list(res.node_types)
    if not nodes and not os.environ.get("RAY_ADDRESS"):
        nodes = [local_node_type()]
    if not nodes:
        return  # a cluster whose node types the grid does not state: Ray will tell
    for where, cpus, gpus in shapes:
        if not any(cpus <= n.cpus and gpus <= n.gpus for n in nodes):
            have = ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in nodes)
            raise _at(
                where,
                f"a worker asks for {cpus:g} CPU and {gpus:g} GPU but no node type has that (node types: {have}); "
                "lower cpus_per_worker/gpus_per_worker or list a larger node in resources.node_types",
            )


# ---- errors as people read them -----------------------------------------------------------


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "constrained-")) or str(part) in ("float", "int", "str", "bool", "dict", "tuple", "list", "none"):
            continue  # pydantic's own nodes of a union or a validator chain, not fields
        else:
            out += f".{part}" if out else str(part)
    return out


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The model class a field path points into (for listing its valid keys)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return current if isinstance(current, type) and issubclass(current, BaseModel) else None
        annotation = fields[part].annotation
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        current = inner[0] if inner else annotation
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_KINDS = {
    "int": "an integer", "float": "a number", "string": "a string", "bool": "true/false",
    "tuple": "a list", "list": "a list", "dict": "a mapping", "model": "a mapping",
}


def describe(error: ValidationError, model: type[BaseModel]) -> str:
    """The first error of a validation, as one line: `field.path: what is wrong; what is accepted`."""
    err = error.errors()[0]
    loc, kind, message = tuple(err["loc"]), err["type"], err["msg"]
    where = _path(loc)
    got = err.get("input")
    if message.startswith("Value error, "):
        text = message[len("Value error, "):]
        if text.startswith("@"):  # a rule that names its own field path
            field, _, text = text[1:].partition(": ")
            if where:  # raised by a nested model: its path is relative to where it sits
                field = f"{where}{field}" if field.startswith("[") else f"{where}.{field}"
            return f"{field}: {text}"
        return f"{where}: {text}" if where else text
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        valid = ", ".join(owner.model_fields) if owner else "see `tokenscale schema`"
        return f"{where}: unknown key; valid keys here are {valid}"
    if kind == "missing":
        annotation = _model_at(model, loc[:-1])
        expected = ""
        if annotation is not None and loc[-1] in annotation.model_fields:
            expected = f"; expected {_expected(annotation.model_fields[str(loc[-1])].annotation)}"
        return f"{where}: required, missing{expected}"
    if kind == "too_short":
        return f"{where}: expected a non-empty list, got {got!r}"
    if kind == "literal_error":
        names = [p for p in loc if isinstance(p, str)]
        noun = names[-1] if names else "value"
        if isinstance(loc[-1], int) and noun.endswith("s"):
            noun = noun[:-1]  # benchmarks[0] -> benchmark
        return f"{where}: unknown {noun} {got!r}; {message.replace('Input should be', 'choose')}"
    for prefix, name in (("int", "int"), ("float", "float"), ("string", "string"), ("bool", "bool"),
                         ("tuple", "tuple"), ("list", "list"), ("dict", "dict"), ("model", "model")):
        if kind.startswith(prefix + "_") and kind.endswith(("_type", "_parsing", "_from_float", "attributes_type")):
            return f"{where}: expected {_KINDS[name]}, got {got!r}"
    return f"{where}: {message[0].lower()}{message[1:]}, got {got!r}"


def _expected(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping with keys " + ", ".join(annotation.model_fields)
    text = str(annotation)
    return "an integer" if "int" in text else "a string" if "str" in text else text


# ---- loading ------------------------------------------------------------------------------


def parse_grid(raw: Any, source: str = "grid") -> Grid:
    if not isinstance(raw, dict):
        raise GridError(f"{source}: the top level must be a mapping with keys {', '.join(Grid.model_fields)}")
    try:
        return Grid.model_validate(raw)
    except ValidationError as err:
        raise GridError(describe(err, Grid)) from None


def _read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content, or a GridError naming the file and what is wrong with it."""
    if not path.is_file():
        raise GridError(f"{path}: no such {what} file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from None


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    return parse_grid(_read_yaml(path, "grid"), str(path))


class EvalSets(Model):
    """`tokenscale eval`'s file: eval sets to score kept trials on, as in data.llava.eval."""

    eval: tuple[LlavaEvalSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> EvalSets:
        _unique_eval_names(self.eval)
        for i, ev in enumerate(self.eval):
            if ev.image_folder is None:
                raise _at(f"eval[{i}].image_folder", "required here: there is no training image folder to default to")
            _check_local(f"eval[{i}].path", ev.path, folder=False)
            _check_local(f"eval[{i}].image_folder", ev.image_folder, folder=True)
        return self


def load_eval_sets(path: str | Path) -> tuple[LlavaEvalSpec, ...]:
    """The eval sets of a YAML file `{eval: [{name, task_family, path, image_folder, ...}]}`."""
    path = Path(path)
    raw = _read_yaml(path, "eval-sets")
    if not isinstance(raw, dict):
        raise GridError(f"{path}: the top level must be a mapping with the key eval (a list of eval sets)")
    try:
        return EvalSets.model_validate(raw).eval
    except ValidationError as err:
        raise GridError(f"{path}: {describe(err, EvalSets)}") from None


def grid_to_dict(grid: Grid) -> dict[str, Any]:
    """The grid as plain YAML-able data; `parse_grid(grid_to_dict(g)) == g`."""
    return grid.model_dump(mode="json")


def parse_trial(raw: Any, source: str = "trial") -> TrialConfig:
    """One trial's dict (what the orchestrator sends, or a TRIAL.yaml) as the typed model."""
    if not isinstance(raw, dict):
        raise GridError(f"{source}: the top level must be a mapping with keys {', '.join(TrialConfig.model_fields)}")
    try:
        return TrialConfig.model_validate(raw)
    except ValidationError as err:
        raise GridError(describe(err, TrialConfig)) from None


def grid_json_schema() -> dict[str, Any]:
    """The grid YAML's JSON Schema (`tokenscale schema`), for editors and CI."""
    schema = Grid.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tokenscale grid"
    return schema
