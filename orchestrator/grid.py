"""The grid YAML: parsed and validated in full before any trial starts, then expanded.

Every error names the field (`llms[2].hidden_size`) and says what would be accepted.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokenscale import compressors
from tokenscale.store import check_name
from tokenscale.workers.benchmarks import BENCHMARKS
from tokenscale.workers.llava_data import TASK_FAMILIES
from tokenscale.workers.trial import DataSpec, LLMSpec, TrainSpec, TrialConfig, VisionSpec


class GridError(ValueError):
    """A grid YAML that cannot run; the message names the field and the fix."""


@dataclass(frozen=True)
class Band:
    """Resources for LLMs of at most `max_params` non-embedding parameters, or for the LLMs
    named in `llms` (for checkpoints that cannot be sized before they load, e.g. on S3)."""

    max_params: float = float("inf")
    llms: tuple[str, ...] = ()
    workers: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0


@dataclass(frozen=True)
class NodeType:
    """The largest node a trial's worker can land on (what a bundle must fit in)."""

    cpus: float
    gpus: float = 0


@dataclass(frozen=True)
class Resources:
    workers: int = 1  # Ray Train workers per trial (data parallel)
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    placement_strategy: str = "PACK"  # of one trial's workers: PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    backend: str = "auto"  # torch.distributed backend: auto = nccl when GPUs are asked for, else gloo
    # Where a trial's training runs. `workers`: a Ray Train TorchTrainer worker group
    # (actors, placement group, process group; Train's retries from the last checkpoint).
    # `in_trial`: a world of one inside the Tune trial's own process, which Tune reuses for
    # the next trial: no worker group to start and no imports to repeat per trial (on 2
    # CPU cores that start-up was ~30 s a trial); Tune's retries, same stage checkpoints.
    # auto = in_trial for one CPU-only worker, else workers.
    execution: str = "auto"
    # Size bands, smallest first: an LLM takes the first band whose max_params >= its size;
    # larger LLMs than every band (or of unknown size) take the defaults above.
    bands: tuple[Band, ...] = ()
    # The node types of the cluster; default: this machine (local runs) — used to reject a
    # per-worker request that no node can satisfy, before anything starts.
    node_types: tuple[NodeType, ...] = ()

    def for_llm(self, llm: LLMSpec) -> dict[str, Any]:
        params = estimate_llm_params(llm)
        for band in self.bands:
            if llm.name in band.llms or (not band.llms and params is not None and params <= band.max_params):
                return self._shape(band.workers, band.cpus_per_worker, band.gpus_per_worker)
        return self._shape(self.workers, self.cpus_per_worker, self.gpus_per_worker)

    def _shape(self, workers: int, cpus: float, gpus: float) -> dict[str, Any]:
        backend = self.backend if self.backend != "auto" else ("nccl" if gpus > 0 else "gloo")
        execution = self.execution
        if execution == "auto":
            execution = "in_trial" if workers == 1 and gpus == 0 else "workers"
        return {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus,
                "placement_strategy": self.placement_strategy, "backend": backend, "execution": execution}


def estimate_llm_params(llm: LLMSpec) -> float | None:
    """Non-embedding parameters of a Qwen2-style LM, from its spec or its config.json
    (None for a checkpoint we cannot read here, e.g. on s3://)."""
    if llm.path:
        config_file = Path(llm.path) / "config.json"
        if not config_file.is_file():
            return None
        import json

        cfg = json.loads(config_file.read_text())
        hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
        heads = cfg["num_attention_heads"]
        kv_heads, inter = cfg.get("num_key_value_heads", heads), cfg["intermediate_size"]
    else:
        hidden, layers, heads, kv_heads, inter = llm.hidden_size, llm.layers, llm.heads, llm.kv_heads, llm.intermediate_size
    kv_dim = kv_heads * (hidden // heads)
    attention = hidden * hidden + hidden + 2 * (hidden * kv_dim + kv_dim) + hidden * hidden  # q(+b) k,v(+b) o
    mlp = 3 * hidden * inter
    return float(layers * (attention + mlp + 2 * hidden) + hidden)  # + 2 norms per layer, final norm


@dataclass(frozen=True)
class CompressorSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grid:
    grid: str
    llms: tuple[LLMSpec, ...]
    visual_tokens: tuple[int, ...]
    compressors: tuple[CompressorSpec, ...]
    seeds: tuple[int, ...] = (0,)
    vision: VisionSpec = field(default_factory=VisionSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    resources: Resources = field(default_factory=Resources)
    max_concurrent_trials: int = 2
    max_failures: int = 1

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
                grid=self.grid,
                llm=llm,
                visual_tokens=tokens,
                compressor=comp.name,
                seed=seed,
                vision=self.vision,
                train=self.train,
                data=self.data,
                compressor_options=dict(comp.options),
            )
            for llm, tokens, comp, seed in itertools.product(llms, self.visual_tokens, self.compressors, self.seeds)
        ]


def _llm_size(llm: LLMSpec) -> float:
    params = estimate_llm_params(llm)
    return float("inf") if params is None else params


# ---- generic typed parsing of dataclasses -----------------------------------------------


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    if origin in (tuple, list):
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        return _coerce(value, args[0], where)
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise GridError(f"{where}: expected a list of {_describe(typing.get_args(tp)[0])}, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise GridError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return parse_dataclass(tp, value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise GridError(f"{where}: expected {_describe(tp)}, got {value!r}")


def parse_dataclass(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise GridError(f"{where or 'grid'}: expected {_describe(cls)}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise GridError(
            f"{where + '.' if where else ''}{unknown[0]}: unknown key; valid keys here are {', '.join(known)}"
        )
    kwargs = {}
    for name, f in known.items():
        path = f"{where}.{name}" if where else name
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], path)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise GridError(f"{path}: required, missing; expected {_describe(hints[name])}")
    return cls(**kwargs)


# ---- the grid ---------------------------------------------------------------------------


def _normalize(raw: dict[str, Any]) -> dict[str, Any]:
    """Shorthands: a compressor may be given as a bare name."""
    raw = dict(raw)
    if isinstance(raw.get("compressors"), list):
        raw["compressors"] = [{"name": c} if isinstance(c, str) else c for c in raw["compressors"]]
    return raw


def _check(grid: Grid) -> None:
    check_name_field("grid", grid.grid)
    for where, value in (("llms", grid.llms), ("visual_tokens", grid.visual_tokens), ("compressors", grid.compressors),
                         ("seeds", grid.seeds), ("data.benchmarks", grid.data.benchmarks)):
        if not value:
            raise GridError(f"{where}: expected a non-empty list, got []")
    names = [llm.name for llm in grid.llms]
    for i, llm in enumerate(grid.llms):
        check_name_field(f"llms[{i}].name", llm.name)
        if llm.path:
            _check_path(f"llms[{i}].path", llm.path)
        else:
            for key in ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size"):
                if getattr(llm, key) < 1:
                    raise GridError(f"llms[{i}].{key}: must be >= 1, got {getattr(llm, key)}")
            if llm.hidden_size % llm.heads or llm.heads % llm.kv_heads:
                raise GridError(
                    f"llms[{i}]: hidden_size ({llm.hidden_size}) must be divisible by heads ({llm.heads}) "
                    f"and heads by kv_heads ({llm.kv_heads})"
                )
    if len(set(names)) != len(names):
        raise GridError(f"llms: names must be unique, got {names}")
    vision = grid.vision
    if vision.path:
        _check_path("vision.path", vision.path)
        _check_vision_checkpoint(vision)
    elif vision.image_size % vision.patch_size:
        raise GridError(
            f"vision.patch_size: {vision.patch_size} must divide vision.image_size ({vision.image_size})"
        )
    elif vision.hidden_size % vision.heads:
        raise GridError(f"vision.heads: {vision.heads} must divide vision.hidden_size ({vision.hidden_size})")
    elif vision.stem_layers < 1:
        raise GridError(f"vision.stem_layers: must be >= 1, got {vision.stem_layers} (set stem_channels: 0 for no stem)")
    for i, band in enumerate(grid.resources.bands):
        for name in band.llms:
            if name not in names:
                raise GridError(f"resources.bands[{i}].llms: {name!r} is not an LLM of this grid ({', '.join(names)})")
    for i, comp in enumerate(grid.compressors):
        if comp.name not in compressors.names():
            raise GridError(f"compressors[{i}]: unknown compressor {comp.name!r}; choose from {', '.join(compressors.names())}")
        for tokens in grid.visual_tokens:
            try:
                compressors.check_budget(comp.name, vision.grid_tokens, tokens)
            except ValueError as err:
                raise GridError(f"visual_tokens: {err}") from None
    if len(set(grid.visual_tokens)) != len(grid.visual_tokens):
        raise GridError(f"visual_tokens: duplicates in {list(grid.visual_tokens)}")
    for i, bench in enumerate(grid.data.benchmarks):
        if bench not in BENCHMARKS:
            raise GridError(f"data.benchmarks[{i}]: unknown benchmark {bench!r}; choose from {', '.join(BENCHMARKS)}")
    _check_llava(grid)
    train = grid.train
    if train.zero_stage not in (0, 1, 2, 3):
        raise GridError(f"train.zero_stage: must be 0, 1, 2 or 3, got {train.zero_stage}")
    if train.bf16 not in ("auto", "on", "off"):
        raise GridError(f"train.bf16: must be auto, on or off, got {train.bf16!r}")
    for key in ("micro_batch", "stage2_steps"):
        if getattr(train, key) < 1:
            raise GridError(f"train.{key}: must be >= 1, got {getattr(train, key)}")
    if train.stage1_steps < 0:
        raise GridError(f"train.stage1_steps: must be >= 0, got {train.stage1_steps}")
    for key in ("stage1_lr", "stage2_lr"):
        if not 0 < getattr(train, key) < 1:
            raise GridError(f"train.{key}: must be in (0, 1), got {getattr(train, key)}")
    for key in ("train_examples", "eval_examples"):
        if getattr(grid.data, key) < 1:
            raise GridError(f"data.{key}: must be >= 1, got {getattr(grid.data, key)}")
    _check_resources(grid)
    if grid.max_concurrent_trials < 1:
        raise GridError(f"max_concurrent_trials: must be >= 1, got {grid.max_concurrent_trials}")
    if grid.max_failures < 0:
        raise GridError(f"max_failures: must be >= 0, got {grid.max_failures}")


_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def local_node_type() -> NodeType:
    """This machine, for local runs."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:
        pass
    return NodeType(cpus=float(os.cpu_count() or 1), gpus=float(gpus))


def _check_resources(grid: Grid) -> None:
    res = grid.resources
    if res.placement_strategy not in _STRATEGIES:
        raise GridError(f"resources.placement_strategy: {res.placement_strategy!r}; choose one of {', '.join(_STRATEGIES)}")
    if res.backend not in ("auto", "gloo", "nccl"):
        raise GridError(f"resources.backend: {res.backend!r}; choose auto, gloo or nccl")
    if res.execution not in ("auto", "in_trial", "workers"):
        raise GridError(f"resources.execution: {res.execution!r}; choose auto, in_trial or workers")
    if res.execution == "in_trial":
        counts = [("resources", res.workers)] + [(f"resources.bands[{i}]", b.workers) for i, b in enumerate(res.bands)]
        for where, workers in counts:
            if workers != 1:
                raise GridError(f"{where}.workers: in_trial runs one process; set workers: 1 or resources.execution: workers")
    shapes = [("resources", res.workers, res.cpus_per_worker, res.gpus_per_worker)]
    shapes += [(f"resources.bands[{i}]", b.workers, b.cpus_per_worker, b.gpus_per_worker) for i, b in enumerate(res.bands)]
    for where, workers, cpus, gpus in shapes:
        if workers < 1 or cpus <= 0 or gpus < 0:
            raise GridError(f"{where}: workers >= 1, cpus_per_worker > 0 and gpus_per_worker >= 0 are required")
    limits = [b.max_params for b in res.bands if not b.llms]
    if limits != sorted(limits) or len(set(limits)) != len(limits):
        raise GridError(f"resources.bands: max_params must increase strictly from band to band, got {limits}")
    nodes = list(res.node_types)
    if not nodes and not os.environ.get("RAY_ADDRESS"):
        nodes = [local_node_type()]
    if not nodes:
        return  # a cluster whose node types the grid does not state: Ray will tell
    for where, _, cpus, gpus in shapes:
        if not any(cpus <= n.cpus and gpus <= n.gpus for n in nodes):
            have = ", ".join(f"{n.cpus:g} CPU/{n.gpus:g} GPU" for n in nodes)
            raise GridError(
                f"{where}: a worker asks for {cpus:g} CPU and {gpus:g} GPU but no node type has that "
                f"(node types: {have}); lower cpus_per_worker/gpus_per_worker or list a larger node in "
                "resources.node_types"
            )


def check_name_field(where: str, value: str) -> None:
    try:
        check_name(where, value)
    except ValueError as err:
        raise GridError(str(err)) from None


def _check_path(where: str, path: str) -> None:
    """A checkpoint folder."""
    _check_local(where, path, folder=True, fix="give a HF from_pretrained folder (local or s3://)")


def _check_vision_checkpoint(vision: VisionSpec) -> None:
    """The compressors are sized from vision.image_size / patch_size: they must be the
    checkpoint's (a local one; an s3:// config is not read here)."""
    config_file = Path(vision.path or "") / "config.json"
    if vision.path is None or vision.path.startswith("s3://") or not config_file.is_file():
        return
    import json

    cfg = json.loads(config_file.read_text())
    cfg = cfg.get("vision_config", cfg)  # a whole CLIP checkpoint or its vision tower
    size, patch = cfg.get("image_size"), cfg.get("patch_size")
    if (size, patch) != (vision.image_size, vision.patch_size) and size and patch:
        raise GridError(
            f"vision.image_size/patch_size: {vision.image_size}/{vision.patch_size}, but the checkpoint "
            f"{vision.path!r} has {size}/{patch}; set vision: {{path: ..., image_size: {size}, patch_size: {patch}}}"
        )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _check_local(where: str, path: str, folder: bool, fix: str = "give an existing local path or an s3:// URI") -> None:
    """A file or folder that must exist. s3:// ones are checked by the worker that fetches
    them: the driver may have no credentials."""
    if path.startswith("s3://"):
        return
    kind, ok = ("folder", os.path.isdir(path)) if folder else ("file", os.path.isfile(path))
    if not ok:
        raise GridError(f"{where}: {path!r} is not a {kind}; {fix}")


def _check_llava(grid: Grid) -> None:
    """LLaVA-format data: a tokenizer for every LLM, files that exist, known task families."""
    llava = grid.data.llava
    if llava is None:
        return
    for i, llm in enumerate(grid.llms):
        if not llm.path:
            raise GridError(
                f"llms[{i}].path: data.llava is tokenized with the LLM's own tokenizer, but {llm.name!r} has "
                "no checkpoint path; give every LLM a path (an HF from_pretrained folder with its tokenizer) "
                "or drop data.llava"
            )
        if not llm.path.startswith("s3://") and not any((Path(llm.path) / f).is_file() for f in _TOKENIZER_FILES):
            raise GridError(
                f"llms[{i}].path: {llm.path!r} has no tokenizer ({', '.join(_TOKENIZER_FILES)}); data.llava needs "
                "it: save the tokenizer into the checkpoint folder (tokenizer.save_pretrained)"
            )
    _check_local("data.llava.train", llava.train, folder=False)
    _check_local("data.llava.image_folder", llava.image_folder, folder=True)
    if not llava.eval:
        raise GridError(
            "data.llava.eval: expected a non-empty list of {name, task_family, path}; the trial's scores come from these sets"
        )
    names = [e.name for e in llava.eval]
    if len(set(names)) != len(names):
        raise GridError(f"data.llava.eval: names must be unique, got {names}")
    for i, ev in enumerate(llava.eval):
        where = f"data.llava.eval[{i}]"
        if ev.task_family not in TASK_FAMILIES:
            raise GridError(f"{where}.task_family: unknown task family {ev.task_family!r}; choose from {', '.join(TASK_FAMILIES)}")
        _check_local(f"{where}.path", ev.path, folder=False)
        if ev.image_folder is not None:
            _check_local(f"{where}.image_folder", ev.image_folder, folder=True)
        if not 0 <= ev.chance < 1:
            raise GridError(f"{where}.chance: must be in [0, 1), got {ev.chance}")
    for key in ("max_question_tokens", "max_answer_tokens"):
        if getattr(llava, key) < 1:
            raise GridError(f"data.llava.{key}: must be >= 1, got {getattr(llava, key)}")


def parse_grid(raw: Any, source: str = "grid") -> Grid:
    if not isinstance(raw, dict):
        raise GridError(f"{source}: the top level must be a mapping with keys {', '.join(f.name for f in dataclasses.fields(Grid))}")
    grid = parse_dataclass(Grid, _normalize(raw), "")
    _check(grid)
    return grid


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    if not path.is_file():
        raise GridError(f"{path}: no such grid file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"{path}: not valid YAML ({err})") from None
    return parse_grid(raw, str(path))


def grid_to_dict(grid: Grid) -> dict[str, Any]:
    """The grid as plain YAML-able data; `parse_grid(grid_to_dict(g)) == g`."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(grid))
