"""LLaVA-format data, streamed: JSON conversations + an image folder -> batches on demand.

A JSON file is a list of records, as in LLaVA's data:

    {"id": "000123", "image": "coco/000123.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the bus?"},
                       {"from": "gpt", "value": "Red"}, ...]}

Nothing of a dataset is held in memory. A first pass streams the JSON (chunk by chunk, never
`json.load` of the whole file: LLaVA-665k is ~1 GB) and writes an index of each usable
record's byte offset and size (an .npy in the cache, keyed by the file's path, size and
mtime; memory-mapped). A batch then reads its records by offset, decodes and preprocesses
its images and tokenizes its text, and nothing else. Ordering and sharding are the train
loop's (workers/train.py: one seeded permutation per epoch, each global batch split into
disjoint per-worker shares, a pure function of the step, so a resumed run continues the
stream); the reading runs ahead in torch DataLoader worker processes (`data.llava.
loader_workers`). A DataLoader rather than Ray Data: `workers/` stays free of Ray (it runs
under torchrun or plain Python too), and the order must stay the step function's for
resume, which a DataLoader over a sampler of precomputed micro-batches keeps exactly.

Text, as LLaVA formats it (`template`):
- `plain` (stage 1, LLaVA's caption pretraining): the image, then the first gpt turn + <eos>.
- `chat`: the LLM tokenizer's chat template (Qwen-1.5-chat's ChatML for the paper's LLMs):
  the image's tokens where `<image>` stands (LLaVA moves it to the start of the first human
  turn), every gpt turn (with the template's end of turn) in the loss, the human turns and
  the template's headers out of it. The sequence is [head][visual][question][answer...]:
  head = the template before the image (system prompt, user header), question = the rest of
  the prompt up to the assistant header, answer = everything after it.
- `none`: the first human turn as the question, each gpt turn + <eos> trained, later human
  turns out of the loss. `auto` = chat when the tokenizer has a chat template, else none.
An eval set's `prompt_suffix` ends its question (after a newline). Records without an image
(the text-only conversations of the 665k mix) train as text: the visual tokens are masked
out of attention. Eval records need an image.

Token ids are the LLM checkpoint's tokenizer's (`AutoTokenizer` on `llms[].path`, no special
tokens added beyond the template's); padding is masked out of attention and positions
(model.py), so pad ids never matter. `max_question_tokens` keeps the prompt's first tokens;
`max_answer_tokens` cuts what follows (a cut answer then has no <eos>, as in LLaVA).

Images: the image processor saved beside the vision checkpoint (preprocessor_config.json)
when there is one; else resized to the checkpoint config's image_size and normalized with
CLIP's mean/std; with the tiny tower (no vision path), resized to `vision.image_size` with
pixels in [0, 1]. `image_aspect: pad` (LLaVA-1.5's default) first pads each image to a square
with the processor's mean colour, so the centre crop loses nothing.

s3:// paths (the JSON files, image folders, and the tokenizer files of an s3:// LLM) are
fetched into a local cache (`$TOKENSCALE_CACHE/s3/<bucket>/<key>`): the JSON once, each image
when a batch first needs it.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from tokenscale.config import LlavaEvalSpec, LlavaSpec, LlavaStageSpec, TrialConfig, VisionSpec
from tokenscale.store import Store, write_atomically

from .benchmarks import Benchmark, cache_dir

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
    return local_file_at(uri, os.path.join(_s3_cache(), uri[len("s3://") :]))


def local_file_at(uri: str, path: str) -> str:
    """`uri` (s3://) downloaded once to `path`; a concurrent reader never sees a partial file."""
    if not os.path.exists(path):
        data = Store(uri).get_bytes(uri)
        write_atomically(path, lambda f: f.write(data))
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


# ---- tokenizer, images ----------------------------------------------------------------------


def load_tokenizer(llm_path: str):
    """(tokenizer, pad id, eos id) of an LLM checkpoint; pad = eos when it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_dir(llm_path, skip=_WEIGHTS))
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{llm_path}: the tokenizer has no eos token; LLaVA answers need one to end")
    pad = tokenizer.pad_token_id
    return tokenizer, (eos if pad is None else pad), eos


def pad_to_square(image, color: tuple[int, int, int]):
    """LLaVA-1.5's expand2square: the image centred on a square of `color`."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), color)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def image_preprocessor(vision: VisionSpec, aspect: str = "pad") -> Callable[[list], np.ndarray]:
    """A function: list of PIL images -> float32 [n, 3, H, W] for this vision tower."""
    from PIL import Image

    if vision.path:
        processor_file = _checkpoint_file(vision.path, "preprocessor_config.json")
        if processor_file is not None:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(os.path.dirname(processor_file))
            mean_color = tuple(int(round(255 * m)) for m in processor.image_mean)

            def process(images: list) -> np.ndarray:
                if aspect == "pad":
                    images = [pad_to_square(im, mean_color) for im in images]
                return np.asarray(processor(images=images, return_tensors="np")["pixel_values"], np.float32)

            return process
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
    # the padding colour of a tower without a processor: CLIP's mean, or mid-grey for [0, 1] pixels
    fill = tuple(int(round(255 * m)) for m in (mean if mean.any() else np.full(3, 0.5)))

    def resize(images: list) -> np.ndarray:
        if aspect == "pad":
            images = [pad_to_square(im, fill) for im in images]
        pixels = [np.asarray(im.resize((size, size), Image.BICUBIC), np.float32) / 255.0 for im in images]
        return ((np.stack(pixels) - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)

    return resize


def open_images(files: Sequence[str]) -> list:
    from PIL import Image

    out = []
    for file in files:
        with Image.open(file) as image:
            out.append(image.convert("RGB"))
    return out


# ---- the JSON, streamed into an index of records ----------------------------------------------


def scan_json_array(path: str, chunk_bytes: int = 1 << 20) -> Iterator[tuple[int, int, Any]]:
    """(byte offset, byte size, value) of each element of the top-level JSON array in `path`,
    reading `chunk_bytes` at a time: memory holds one chunk and one element, never the file."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buffer, position, offset, opened, at_end = "", 0, 0, False, False
    with open(path, "rb") as file:

        def more() -> bool:
            nonlocal buffer, position, at_end
            data = file.read(chunk_bytes)
            at_end = not data
            buffer = buffer[position:] + utf8.decode(data, final=at_end)
            position = 0
            return not at_end

        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n,[":
                if buffer[position] == "[":
                    opened = True
                position, offset = position + 1, offset + 1  # ASCII: one byte each
            if position >= len(buffer):
                if more():
                    continue
                raise ValueError(f"{path}: the JSON list is not closed (no ']')" if opened else f"{path}: empty file")
            if not opened:
                raise ValueError(f"{path}: expected a JSON list of LLaVA records, found {buffer[position]!r} first")
            if buffer[position] == "]":
                return
            try:
                value, end = decoder.raw_decode(buffer, position)
            except json.JSONDecodeError as err:
                if not at_end and more():
                    continue  # the element runs past the chunk: read on
                raise ValueError(f"{path}: invalid JSON near byte {offset}: {err.msg}") from None
            size = len(buffer[position:end].encode("utf-8"))
            yield offset, size, value
            offset, position = offset + size, end


def _turns(record: Any) -> list[tuple[str, str]]:
    """(role, text) of a record's conversation, roles 'user' / 'assistant'; [] when it has no
    human turn followed by a gpt turn (such a record teaches nothing)."""
    if not isinstance(record, dict):
        return []
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns = [
        (roles[t.get("from")], str(t.get("value", "")))
        for t in record.get("conversations") or [] if isinstance(t, dict) and t.get("from") in roles
    ]
    while turns and turns[0][0] != "user":  # a conversation starts with the human
        turns.pop(0)
    if len(turns) < 2 or turns[1][0] != "assistant":
        return []
    return turns


INDEX_VERSION = 1


def index_records(path: str) -> np.ndarray:
    """[n, 3] int64 (byte offset, byte size, has image) of the usable records of a local
    LLaVA JSON, cached beside the other caches by (path, size, mtime) and memory-mapped."""
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{INDEX_VERSION}".encode()).hexdigest()[:20]
    root = os.path.join(cache_dir() or os.path.join(tempfile.gettempdir(), "tokenscale"), "llava-index")
    cached = os.path.join(root, f"{key}.npy")
    if os.path.exists(cached):
        return np.load(cached, mmap_mode="r")
    rows: list[tuple[int, int, int]] = []  # 24 bytes a record: 16 MB for LLaVA-665k
    for offset, size, record in scan_json_array(path):
        if _turns(record):
            image = record.get("image")
            rows.append((offset, size, int(isinstance(image, str) and bool(image))))
    if not rows:
        raise ValueError(f"{path}: no record with a human turn followed by a gpt turn")
    write_atomically(cached, lambda f: np.save(f, np.asarray(rows, np.int64)))
    return np.load(cached, mmap_mode="r")


class Records:
    """The usable records of a LLaVA JSON, read one by one from the file by offset."""

    def __init__(self, uri: str, images_required: bool = False):
        self.uri = uri
        self.path = local_file(uri)
        index = index_records(self.path)
        if images_required:
            index = index[np.asarray(index[:, 2]) == 1]
            if len(index) == 0:
                raise ValueError(f"{uri}: no record with an image")
        self.index = index
        self._file: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        if self._pid != os.getpid():  # a DataLoader worker (forked): its own file handle
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        offset, size, _ = (int(x) for x in self.index[i])
        self._file.seek(offset)
        return json.loads(self._file.read(size))

    def __getstate__(self) -> dict:  # spawned DataLoader workers: reopen the file there
        return {**self.__dict__, "_file": None, "_pid": -1}


# ---- text, as LLaVA formats it ---------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
    """One example's token ids: [head][visual][question][answer]; `loss` marks the answer
    tokens that are trained (gpt turns), 0 on human turns and template headers."""

    head: list[int]
    question: list[int]
    answer: list[int]
    loss: list[int]
    has_image: bool


class Formatter:
    """A record's conversation -> `Encoded`, under one template (see the module's doc)."""

    def __init__(self, tokenizer, eos: int, template: str, spec: LlavaSpec, suffix: str = ""):
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "none"
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "data.llava: template 'chat' but the LLM's tokenizer has no chat template "
                "(tokenizer_config.json 'chat_template'); use template: none, or a chat checkpoint"
            )
        self.tokenizer, self.eos, self.template, self.suffix = tokenizer, eos, template, suffix
        self.max_question, self.max_answer = spec.max_question_tokens, spec.max_answer_tokens

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def __call__(self, record: dict, prompt_only: bool = False) -> Encoded:
        turns = _turns(record)
        image = record.get("image")
        has_image = isinstance(image, str) and bool(image)
        first = turns[0][1].replace(IMAGE_TOKEN, "").strip()
        if self.suffix:
            first = f"{first}\n{self.suffix}" if first else self.suffix
        if self.template == "plain":  # the image, then the caption
            head, question, answer, loss = [], [], self.ids(turns[1][1].strip()) + [self.eos], None
        elif self.template == "none":
            head, question = [], self.ids(first)
            answer, loss = [], []
            for role, text in turns[1:]:
                ids = self.ids(text.strip()) + ([self.eos] if role == "assistant" else [])
                answer += ids
                loss += [int(role == "assistant")] * len(ids)
        else:
            head, question, answer, loss = self._chat(turns, first, has_image)
        if loss is None:
            loss = [1] * len(answer)
        question = question[: self.max_question]
        answer, loss = answer[: self.max_answer], loss[: self.max_answer]
        if prompt_only:
            answer, loss = [], []
        return Encoded(head, question, answer, loss, has_image)

    def _chat(self, turns: list[tuple[str, str]], first: str, has_image: bool):
        # LLaVA puts the image at the start of the first human turn
        messages = [{"role": role, "content": text.strip()} for role, text in turns]
        messages[0]["content"] = f"{IMAGE_TOKEN}\n{first}" if has_image else first

        def render(count: int) -> str:
            prompt = count < len(messages) and messages[count]["role"] == "assistant"
            return self.tokenizer.apply_chat_template(messages[:count], tokenize=False, add_generation_prompt=prompt)

        prompt = render(1)
        if has_image:
            before, _, after = prompt.partition(IMAGE_TOKEN)
            head, question = self.ids(before), self.ids(after)
        else:
            head, question = [], self.ids(prompt)
        answer, loss, previous = [], [], prompt
        for count in range(2, len(messages) + 1):
            text = render(count)
            if not text.startswith(previous):
                raise ValueError("data.llava: the tokenizer's chat template does not render a conversation's "
                                 "turns as prefixes of each other; use template: none")
            ids = self.ids(text[len(previous):])
            answer += ids
            loss += [int(messages[count - 1]["role"] == "assistant")] * len(ids)
            previous = text
        return head, question, answer, loss


# ---- the sets: examples on demand ---------------------------------------------------------------


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ids as one [n, width] int64 array padded with `value`, and its 0/1 mask."""
    width = max([1, *(len(r) for r in rows)]) if width is None else width
    out = np.full((len(rows), width), value, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        if row:
            where = slice(width - len(row), None) if left else slice(0, len(row))
            out[i, where], mask[i, where] = row, 1
    return out, mask


@dataclasses.dataclass
class LlavaSet:
    """A LLaVA-format JSON + its image folder: `batch(index)` reads, decodes and tokenizes
    those examples only. Eval sets also carry what scoring needs (references, options, the
    metric, the decoding budget, the tokenizer's decode)."""

    benchmark: Benchmark
    records: Records
    image_folder: str
    formatter: Formatter
    prep: Callable[[list], np.ndarray]
    image_shape: tuple[int, int, int]
    pad_id: int
    eos_id: int
    vocab_size: int
    evaluation: LlavaEvalSpec | None = None
    decode: Callable[[list[int]], str] | None = None
    # a frozen tower's patch features of every record (FeatureShards): batches then carry
    # them in place of the pixels, and the tower does not run
    features: FeatureShards | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def metric(self) -> str:
        return self.evaluation.metric if self.evaluation else "exact"

    @property
    def max_new_tokens(self) -> int:
        return self.evaluation.max_new_tokens if self.evaluation else 16

    def _image_files(self, names: Sequence[str]) -> list[str]:
        files = [local_file(_join(self.image_folder, name)) for name in names]
        missing = [name for name, f in zip(names, files, strict=True) if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{self.records.uri}: image {missing[0]!r} is not in {self.image_folder!r}")
        return files

    def batch(self, index: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """What VLM.forward takes, as numpy: images, questions (left-padded), answers
        (right-padded with <eos>), their attention masks, the loss mask, the head and which
        rows have an image."""
        records = [self.records[int(i)] for i in index]
        encoded = [self.formatter(r, prompt_only=self.evaluation is not None) for r in records]
        images = self.features.rows(index) if self.features is not None else self.pixels(records)
        heads, head_mask = _pad([e.head for e in encoded], self.pad_id, left=True)
        questions, question_mask = _pad([e.question for e in encoded], self.pad_id, left=True)
        answers, answer_mask = _pad([e.answer for e in encoded], self.eos_id, left=False)
        loss_mask, _ = _pad([e.loss for e in encoded], 0, left=False, width=answers.shape[1])
        return {
            "images": images, "questions": questions, "answers": answers, "question_mask": question_mask,
            "answer_mask": answer_mask, "loss_mask": loss_mask, "heads": heads, "head_mask": head_mask,
            "image_mask": np.asarray([e.has_image for e in encoded], np.int64),
        }

    def pixels(self, records: Sequence[dict]) -> np.ndarray:
        """[n, 3, S, S] float32: the records' images, preprocessed; zeros for a text-only one."""
        images = np.zeros((len(records), *self.image_shape), np.float32)
        with_image = [i for i, r in enumerate(records) if isinstance(r.get("image"), str) and r["image"]]
        if with_image:
            files = self._image_files([records[i]["image"] for i in with_image])
            images[with_image] = self.prep(open_images(files))
        return images

    def scoring(self) -> tuple[list[list[str]], list[list[str]]]:
        """(each example's reference answers, its options): the record's `answers` (VQA's
        ten) else its first gpt turn, and a multiple-choice record's `options`."""
        references, options = [], []
        for i in range(len(self)):
            record = self.records[i]
            answer = _turns(record)[1][1].strip()
            references.append([str(a) for a in record.get("answers") or [answer]])
            options.append([str(o) for o in record.get("options") or []])
        return references, options


def build_set(
    bench: Benchmark, json_path: str, image_folder: str, tokenizer, pad: int, eos: int, prep, image_shape,
    spec: LlavaSpec, template: str, evaluation: LlavaEvalSpec | None = None,
) -> LlavaSet:
    suffix = evaluation.prompt_suffix if evaluation is not None else ""
    return LlavaSet(
        bench, Records(json_path, images_required=evaluation is not None), image_folder,
        Formatter(tokenizer, eos, template, spec, suffix), prep, image_shape, pad, eos, len(tokenizer),
        evaluation=evaluation,
        decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip(),
    )


def stage_steps(stage: LlavaStageSpec, default_steps: int, examples: int, global_batch: int) -> int:
    """A stage's optimizer steps: its `steps`, else `epochs` over its examples (rounded up),
    else the train section's."""
    if stage.steps is not None:
        return stage.steps
    if stage.epochs is not None:
        return math.ceil(stage.epochs * examples / global_batch)
    return default_steps


def load_sets(trial: TrialConfig) -> tuple[list[LlavaSet], list[LlavaSet]]:
    """([stage 1's set, stage 2's set], [one set per eval set]) from `trial.data.llava`;
    reads nothing but the JSON files' indexes (built once) and the tokenizer."""
    spec = trial.data.llava
    if spec is None:
        raise ValueError("data.llava is not set")
    if not trial.llm.path:
        raise ValueError(f"llm {trial.llm.name!r}: LLaVA-format data needs a checkpoint path (for its tokenizer)")
    from PIL import Image

    tokenizer, pad, eos = load_tokenizer(trial.llm.path)
    prep = image_preprocessor(trial.vision, spec.image_aspect)
    image_shape = tuple(prep([Image.new("RGB", (8, 8))]).shape[1:])  # what one image becomes
    stages = []
    for number in (1, 2):
        stage = spec.stage(number)
        assert stage is not None and stage.image_folder is not None  # LlavaSpec's validator
        stages.append(build_set(
            Benchmark(f"llava-stage{number}", "reasoning", 0.0), stage.path, stage.image_folder, tokenizer, pad, eos,
            prep, image_shape, spec, stage.template or "auto",
        ))
    eval_template = spec.stage(2).template or "auto"  # evaluated as stage 2 trained it
    evals = [
        build_set(
            Benchmark(e.name, e.task_family, e.chance), e.path, e.image_folder or spec.image_folder or "", tokenizer,
            pad, eos, prep, image_shape, spec, eval_template, evaluation=e,
        )
        for e in spec.eval
    ]
    return stages, evals


# ---- a frozen tower's features, computed once and shared through the store ----------------

FEATURE_VERSION = 1  # bump when what a shard holds changes (layer, dtype, layout)
SHARD_RECORDS = 64  # records per shard: CLIP-L/14-336 in float16 is 1.2 MB a record


def tower_identity(tower, vision: VisionSpec, aspect: str) -> str:
    """What a tower's features of an image are a function of: its weights (a digest of
    every tensor, so a checkpoint, a pretrained tiny tower and a seeded random one are told
    apart) and the preprocessing (the processor's config, the aspect handling)."""
    digest = hashlib.sha256(f"{FEATURE_VERSION}|{aspect}|{vision.image_size}|{vision.patch_size}".encode())
    if vision.path:
        processor = _checkpoint_file(vision.path, "preprocessor_config.json")
        if processor is not None:
            with open(processor, "rb") as f:
                digest.update(f.read())
    for name, tensor in sorted(tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def feature_key(tower: str, records: Records) -> str:
    """A set's features: the tower (`tower_identity`) and the data file."""
    digest = hashlib.sha256(tower.encode())
    size = os.path.getsize(records.path)
    mtime = "" if records.uri.startswith("s3://") else os.stat(records.path).st_mtime_ns  # s3://: immutable by key
    digest.update(f"|{records.uri}|{size}|{mtime}|{INDEX_VERSION}|{len(records)}".encode())
    return digest.hexdigest()[:24]


class FeatureShards:
    """A set's frozen-tower patch features as shards of `SHARD_RECORDS` records (float16
    .npy, [records, patches, dim]) under `<store>/features/<key>/`, or under the local cache
    without a store. A shard is written whole, once (one PUT / atomic rename); readers keep
    a local copy and memory-map it, so a batch's rows cost no more than their bytes."""

    def __init__(self, key: str, n: int, store_uri: str | None):
        self.key, self.n = key, n
        self.store_uri = store_uri
        local_root = cache_dir() or os.path.join(tempfile.gettempdir(), "tokenscale")
        self.local = os.path.join(local_root, "features", key)
        self._open: dict[int, np.ndarray] = {}

    @property
    def shards(self) -> int:
        return -(-self.n // SHARD_RECORDS)

    def uri(self, k: int) -> str:
        name = f"shard-{k:06d}.npy"
        if self.store_uri is None:
            return os.path.join(self.local, name)
        return Store.open(self.store_uri).join("features", self.key, name)

    def missing(self) -> list[int]:
        store = Store(self.uri(0))
        return [k for k in range(self.shards) if not store.exists(self.uri(k))]

    def build(self, k: int, encode: Callable[[np.ndarray], np.ndarray], llava_set: LlavaSet) -> None:
        """Encode shard k's images (`encode`: pixels -> [n, P, D] features) and write it."""
        rows = range(k * SHARD_RECORDS, min(self.n, (k + 1) * SHARD_RECORDS))
        records = [llava_set.records[i] for i in rows]
        pixels = llava_set.pixels(records)
        features = encode(pixels).astype(np.float16)
        for i, record in enumerate(records):  # a text-only record's row: zeros (masked out anyway)
            if not (isinstance(record.get("image"), str) and record["image"]):
                features[i] = 0
        buffer = io.BytesIO()
        np.save(buffer, features)
        uri = self.uri(k)
        if uri.startswith("s3://"):
            Store(uri).put_bytes(uri, buffer.getvalue())
        else:
            write_atomically(uri, lambda f: f.write(buffer.getvalue()))

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._open:
            uri = self.uri(k)
            path = local_file_at(uri, os.path.join(self.local, os.path.basename(uri))) if uri.startswith("s3://") else uri
            if len(self._open) >= 8:  # a few shards open at a time: a batch draws from many
                self._open.pop(next(iter(self._open)))
            self._open[k] = np.load(path, mmap_mode="r")
        return self._open[k]

    def rows(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        """[len(index), P, D] float32: the features of records `index` (as the tower gave
        them, rounded to float16 in every trial alike)."""
        return np.stack([self._shard(int(i) // SHARD_RECORDS)[int(i) % SHARD_RECORDS] for i in index]).astype(np.float32)

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_open": {}}
