"""Offline benchmarks: deterministic, disjoint splits, answers consistent with images."""

from __future__ import annotations

import numpy as np
import pytest

from tokenscale.workers.benchmarks import BENCHMARKS, EOS, INK, VOCAB, generate


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_deterministic_and_well_formed(name):
    a = generate(name, "train", 20, seed=7, image_size=32)
    b = generate(name, "train", 20, seed=7, image_size=32)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.answers, b.answers)
    assert a.images.shape == (20, 3, 32, 32) and a.images.dtype == np.float32
    assert 0 <= a.images.min() and a.images.max() <= 1
    assert (a.answers[:, -1] == EOS).all()
    assert a.questions.max() < len(VOCAB)
    evals = generate(name, "eval", 20, seed=7, image_size=32)
    assert not np.array_equal(a.images, evals.images), "train and eval come from different streams"
    assert 0 < BENCHMARKS[name].chance < 1


def test_answers_vary():
    for name in BENCHMARKS:
        split = generate(name, "train", 200, seed=1, image_size=32)
        assert len(np.unique(split.answers[:, 0])) > 1, name


def _answer(question: str, objects: list[tuple[str, str]]) -> str:
    """An independent reading of clevr's eight templates: the answer from the scene."""
    import re

    from tokenscale.workers.benchmarks import CLEVR_COUNTS

    colors, shapes = [c for c, _ in objects], [s for _, s in objects]
    plural = {"squares": "square", "crosses": "cross"}
    if m := re.fullmatch(r"what color is the (\w+) \?", question):
        (color,) = [c for c, s in objects if s == m[1]]
        return color
    if m := re.fullmatch(r"what shape is the (\w+) thing \?", question):
        (shape,) = [s for c, s in objects if c == m[1]]
        return shape
    if m := re.fullmatch(r"how many (\w+) things are there \?", question):
        return CLEVR_COUNTS[colors.count(m[1])]
    if m := re.fullmatch(r"how many (squares|crosses) are there \?", question):
        return CLEVR_COUNTS[shapes.count(plural[m[1]])]
    if m := re.fullmatch(r"are there more (\w+) things than (\w+) things \?", question):
        return "yes" if colors.count(m[1]) > colors.count(m[2]) else "no"
    if m := re.fullmatch(r"is there a (\w+) (square|cross) \?", question):
        return "yes" if (m[1], m[2]) in objects else "no"
    if m := re.fullmatch(r"how many things are (\w+) or (\w+) \?", question):
        return CLEVR_COUNTS[colors.count(m[1]) + colors.count(m[2])]
    if m := re.fullmatch(r"is there a (\w+) thing and a (\w+) thing \?", question):
        return "yes" if m[1] in colors and m[2] in colors else "no"
    raise AssertionError(f"not a clevr template: {question!r}")


def test_clevr_answers_follow_from_the_scene_and_every_template_occurs():
    import re

    from tokenscale.workers.benchmarks import _clevr_question, _clevr_scene

    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        image, labels, objects = _clevr_scene(rng, 24)
        assert 2 <= len(objects) <= 4
        # every object is drawn: its colour's ink label covers pixels
        for color, _ in objects:
            assert (labels[0] == INK.index(color) + 1).any()
        question, answer = _clevr_question(rng, objects)
        assert _answer(question, objects) == answer, (question, objects)
        seen.add(re.sub(r"\b(red|green|blue|yellow|purple|cyan|square|cross|squares|crosses)\b", "X", question))
    assert len(seen) == 8, seen


def test_clevr_asks_a_named_template_and_refuses_one_the_scene_cannot_answer():
    """benchmarks/clevr_templates.py scores the templates apart: each name gives its own
    question skeleton, answered right; only the two "the object picked out by" templates can
    be unanswerable (no shape, or no colour, occurs once), and then they raise."""
    import re

    import pytest

    from tokenscale.workers.benchmarks import CLEVR_TEMPLATES, _clevr_question, _clevr_scene

    rng = np.random.default_rng(1)
    skeletons: dict[str, set[str]] = {t: set() for t in CLEVR_TEMPLATES}
    refused = set()
    for _ in range(300):
        _, _, objects = _clevr_scene(rng, 24)
        colors, shapes = [c for c, _ in objects], [s for _, s in objects]
        for template in CLEVR_TEMPLATES:
            answerable = {
                "color_of_shape": any(shapes.count(s) == 1 for s in shapes),
                "shape_of_color": any(colors.count(c) == 1 for c in colors),
            }.get(template, True)
            if not answerable:
                with pytest.raises(ValueError, match=template):
                    _clevr_question(rng, objects, template)
                refused.add(template)
                continue
            question, answer = _clevr_question(rng, objects, template)
            assert _answer(question, objects) == answer, (template, question, objects)
            skeletons[template].add(
                re.sub(r"\b(red|green|blue|yellow|purple|cyan|square|cross|squares|crosses)\b", "X", question))
    assert all(len(s) == 1 for s in skeletons.values()), skeletons
    assert len({next(iter(s)) for s in skeletons.values()}) == 8
    assert refused == {"color_of_shape", "shape_of_color"}


def test_clevr_questions_are_left_padded_to_the_longest():
    split = generate("clevr", "train", 50, seed=3, image_size=24)
    pad = VOCAB.index("<pad>")
    lengths = (split.questions != pad).sum(axis=1)
    assert lengths.max() == split.questions.shape[1] and lengths.min() < lengths.max()
    assert ((split.questions == pad).cumprod(axis=1).sum(axis=1) == split.questions.shape[1] - lengths).all()


def test_recall_answers_the_objects_colour_from_a_fixed_table():
    """recall: the question names a relation and never the colour; the answer is the table's
    fact for the colour drawn (read back from the image's ink labels); each relation maps the
    colours one-to-one onto the answers, so no answer is more frequent than another."""
    from tokenscale.workers.benchmarks import (
        COLORS,
        RECALL_ANSWERS,
        RECALL_RELATIONS,
        RECALL_TABLE,
        TOKEN_ID,
    )

    for relation in RECALL_RELATIONS:
        assert sorted(RECALL_TABLE[(relation, color)] for color in COLORS) == sorted(RECALL_ANSWERS)
    assert len({tuple(RECALL_TABLE[(r, c)] for c in COLORS) for r in RECALL_RELATIONS}) == len(RECALL_RELATIONS)
    split = generate("recall", "eval", 300, seed=3, image_size=24)
    words = {i: w for w, i in TOKEN_ID.items()}
    relations_seen = set()
    for question, answer, labels in zip(split.questions, split.answers, split.labels, strict=True):
        text = [words[int(t)] for t in question if words[int(t)] != "<pad>"]
        assert not set(text) & set(COLORS), "the question must not name the colour"
        relation = text[1]
        relations_seen.add(relation)
        ink = np.unique(labels[0][labels[0] > 0])
        (color,) = [INK[i - 1] for i in ink]
        assert words[int(answer[0])] == RECALL_TABLE[(relation, color)]
    assert relations_seen == set(RECALL_RELATIONS)
