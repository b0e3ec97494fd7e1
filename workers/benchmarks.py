"""Benchmarks generated offline from a seed: small rendered images + one question each.

Two task families, as in the paper:
  reasoning — questions about rendered shapes (color, shape, count, which side, clevr's
              compositions, recall of facts about the object): the answer depends on
              coarse, global content, so few visual tokens should suffice;
  ocr       — read one character of a 3-character field printed at a fixed place, like a
              box on a form (digits, letters): the answer depends on fine detail at one place
              in the image, so tokens should matter. The field's box index is the question's
              last word ("what digit is in box two").

Every example is (image [3, S, S] float32 in [0, 1], question token ids, answer token
ids). Within a benchmark all answers have the same length; questions are left-padded to
the split's longest (clevr's templates differ in length).
Generation is deterministic in (benchmark, split, seed); pixels are quantized to 8 bits,
so a split is stored exactly as uint8 in a cache file (`$TOKENSCALE_CACHE`, default
~/.cache/tokenscale/benchmarks; `off` disables it), keyed by (benchmark, split, n, seed,
image size, GENERATOR_VERSION) and written atomically.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tokenscale.store import write_atomically

# Bump whenever rendering, questions, answers or the vocabulary change, or a benchmark is
# added: old cache files (splits, and the tower, which pretrains on PRETRAIN_BENCHMARKS) are
# then ignored, and a generated-data trial's config hash moves (tokenscale/config.py).
GENERATOR_VERSION = 7

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "cyan": (0.1, 0.85, 0.9),
}
SHAPES = ("square", "circle", "triangle", "cross")
NUMBER_WORDS = ("one", "two", "three", "four")
LETTERS = "ACEHKLMPRTUX"
ORDINALS = ("first", "second", "third", "fourth")

# 3x5 bitmap font: digits and the letters above.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", "A": "010101111101101", "C": "111100100100111",
    "E": "111100111100111", "H": "101101111101101", "K": "101110100110101",
    "L": "100100100100111", "M": "101111111101101", "P": "111101111100100",
    "R": "110101110101101", "T": "111010010010010", "U": "101101101101111",
    "X": "101101010101101",
}

# Dense scene labels drawn with each image, per pixel: ink (one of INK, +1), shape (+1),
# glyph (+1); 0 = background. The stand-in for CLIP's pretraining signal: what is where.
LABEL_KINDS = ("ink", "shape", "glyph")
INK = (*COLORS, "dark", "light")
GLYPHS = "0123456789" + LETTERS

SPECIAL = ("<pad>", "<eos>")
WORDS = (
    "what", "color", "is", "the", "shape", "it", "how", "many", "shapes", "are", "there",
    "left", "right", "which", "side", "on", "of", "in", "box", "digit", "letter", "yes", "no", "?",
    # the clevr benchmark's
    "thing", "things", "squares", "crosses", "more", "than", "or", "and", "a", "zero",
    # the recall benchmark's: its relations and its answers (RECALL_RELATIONS, RECALL_ANSWERS)
    "belongs", "to", "king", "river", "star", "song", "city", "bird", "stone", "ship",
    "apple", "bell", "coin", "drum", "egg", "flag",
)
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        SPECIAL + WORDS + tuple(COLORS) + SHAPES + NUMBER_WORDS + ORDINALS
        + tuple("0123456789") + tuple(c.lower() for c in LETTERS)
    )
)
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
EOS = TOKEN_ID["<eos>"]


def encode(text: str) -> list[int]:
    return [TOKEN_ID[w] for w in text.split()]


@dataclass(frozen=True)
class Benchmark:
    name: str
    task_family: str
    chance: float  # expected score of uniform guessing among the valid answers
    # None: examples read from files, not generated (LLaVA-format eval sets, llava_data.py)
    make: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray, str, str]] | None = None


@dataclass
class Split:
    """A benchmark's examples, stacked."""

    benchmark: Benchmark
    images: np.ndarray  # [n, 3, S, S] float32
    questions: np.ndarray  # [n, Q] int64
    answers: np.ndarray  # [n, G] int64 (ends with <eos>; shorter answers right-padded with <eos>)
    # [n, len(LABEL_KINDS), S, S] uint8: what is drawn at each pixel (0 = background). Only
    # the vision tower's pretraining reads it (dense scene labels, never the question/answer).
    labels: np.ndarray | None = None
    # The token ids that pad questions (on the left) and end answers (VOCAB's)
    pad_id: int = TOKEN_ID["<pad>"]
    eos_id: int = EOS

    def __len__(self) -> int:
        return len(self.images)

    def question_mask(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """1 on the real question tokens, 0 on the left padding."""
        questions = self.questions[index]
        return (np.cumsum(questions != self.pad_id, axis=1) > 0).astype(np.int64)

    def answer_mask(self, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """1 on the answer tokens up to and including the first <eos>, 0 after it."""
        is_eos = self.answers[index] == self.eos_id
        return ((np.cumsum(is_eos, axis=1) - is_eos) == 0).astype(np.int64)

    def batch(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The examples `index` as VLM.forward takes them (numpy; workers/train.py's `_batch`
        makes tensors): the same keys as a LLaVA set's batch where they apply."""
        return {
            "images": self.images[index], "questions": self.questions[index], "answers": self.answers[index],
            "question_mask": self.question_mask(index), "answer_mask": self.answer_mask(index),
        }


# ---- rendering --------------------------------------------------------------------------


def _canvas(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey image and its empty label map (see `LABEL_KINDS`)."""
    base = rng.uniform(0.35, 0.55)
    image = np.clip(base + rng.normal(0, 0.04, (3, size, size)), 0, 1).astype(np.float32)
    return image, np.zeros((len(LABEL_KINDS), size, size), dtype=np.uint8)


def _shape_mask(kind: str, size: int, cy: int, cx: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    dy, dx = yy - cy, xx - cx
    if kind == "square":
        return (abs(dy) <= radius) & (abs(dx) <= radius)
    if kind == "circle":
        return dy**2 + dx**2 <= radius**2
    if kind == "triangle":
        return (dy >= -radius) & (dy <= radius) & (abs(dx) * 2 <= (dy + radius))
    if kind == "cross":
        thick = max(1, radius // 3)
        return ((abs(dy) <= radius) & (abs(dx) <= thick)) | ((abs(dx) <= radius) & (abs(dy) <= thick))
    raise ValueError(kind)


def _paint(image: np.ndarray, labels: np.ndarray, mask: np.ndarray, color: str, shape: str) -> None:
    for channel, value in enumerate(COLORS[color]):
        image[channel][mask] = value
    labels[0][mask] = INK.index(color) + 1
    labels[1][mask] = SHAPES.index(shape) + 1


def _draw_text(image: np.ndarray, labels: np.ndarray, text: str, top: int, left: int, scale: int, ink: float) -> None:
    for i, char in enumerate(text):
        bits = np.array([int(b) for b in _FONT[char]], dtype=bool).reshape(5, 3)
        glyph = np.kron(bits, np.ones((scale, scale), dtype=bool))
        y, x = top, left + i * (3 * scale + 1)
        region = image[:, y : y + glyph.shape[0], x : x + glyph.shape[1]]
        region[:, glyph] = ink
        labels[0, y : y + glyph.shape[0], x : x + glyph.shape[1]][glyph] = INK.index("dark" if ink < 0.5 else "light") + 1
        labels[2, y : y + glyph.shape[0], x : x + glyph.shape[1]][glyph] = GLYPHS.index(char) + 1


# ---- the benchmarks ---------------------------------------------------------------------


def _color(rng: np.random.Generator, size: int):
    image, labels = _canvas(rng, size)
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    radius = int(rng.integers(size // 8, size // 4))
    cy, cx = rng.integers(radius + 1, size - radius - 1, 2)
    _paint(image, labels, _shape_mask(shape, size, cy, cx, radius), color, shape)
    return image, labels, "what color is the shape ?", color


def _shape(rng: np.random.Generator, size: int):
    image, labels = _canvas(rng, size)
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    radius = int(rng.integers(size // 6, size // 4 + 1))
    cy, cx = rng.integers(radius + 1, size - radius - 1, 2)
    _paint(image, labels, _shape_mask(shape, size, cy, cx, radius), color, shape)
    return image, labels, "what shape is it ?", shape


def _count(rng: np.random.Generator, size: int):
    image, labels = _canvas(rng, size)
    count = int(rng.integers(1, len(NUMBER_WORDS) + 1))
    color = str(rng.choice(list(COLORS)))
    cell = size // 2  # one shape per quadrant, so shapes never touch
    for quadrant in rng.permutation(4)[:count]:
        oy, ox = (quadrant // 2) * cell, (quadrant % 2) * cell
        radius = max(2, cell // 5)
        cy, cx = rng.integers(radius + 1, cell - radius - 1, 2)
        _paint(image, labels, _shape_mask("square", size, oy + cy, ox + cx, radius), color, "square")
    return image, labels, "how many shapes are there ?", NUMBER_WORDS[count - 1]


def _spatial(rng: np.random.Generator, size: int):
    """One shape, wholly in the left or the right half: which side is it on?"""
    image, labels = _canvas(rng, size)
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    radius = int(rng.integers(max(2, size // 10), max(3, size // 6) + 1))
    side = "left" if rng.random() < 0.5 else "right"
    cx = int(rng.integers(radius + 1, size // 2 - radius))  # never touches the midline
    if side == "right":
        cx = size - 1 - cx
    cy = int(rng.integers(radius + 1, size - radius - 1))
    _paint(image, labels, _shape_mask(shape, size, cy, cx, radius), color, shape)
    return image, labels, "which side is the shape on ?", side


# ---- clevr: compositional questions about a small scene ------------------------------------
#
# Why this is reasoning in the paper's sense. The paper's reasoning benchmarks (GQA, MMBench,
# ScienceQA...) ask questions whose visual content is small, a few global facts about the
# scene, while the work is on the language side: parse the question, pick out objects by
# their attributes, count, compare, combine. CLEVR, the field's synthetic benchmark for it,
# is built so: a scene of a few objects with a few attributes, and questions composed from
# templates. Here, at the demo's 24 px: 2-4 objects, one per cell of a 2 x 2 layout (so they
# never touch), each with one of 6 colours and one of 2 shapes (square, cross: the two the
# tiny tower tells apart by their ink, at a few pixels). The whole scene is at most 4 x
# (colour, shape): a summary that fits in a handful of numbers, so a few visual tokens
# carry what any question needs, and a compressor that sees the question (QueCC) can keep
# just that. Eight templates, each needing a different composition of the same facts:
# attribute of the object picked out by the other attribute, counting with a colour or a
# shape filter, comparing two counts, existence of a conjunction, counting with "or",
# existence of two things with "and". Nothing here is chosen to make either exponent come
# out one way: the scene is as small as the OCR field, and the templates are CLEVR's kinds.

CLEVR_SHAPES = ("square", "cross")
CLEVR_PLURAL = {"square": "squares", "cross": "crosses"}
CLEVR_COUNTS = ("zero", *NUMBER_WORDS)  # 0..4 objects


def _clevr_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    image, labels = _canvas(rng, size)
    cell = size // 2
    objects = []
    for quadrant in rng.permutation(4)[: int(rng.integers(2, 5))]:
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(CLEVR_SHAPES))
        radius = max(2, int(cell * 0.3))
        oy, ox = (quadrant // 2) * cell, (quadrant % 2) * cell
        cy, cx = oy + cell // 2 + int(rng.integers(-1, 2)), ox + cell // 2 + int(rng.integers(-1, 2))
        _paint(image, labels, _shape_mask(shape, size, cy, cx, radius), color, shape)
        objects.append((color, shape))
    return image, labels, objects


CLEVR_TEMPLATES = (
    "color_of_shape", "shape_of_color", "count_color", "count_shape", "compare_counts", "exists_conjunction",
    "count_or", "exists_and",
)


def _clevr_question(rng: np.random.Generator, objects: list[tuple[str, str]], template: str | None = None) -> tuple[str, str]:
    """One of eight templates (CLEVR_TEMPLATES), drawn uniformly among those the scene can
    answer; `template` names the one to ask instead (`ValueError` when this scene cannot
    answer it), for measuring the templates apart."""
    colors = [c for c, _ in objects]
    shapes = [s for _, s in objects]
    any_color = lambda: str(rng.choice(list(COLORS)))  # noqa: E731
    templates = []
    unique_shapes = [s for s in CLEVR_SHAPES if shapes.count(s) == 1]
    if unique_shapes:  # the attribute of the object picked out by the other one
        shape = str(rng.choice(unique_shapes))
        templates.append(("color_of_shape", f"what color is the {shape} ?", colors[shapes.index(shape)]))
    unique_colors = [c for c in COLORS if colors.count(c) == 1]
    if unique_colors:
        color = str(rng.choice(unique_colors))
        templates.append(("shape_of_color", f"what shape is the {color} thing ?", shapes[colors.index(color)]))
    color = any_color()
    templates.append(("count_color", f"how many {color} things are there ?", CLEVR_COUNTS[colors.count(color)]))
    shape = str(rng.choice(CLEVR_SHAPES))
    templates.append(("count_shape", f"how many {CLEVR_PLURAL[shape]} are there ?", CLEVR_COUNTS[shapes.count(shape)]))
    first, second = (str(c) for c in rng.choice(list(COLORS), 2, replace=False))
    templates.append(("compare_counts", f"are there more {first} things than {second} things ?",
                      "yes" if colors.count(first) > colors.count(second) else "no"))
    color, shape = any_color(), str(rng.choice(CLEVR_SHAPES))
    templates.append(("exists_conjunction", f"is there a {color} {shape} ?", "yes" if (color, shape) in objects else "no"))
    first, second = (str(c) for c in rng.choice(list(COLORS), 2, replace=False))
    templates.append(("count_or", f"how many things are {first} or {second} ?",
                      CLEVR_COUNTS[colors.count(first) + colors.count(second)]))
    first, second = (str(c) for c in rng.choice(list(COLORS), 2, replace=False))
    templates.append(("exists_and", f"is there a {first} thing and a {second} thing ?",
                      "yes" if first in colors and second in colors else "no"))
    if template is not None:
        asked = [t for t in templates if t[0] == template]
        if not asked:
            raise ValueError(f"this scene cannot answer clevr template {template!r}")
        return asked[0][1:]
    return templates[int(rng.integers(len(templates)))][1:]


def _clevr(rng: np.random.Generator, size: int):
    image, labels, objects = _clevr_scene(rng, size)
    question, answer = _clevr_question(rng, objects)
    return image, labels, question, answer


# guessing uniformly among a template's answers, averaged over the eight templates
CLEVR_CHANCE = (1 / len(COLORS) + 1 / len(CLEVR_SHAPES) + 2 / len(CLEVR_COUNTS) + 1 / 2 + 1 / 2
                + 1 / len(CLEVR_COUNTS) + 1 / 2) / 8


# ---- recall: a fact about the object, from knowledge the LM must hold -------------------------
#
# Why this is reasoning in the paper's sense. Besides composing (clevr, above), the paper's
# reasoning benchmarks (MMMU, ScienceQA, MMBench, SEED, ...) mostly ask for one small visual
# fact joined to knowledge the LLM brings: what an object is for, what it belongs to, what
# follows from it. The visual side is little and global; the rest is in the LLM's weights,
# which is why a larger LLM answers more of them. A from-scratch tiny LM has no world
# knowledge, so the knowledge here is a fixed table of facts (RECALL_TABLE), the same in
# every split, that the LM can only learn from its training examples and must hold in its
# weights: for each of 8 relations (as many question kinds as clevr's templates), which of 6
# answers goes with each of the 6 colours (48 facts, each relation a permutation of the
# answers, so every answer is equally frequent and the prior is chance). The visual fact is
# the colour of the one object, which survives pooling to a single token (`color` is solved
# at V = 1 by every trial), and the question never names it. Nothing here is chosen to make
# either exponent come out one way: the table's size follows clevr's 8 question kinds and
# the benchmark's 6 colours, and the table is drawn once from a fixed seed.

RECALL_RELATIONS = ("king", "river", "star", "song", "city", "bird", "stone", "ship")
RECALL_ANSWERS = ("apple", "bell", "coin", "drum", "egg", "flag")


# The facts, written out (once drawn with numpy's default_rng(241103312), the paper's arXiv
# number, permuting the answers per relation; written out so that no numpy release can
# change them): per relation, the answer for each colour in COLORS' order.
_RECALL_ROWS = {
    "king": ("coin", "bell", "apple", "drum", "egg", "flag"),
    "river": ("drum", "bell", "egg", "apple", "flag", "coin"),
    "star": ("egg", "flag", "apple", "bell", "coin", "drum"),
    "song": ("apple", "flag", "egg", "drum", "bell", "coin"),
    "city": ("flag", "drum", "bell", "apple", "egg", "coin"),
    "bird": ("egg", "coin", "apple", "bell", "flag", "drum"),
    "stone": ("coin", "flag", "bell", "egg", "apple", "drum"),
    "ship": ("flag", "egg", "drum", "apple", "coin", "bell"),
}
RECALL_TABLE: dict[tuple[str, str], str] = {
    (relation, color): answer
    for relation, answers in _RECALL_ROWS.items()
    for color, answer in zip(COLORS, answers, strict=True)
}


def _recall(rng: np.random.Generator, size: int):
    """One object, drawn as `color`'s; the question asks which answer of a relation goes
    with the object's colour (RECALL_TABLE)."""
    image, labels, _, color = _color(rng, size)
    relation = str(rng.choice(RECALL_RELATIONS))
    return image, labels, f"which {relation} belongs to the shape ?", RECALL_TABLE[(relation, color)]


def form_layout(size: int, length: int) -> tuple[int, int, int, int]:
    """The fixed text field of the OCR benchmarks, like a box on a form: `length` cells in a
    row across the image, vertically centred. Returns (cell width, cell height, top, scale):
    the k-th character always lives in the same columns of the image."""
    cell_w = size // length
    scale = max(1, (cell_w - 2) // 3)
    while scale > 1 and 5 * scale + 2 > size:
        scale -= 1
    cell_h = 5 * scale + 2
    return cell_w, cell_h, (size - cell_h) // 2, scale


def _reading(alphabet: str, length: int, word: str):
    """Read the k-th character of a `length`-character field at a fixed place (a form field):
    each glyph is drawn in its own cell, jittered by up to 1 px, in dark or light ink."""

    def make(rng: np.random.Generator, size: int):
        image, labels = _canvas(rng, size)
        text = "".join(rng.choice(list(alphabet), length))
        cell_w, cell_h, top, scale = form_layout(size, length)
        left0 = (size - cell_w * length) // 2
        ink = 0.02 if rng.random() < 0.5 else 0.98
        for i, char in enumerate(text):
            # jitter inside the cell, always leaving a 1-px gap to the next glyph
            dx = int(rng.integers(0, max(1, cell_w - 3 * scale)))
            dy = int(rng.integers(0, max(1, cell_h - 5 * scale)))
            _draw_text(image, labels, char, top + dy, left0 + i * cell_w + dx, scale, ink)
        position = int(rng.integers(length))
        # The field's index is the question's last token, right where the answer is predicted:
        # the query that looks the cell up is then that token itself.
        return image, labels, f"what {word} is in box {NUMBER_WORDS[position]}", text[position].lower()

    return make


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("color", "reasoning", 1 / len(COLORS), _color),
        Benchmark("shape", "reasoning", 1 / len(SHAPES), _shape),
        Benchmark("count", "reasoning", 1 / len(NUMBER_WORDS), _count),
        Benchmark("spatial", "reasoning", 1 / 2, _spatial),
        Benchmark("clevr", "reasoning", CLEVR_CHANCE, _clevr),
        Benchmark("recall", "reasoning", 1 / len(RECALL_ANSWERS), _recall),
        Benchmark("digits", "ocr", 1 / 10, _reading("0123456789", 3, "digit")),
        Benchmark("letters", "ocr", 1 / len(LETTERS), _reading(LETTERS, 3, "letter")),
    )
}
# What the tiny tower pretrains on (workers/model.py): every benchmark above but recall, fixed
# here, as the tower's cache key does not name them (a benchmark registered later, as
# benchmarks/clevr_templates.py does, must not change the tower). recall's images are
# color's, drawn by the same code: nothing new to see.
PRETRAIN_BENCHMARKS: tuple[str, ...] = tuple(sorted(set(BENCHMARKS) - {"recall"}))


def cache_dir() -> str | None:
    """Where generated splits are cached; None when caching is off."""
    path = os.environ.get("TOKENSCALE_CACHE", "")
    if path.lower() in ("off", "0", "none", "false"):
        return None
    return path or os.path.join(os.path.expanduser("~"), ".cache", "tokenscale", "benchmarks")


def _cache_path(name: str, split: str, n: int, seed: int, image_size: int) -> str | None:
    root = cache_dir()
    if root is None:
        return None
    return os.path.join(root, f"{name}-{split}-n{n}-seed{seed}-img{image_size}-v{GENERATOR_VERSION}.npz")


def _load_cached(path: str, bench: Benchmark) -> Split | None:
    try:
        with np.load(path) as data:
            images = data["images"].astype(np.float32) / 255.0
            return Split(
                bench, images, data["questions"].astype(np.int64), data["answers"].astype(np.int64), data["labels"]
            )
    except (OSError, KeyError, ValueError):
        return None  # missing or unreadable (e.g. a partial file from another writer): regenerate


def _store_cached(path: str, **arrays: np.ndarray) -> None:
    try:
        write_atomically(path, lambda f: np.savez(f, **arrays))
    except OSError:
        pass  # a read-only or full disk only costs regeneration next time


def generate(name: str, split: str, n: int, seed: int, image_size: int, cache: bool = True) -> Split:
    """`n` examples of benchmark `name`; train and eval use disjoint random streams."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    path = _cache_path(name, split, n, seed, image_size) if cache else None
    if path is not None:
        cached = _load_cached(path, bench)
        if cached is not None:
            return cached
    stream = zlib.crc32(f"{name}/{split}".encode())
    rng = np.random.default_rng([seed, stream])
    images, labels, questions, answers = [], [], [], []
    for _ in range(n):
        image, label, question, answer = bench.make(rng, image_size)
        images.append(image)
        labels.append(label)
        questions.append(encode(question))
        answers.append(encode(answer) + [EOS])
    pixels = np.rint(np.stack(images) * 255).astype(np.uint8)
    # clevr's templates differ in length: left-padded to the split's longest (masked out)
    width = max(len(q) for q in questions)
    questions = [[TOKEN_ID["<pad>"]] * (width - len(q)) + q for q in questions]
    q, a, lab = np.array(questions, dtype=np.int64), np.array(answers, dtype=np.int64), np.stack(labels)
    if path is not None:
        _store_cached(path, images=pixels, questions=q, answers=a, labels=lab)
    return Split(bench, pixels.astype(np.float32) / 255.0, q, a, lab)
