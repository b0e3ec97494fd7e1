"""Benchmarks generated offline from a seed: small rendered images + one question each.

Two task families, as in the paper:
  reasoning — questions about rendered shapes (color, shape, count, spatial relation):
              the answer depends on coarse, global content, so few visual tokens suffice;
  ocr       — read one character of a rendered string (digits, letters): the answer
              depends on fine detail at one place in the image, so tokens matter.

Every example is (image [3, S, S] float32 in [0, 1], question token ids, answer token
ids). Within a benchmark all questions have the same length and all answers too, so a
batch needs no padding. Generation is deterministic in (benchmark, split, seed).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

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

SPECIAL = ("<pad>", "<eos>")
WORDS = (
    "what", "color", "is", "the", "shape", "it", "how", "many", "shapes", "are", "there",
    "left", "of", "digit", "letter", "yes", "no", "?",
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
    make: Callable[[np.random.Generator, int], tuple[np.ndarray, str, str]]


@dataclass
class Split:
    """A benchmark's examples, stacked."""

    benchmark: Benchmark
    images: np.ndarray  # [n, 3, S, S] float32
    questions: np.ndarray  # [n, Q] int64
    answers: np.ndarray  # [n, G] int64 (last token is <eos>)

    def __len__(self) -> int:
        return len(self.images)


# ---- rendering --------------------------------------------------------------------------


def _canvas(rng: np.random.Generator, size: int) -> np.ndarray:
    base = rng.uniform(0.35, 0.55)
    return np.clip(base + rng.normal(0, 0.04, (3, size, size)), 0, 1).astype(np.float32)


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


def _paint(image: np.ndarray, mask: np.ndarray, color: tuple[float, float, float]) -> None:
    for channel, value in enumerate(color):
        image[channel][mask] = value


def _draw_text(image: np.ndarray, text: str, top: int, left: int, scale: int, ink: float) -> None:
    for i, char in enumerate(text):
        bits = np.array([int(b) for b in _FONT[char]], dtype=bool).reshape(5, 3)
        glyph = np.kron(bits, np.ones((scale, scale), dtype=bool))
        y, x = top, left + i * (3 * scale + 1)
        region = image[:, y : y + glyph.shape[0], x : x + glyph.shape[1]]
        region[:, glyph] = ink


# ---- the benchmarks ---------------------------------------------------------------------


def _color(rng: np.random.Generator, size: int):
    image = _canvas(rng, size)
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    radius = int(rng.integers(size // 8, size // 4))
    cy, cx = rng.integers(radius + 1, size - radius - 1, 2)
    _paint(image, _shape_mask(shape, size, cy, cx, radius), COLORS[color])
    return image, "what color is the shape ?", color


def _shape(rng: np.random.Generator, size: int):
    image = _canvas(rng, size)
    color = rng.choice(list(COLORS))
    shape = rng.choice(SHAPES)
    radius = int(rng.integers(size // 6, size // 4 + 1))
    cy, cx = rng.integers(radius + 1, size - radius - 1, 2)
    _paint(image, _shape_mask(shape, size, cy, cx, radius), COLORS[color])
    return image, "what shape is it ?", shape


def _count(rng: np.random.Generator, size: int):
    image = _canvas(rng, size)
    count = int(rng.integers(1, len(NUMBER_WORDS) + 1))
    color = COLORS[rng.choice(list(COLORS))]
    cell = size // 2  # one shape per quadrant, so shapes never touch
    for quadrant in rng.permutation(4)[:count]:
        oy, ox = (quadrant // 2) * cell, (quadrant % 2) * cell
        radius = max(2, cell // 5)
        cy, cx = rng.integers(radius + 1, cell - radius - 1, 2)
        _paint(image, _shape_mask("square", size, oy + cy, ox + cx, radius), color)
    return image, "how many shapes are there ?", NUMBER_WORDS[count - 1]


def _spatial(rng: np.random.Generator, size: int):
    image = _canvas(rng, size)
    first, second = rng.choice(list(COLORS), 2, replace=False)
    radius = max(2, size // 10)
    xs = rng.choice(np.arange(radius + 1, size - radius - 1), 2, replace=False)
    for color, x in zip((first, second), xs, strict=True):
        y = int(rng.integers(radius + 1, size - radius - 1))
        _paint(image, _shape_mask("circle", size, y, int(x), radius), COLORS[color])
    answer = "yes" if xs[0] < xs[1] else "no"
    return image, f"is the {first} shape left of the {second} shape ?", answer


def _reading(alphabet: str, length: int, word: str):
    def make(rng: np.random.Generator, size: int):
        image = _canvas(rng, size)
        text = "".join(rng.choice(list(alphabet), length))
        scale = 1 if size < 24 else (size - 2) // (4 * length)
        scale = max(1, min(scale, (size - 2) // 5))
        width = length * (3 * scale + 1) - 1
        top = int(rng.integers(0, size - 5 * scale + 1))
        left = int(rng.integers(0, max(1, size - width + 1)))
        ink = 0.02 if rng.random() < 0.5 else 0.98
        _draw_text(image, text, top, left, scale, ink)
        position = int(rng.integers(length))
        return image, f"what is the {ORDINALS[position]} {word} ?", text[position].lower()

    return make


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("color", "reasoning", 1 / len(COLORS), _color),
        Benchmark("shape", "reasoning", 1 / len(SHAPES), _shape),
        Benchmark("count", "reasoning", 1 / len(NUMBER_WORDS), _count),
        Benchmark("spatial", "reasoning", 1 / 2, _spatial),
        Benchmark("digits", "ocr", 1 / 10, _reading("0123456789", 4, "digit")),
        Benchmark("letters", "ocr", 1 / len(LETTERS), _reading(LETTERS, 3, "letter")),
    )
}


def generate(name: str, split: str, n: int, seed: int, image_size: int) -> Split:
    """`n` examples of benchmark `name`; train and eval use disjoint random streams."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: choose from {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    stream = zlib.crc32(f"{name}/{split}".encode())
    rng = np.random.default_rng([seed, stream])
    images, questions, answers = [], [], []
    for _ in range(n):
        image, question, answer = bench.make(rng, image_size)
        images.append(image)
        questions.append(encode(question))
        answers.append(encode(answer) + [EOS])
    return Split(bench, np.stack(images), np.array(questions, dtype=np.int64), np.array(answers, dtype=np.int64))
