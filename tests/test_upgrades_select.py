"""experiments.upgrades select's diagnostic of how close a candidate lies to OLD on the same images."""
from __future__ import annotations

import numpy as np

from experiments.upgrades import same_image_cosine


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_same_image_cosine_is_one_for_the_same_vectors_and_tells_a_row_shift():
    rng = np.random.default_rng(0)
    old = _unit(rng.normal(size=(20, 16)))
    assert same_image_cosine(old, old) == {"mean": 1.0, "own_is_nearest": 1.0}
    shifted = np.roll(old, 1, axis=0)  # each image carries its neighbour's vector
    got = same_image_cosine(shifted, old)
    assert got["own_is_nearest"] == 0.0 and got["mean"] < 0.5
    noisy = _unit(old + 0.1 * rng.normal(size=old.shape))
    got = same_image_cosine(noisy, old)
    assert got["own_is_nearest"] == 1.0 and 0.9 < got["mean"] < 1.0
