"""LLaVA-format data: JSON conversations + an image folder -> the `Split`s the train loop uses.

A JSON file is a list of examples, as in LLaVA's instruction data:

    {"id": "000123", "image": "coco/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the bus?"},
                       {"from": "gpt", "value": "Red"}, ...]}

Only the first human turn and the gpt turn right after it are used: one question and one
answer per image, like the generated benchmarks. Later turns are ignored; examples with no
image, or with no such pair, are skipped. The `<image>` placeholder is dropped, because the
visual tokens always come first: [visual][question][answer] (model.py).

Text is tokenized with the LLM checkpoint's own tokenizer (`AutoTokenizer` on `llms[].path`,
no special tokens added). Questions are left-padded with its pad id (its eos id when it has
none); answers end with its eos id and are right-padded with it, so the exact match that
`train.evaluate` scores (every answer position up to and including the first eos) is exactly
greedy decoding's "answer, then stop". `max_question_tokens` keeps a question's first tokens;
`max_answer_tokens` cuts answer + eos (a cut answer then has no eos, as in LLaVA's truncation).

Images: the image processor saved beside the vision checkpoint (preprocessor_config.json)
when there is one; else resized to the checkpoint config's image_size and normalized with
CLIP's mean/std; with the tiny tower (no vision path), resized to `vision.image_size` with
pixels in [0, 1], like the generated benchmarks.

s3:// paths (the JSON files, image folders, and the tokenizer files of an s3:// LLM) are
fetched once through the `Store` into a local cache (`$TOKENSCALE_CACHE/s3/<bucket>/<key>`);
of an image folder only the images that the JSON names are fetched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tokenscale.config import LlavaEvalSpec, LlavaSpec, TrialConfig, VisionSpec
from tokenscale.store import Store, write_atomically

from .benchmarks import Benchmark, Split, cache_dir

IMAGE_TOKEN = "<image>"
# Checkpoint files that a tokenizer never needs: not fetched from s3:// for it.
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


# ---- s3:// -> a local cache ---------------------------------------------------------------


def _s3_cache() -> str:
    return os.path.join(cache_dir() or os.path.join(tempfile.gettempdir(), "tokenscale"), "s3")


def local_file(uri: str) -> str:
    """A local path for `uri`: itself, or for s3:// a cached download (one GET, then kept).

    The cache is keyed by the object's key alone: s3:// data and checkpoints are taken as
    immutable (write a changed dataset under a new prefix, or clear the cache)."""
    if not uri.startswith("s3://"):
        return uri
    path = os.path.join(_s3_cache(), uri[len("s3://") :])
    if not os.path.exists(path):
        data = Store(uri).get_bytes(uri)
        write_atomically(path, lambda f: f.write(data))  # a concurrent reader never sees a partial file
    return path


def local_dir(uri: str, skip: tuple[str, ...] = ()) -> str:
    """A local folder for `uri`: itself, or for s3:// its objects (but those ending in `skip`)."""
    if not uri.startswith("s3://"):
        return uri
    prefix = uri.rstrip("/") + "/"
    for key in Store(uri).list(prefix):
        if not key.endswith(skip):
            local_file(key)
    return os.path.join(_s3_cache(), prefix[len("s3://") :])


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder.startswith("s3://") else os.path.join(folder, name)


def _checkpoint_file(path: str, name: str) -> str | None:
    """A file of a checkpoint folder (local or s3://), or None when it has none."""
    uri = _join(path, name)
    if uri.startswith("s3://"):
        return local_file(uri) if Store(uri).exists(uri) else None
    return uri if os.path.isfile(uri) else None


# ---- tokenizer, images, examples ---------------------------------------------------------


def load_tokenizer(llm_path: str):
    """(tokenizer, pad id, eos id) of an LLM checkpoint; pad = eos when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_dir(llm_path, skip=_WEIGHTS))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{llm_path}: the tokenizer has no eos token; LLaVA answers need one to end")
    pad = tokenizer.pad_token_id
    return tokenizer, (eos if pad is None else pad), eos


def image_preprocessor(vision: VisionSpec):
    """A function: list of image files -> float32 [n, 3, H, W] for this vision tower."""
    from PIL import Image

    def pil(files: list[str]) -> list:
        return [Image.open(f).convert("RGB") for f in files]

    if vision.path:
        processor_file = _checkpoint_file(vision.path, "preprocessor_config.json")
        if processor_file is not None:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(os.path.dirname(processor_file))
            return lambda files: np.asarray(processor(images=pil(files), return_tensors="np")["pixel_values"], np.float32)
        config_file = _checkpoint_file(vision.path, "config.json")
        if config_file is None:
            raise ValueError(f"vision.path: {vision.path!r} has no config.json")
        with open(config_file) as f:
            config = json.load(f)
        size = int(config.get("vision_config", config)["image_size"])  # a whole CLIP or its tower
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        mean, std = np.array(OPENAI_CLIP_MEAN, np.float32), np.array(OPENAI_CLIP_STD, np.float32)
    else:
        size, mean, std = vision.image_size, np.zeros(3, np.float32), np.ones(3, np.float32)

    def resize(files: list[str]) -> np.ndarray:
        pixels = [np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 255.0 for im in pil(files)]
        return ((np.stack(pixels) - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)

    return resize


@dataclasses.dataclass(frozen=True)
class Example:
    image: str
    question: str
    answer: str  # the gpt turn: what training teaches
    references: list[str]  # what scoring compares with: the record's `answers` (VQA's ten), else [answer]
    options: list[str]  # a multiple-choice record's `options`, in letter order (A, B, ...)


def read_examples(path: str) -> list[Example]:
    """The usable examples of a LLaVA-format JSON: the first human/gpt turn pair of each
    record with an image; `answers` and `options` fields are kept for scoring."""
    with open(local_file(path)) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of LLaVA examples, got {type(records).__name__}")
    examples = []
    for record in records:
        image, turns = record.get("image"), record.get("conversations") or []
        if not isinstance(image, str) or not image:
            continue  # text-only conversations: this VLM always has an image
        for first, second in zip(turns, turns[1:], strict=False):
            if first.get("from") == "human" and second.get("from") == "gpt":
                question = first.get("value", "").replace(IMAGE_TOKEN, "").strip()
                answer = second.get("value", "").strip()
                references = [str(a) for a in record.get("answers") or [answer]]
                options = [str(o) for o in record.get("options") or []]
                examples.append(Example(image, question, answer, references, options))
                break
    if not examples:
        raise ValueError(f"{path}: no example with an image and a human turn followed by a gpt turn")
    return examples


def _pad(rows: list[list[int]], value: int, left: bool) -> np.ndarray:
    """Rows of token ids as one [n, longest] int64 array, padded with `value`."""
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):
        if row:
            out[i, slice(width - len(row), None) if left else slice(0, len(row))] = row
    return out


def build_split(
    bench: Benchmark, json_path: str, image_folder: str, tokenizer, pad: int, eos: int, prep, spec: LlavaSpec,
    evaluation: LlavaEvalSpec | None = None,
) -> Split:
    examples = read_examples(json_path)
    images = [e.image for e in examples]
    suffix = f"\n{evaluation.prompt_suffix}" if evaluation is not None and evaluation.prompt_suffix else ""
    q_ids = tokenizer([e.question + suffix for e in examples], add_special_tokens=False)["input_ids"]
    a_ids = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    q_ids = [q[: spec.max_question_tokens] for q in q_ids]
    a_ids = [(a + [eos])[: spec.max_answer_tokens] for a in a_ids]
    uris = [_join(image_folder, name) for name in images]
    if image_folder.startswith("s3://"):
        with ThreadPoolExecutor(8) as pool:
            files = list(pool.map(local_file, uris))
    else:
        files = uris
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{json_path}: {len(missing)} image(s) not in {image_folder!r}, e.g. {missing[0]!r}")
    pixels = np.concatenate([prep(files[i : i + 256]) for i in range(0, len(files), 256)])
    split = Split(bench, pixels, _pad(q_ids, pad, left=True), _pad(a_ids, eos, left=False), pad_id=pad, eos_id=eos)
    if evaluation is None:
        return split
    return dataclasses.replace(
        split,
        references=[e.references for e in examples],
        options=[e.options for e in examples],
        metric=evaluation.metric,
        max_new_tokens=evaluation.max_new_tokens,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip(),
    )


def load_splits(trial: TrialConfig) -> tuple[list[Split], list[Split]]:
    """([the training split], [one split per eval set]) from `trial.data.llava`."""
    spec = trial.data.llava
    if spec is None:
        raise ValueError("data.llava is not set")
    if not trial.llm.path:
        raise ValueError(f"llm {trial.llm.name!r}: LLaVA-format data needs a checkpoint path (for its tokenizer)")
    tokenizer, pad, eos = load_tokenizer(trial.llm.path)
    prep = image_preprocessor(trial.vision)
    train = build_split(Benchmark("llava-train", "reasoning", 0.0), spec.train, spec.image_folder, tokenizer, pad, eos, prep, spec)
    evals = [
        build_split(
            Benchmark(e.name, e.task_family, e.chance), e.path, e.image_folder or spec.image_folder, tokenizer, pad, eos,
            prep, spec, evaluation=e,
        )
        for e in spec.eval
    ]
    return [train], evals
