"""benchmarks/real_unseen_words.py: the split of a zero-shot set by labels with a word no caption has."""
from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_unseen_words import compound_labels, gpt2_split_forms, split_by_novel_words  # noqa: E402


def test_split_weights_recall_by_images_and_names_the_novel_words():
    captions = ["grinning face (happy, smile)", "woman juggling (Juggler)"]
    labels = pd.Series(["woman smile", "woman smile", "face", "pretzel face"])  # 2 + 1 images seen, 1 novel
    groups = split_by_novel_words(captions, labels, {"woman smile": 0.5, "face": 1.0, "pretzel face": 0.0})
    seen, novel = groups["all_words_seen"], groups["novel_word"]
    assert (seen["classes"], seen["images"], novel["classes"], novel["images"]) == (2, 3, 1, 1)
    assert seen["mean_per_class_recall"] == pytest.approx(0.75)
    assert seen["top1"] == pytest.approx((0.5 * 2 + 1.0) / 3)
    assert novel["top1"] == 0.0 and novel["examples"] == ["pretzel"]


def test_a_label_without_recall_is_a_one_line_error():
    with pytest.raises(SystemExit, match="lacks 1 labels of the set, e.g. 'face'"):
        split_by_novel_words(["face"], pd.Series(["face"]), {})


def test_gpt2_split_forms_count_a_word_trained_only_after_a_space():
    captions = ["grinning face (happy, cake)"]  # " face", "happy" (after "("), " cake"
    counts = gpt2_split_forms(captions, ["cake", "Happy face", "a happy pretzel", "12"])
    # trained as is: "happy" first, " face"; only the other form: "cake" first, " happy" after a space;
    # nowhere: "a", " pretzel"; "12" has no letter
    assert counts == {"form_trained": 2, "only_other_form_trained": 2, "not_trained": 2}


def test_compound_labels_need_every_novel_word_made_of_two_caption_words():
    captions = ["sun (bright)", "flower (petal)", "tooth", "brush", "pot"]
    labels = pd.Series(["sunflower", "sunflower", "toothbrush pot", "toothbrush pretzel", "sun", "tea pot", "potsun"])
    # "sun": nothing novel; "tea": not a compound; "potsun": "pot" + "sun", 3 letters each
    assert compound_labels(captions, labels) == {"classes": 3, "images": 4,
                                                  "labels": ["potsun", "sunflower", "toothbrush pot"]}
    assert compound_labels(captions, pd.Series(["potsun"]), part=4)["classes"] == 0


def test_seen_word_errors_rank_the_truth_and_count_near_misses():
    from benchmarks.real_unseen_words import seen_word_errors
    captions = ["man juggling (juggler)", "woman (adult)", "tent (camping)"]
    classes = ["man juggling", "woman juggling", "tent", "pretzel"]
    sims = np.array([[0.9, 0.8, 0.1, 0.0],   # man juggling: right
                     [0.9, 0.8, 0.1, 0.0],   # woman juggling: a near miss, truth second
                     [0.1, 0.2, 0.3, 0.9],   # tent: "pretzel" is unrelated, truth second
                     [0.1, 0.8, 0.3, 0.2]])  # pretzel: a novel word, left out
    r = seen_word_errors(sims, np.array([0, 1, 2, 3]), classes, ["a", "b", "b", "a"], captions)
    assert (r["images"], r["errors"], r["errors_sharing_a_word_with_the_truth"]) == (3, 2, 1)
    assert r["top1"] == pytest.approx(1 / 3) and r["top5"] == 1.0 and r["median_rank_of_truth_in_errors"] == 2
    assert r["top1_by_folder"] == {"a": {"images": 1, "top1": 1.0}, "b": {"images": 2, "top1": 0.0}}
