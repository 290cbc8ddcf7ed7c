"""The synthetic dataset: deterministic, truthful labels, and held-out pairs absent from train."""
from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from clipmodel import synthetic
from clipmodel.synthetic import COLORS, POSITIONS, RGB, SHAPES, SIZES, Object, Scene, holdout_pairs, render, sample
from pipeline.params import DataParams
from pipeline.sources import read_synthetic, split_of


def test_vocabulary():
    assert len(SHAPES) >= 8 and len(COLORS) >= 8
    assert {"circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon"} <= set(SHAPES)
    assert set(SIZES) == {"small", "large"} and len(POSITIONS) == 5
    assert set(RGB) == set(COLORS) and set(synthetic.OUTLINES) == set(SHAPES)


def test_same_seed_same_bytes_other_seed_other_data():
    def items(seed):
        return [sample(seed, i, 3) for i in range(20)]
    a, b, c = items(0), items(0), items(1)
    assert [cap for _, cap in a] == [cap for _, cap in b]
    assert all(render(sa, 32).tobytes() == render(sb, 32).tobytes() for (sa, _), (sb, _) in zip(a, b))
    assert [cap for _, cap in a] != [cap for _, cap in c]


def test_more_captions_keep_the_first_and_describe_the_same_scene():
    one, five = sample(0, 7, 3), sample(0, 7, 3, captions=5)
    assert one[0] == five[0] and five[1][0] == one[1][0]  # scene and first caption do not depend on the count
    assert len(five[1]) == 5 and len(set(five[1])) > 1


def test_color_mention_sets_how_often_captions_name_colours():
    def share(mention):  # fraction of captions naming any colour
        texts = [t for i in range(400) for t in sample(0, i, 3, captions=2, color_mention=mention)[1]]
        return np.mean([any(re.search(rf"\b{c}\b", t) for c in COLORS) for t in texts])
    assert share(0.0) == 0.0 and share(1.0) == 1.0
    assert share(0.25) < share(0.5) < share(0.75)
    assert sample(0, 3, 3, captions=5) == sample(0, 3, 3, captions=5, color_mention=0.5625)  # the default


def test_holdout_pairs_are_a_balanced_fixed_fraction():
    pairs = holdout_pairs(0, 0.2)
    assert pairs == holdout_pairs(0, 0.2) and pairs != holdout_pairs(1, 0.2)
    assert len(pairs) == round(0.2 * len(COLORS) * len(SHAPES))
    assert max(Counter(c for c, _ in pairs).values()) <= 2
    assert max(Counter(s for _, s in pairs).values()) <= 2
    assert holdout_pairs(0, 0.0) == frozenset()


def test_labels_describe_the_scene():
    for i in range(50):
        scene, (text,) = sample(3, i, 3)
        labels = json.loads(scene.labels())
        objects = labels["objects"]
        assert labels["count"] == len(objects) == len(scene.objects) and 1 <= len(objects) <= 3
        assert len({o["position"] for o in objects}) == len(objects)  # one object per slot
        assert all(set(o) == {"shape", "color", "size", "position"} for o in objects)
        mentioned = {c for c in COLORS if re.search(rf"\b{c}\b", text)}
        assert mentioned <= {o["color"] for o in objects}, text


def test_captions_vary_but_repeat():
    captions = [sample(0, i, 3)[1][0] for i in range(2000)]
    assert 0.5 * len(captions) < len(set(captions)) < len(captions)
    assert any(c.startswith(("two ", "a picture of two ", "an image of two ", "there are two ")) for c in captions)


@pytest.mark.parametrize("shape", SHAPES)
def test_objects_are_drawn_in_their_colour(shape):
    for color in COLORS:
        scene = Scene((Object(shape, color, "large", "centre"),), "plain", seed=7)
        centre = render(scene, 64)[32, 32]
        assert tuple(centre) == RGB[color], (shape, color)


def test_backgrounds_are_muted_and_varied():
    means = [render(sample(0, i, 1)[0], 32).reshape(-1, 3).mean(0) for i in range(40)]
    assert np.std(means, axis=0).min() > 5  # not one fixed colour


def test_holdout_pairs_never_reach_the_train_split():
    data = DataParams(seed=5, synthetic={"num_images": 600, "holdout_fraction": 0.2})
    held = holdout_pairs(5, 0.2)
    mention = re.compile("|".join(rf"\b{c} {s}(e?s)?\b" for c, s in held))
    seen = Counter()
    for rec in read_synthetic(data):
        split = split_of(rec.key, data.val_fraction, data.test_fraction)
        pairs = {(o.color, o.shape) for o in rec.image.objects}
        if split == "train":
            assert not pairs & held, rec.key
            assert not mention.search(rec.captions[0]), rec.captions[0]
        else:
            seen[split] += len(pairs & held)
    assert seen["val"] > 0 and seen["test"] > 0  # they do exist outside train
