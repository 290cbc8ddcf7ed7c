"""benchmarks/real_posthoc.py: post-hoc ensembles, CSLS and top-1 by image folder."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_posthoc import csls, summarise  # noqa: E402


def test_csls_demotes_a_class_near_every_reference_image():
    classes = np.array([[1.0, 0.0], [0.0, 1.0]])
    reference = np.array([[1.0, 0.0], [0.96, 0.28], [0.8, 0.6]])  # all near class 0: a hub
    sims = np.array([[0.55, 0.5]])  # the image leans to the hub by a little
    scores = csls(sims, classes, reference, k=2)
    assert scores[0] == pytest.approx([2 * 0.55 - 0.98, 2 * 0.5 - 0.44])
    assert scores.argmax(1)[0] == 1


def test_summary_averages_the_models_and_splits_by_folder():
    targets = np.array([0, 1, 1])
    folder = np.array(["a", "a", "b"])
    one = np.array([[0.9, 0.1], [0.6, 0.4], [0.1, 0.9]])  # right on images 0 and 2
    two = np.array([[0.4, 0.6], [0.1, 0.9], [0.2, 0.8]])  # right on 1 and 2
    r = summarise([(one, one), (two, two)], targets, folder)  # mean: [0.65, 0.35], [0.35, 0.65], [0.15, 0.85]
    assert r["top1"] == r["top1_csls"] == 1.0
    alone = summarise([(one, two)], targets, folder)
    assert alone["top1"] == pytest.approx(2 / 3) and alone["top1_csls"] == pytest.approx(2 / 3)
    assert alone["top1_by_folder"] == {"a": 0.5, "b": 1.0} and alone["images_by_folder"] == {"a": 2, "b": 1}
