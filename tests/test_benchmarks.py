"""Offline benchmarks: deterministic, disjoint splits, answers consistent with images."""

from __future__ import annotations

import numpy as np
import pytest

from tokenscale.workers.benchmarks import BENCHMARKS, EOS, VOCAB, generate


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
