"""benchmarks/real_swap_styles.py: the real benchmark with the two artists' roles reversed."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_swap_styles import swap  # noqa: E402


def write(path, rows, columns):
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def test_fluent_images_train_with_their_openmoji_twins_captions(tmp_path):
    write(tmp_path / "train.csv", [["images/openmoji/1F170.png", "A button (blood type) (a, blood)"],
                                   ["images/openmoji/1F44B.png", "waving hand (wave)"],
                                   ["images/openmoji/1F44B-1F3FB.png", "waving hand: light skin tone"]],
          ["filepath", "caption"])
    write(tmp_path / "eval_cross_style.csv", [["images/fluent/1F44B.png", "waving hand"],
                                              ["images/fluent/1F170.png", "A button (blood type)"]], ["image", "label"])
    write(tmp_path / "eval_unseen.csv", [["images/fluent/1F968.png", "pretzel"]], ["image", "label"])
    out = swap(tmp_path)
    assert out["train.csv"].values.tolist() == [["images/fluent/1F44B.png", "waving hand (wave)"],
                                                ["images/fluent/1F170.png", "A button (blood type) (a, blood)"]]
    # the judge: OpenMoji's twins, named as the Fluent set names them; no skin-tone variant
    assert out["eval_cross_style.csv"].values.tolist() == [["images/openmoji/1F44B.png", "waving hand"],
                                                           ["images/openmoji/1F170.png", "A button (blood type)"]]
    assert out["eval_unseen.csv"].values.tolist() == [["images/fluent/1F968.png", "pretzel"]]


def test_a_fluent_image_without_a_twin_is_a_one_line_error(tmp_path):
    write(tmp_path / "train.csv", [["images/openmoji/1F44B.png", "waving hand (wave)"]], ["filepath", "caption"])
    write(tmp_path / "eval_cross_style.csv", [["images/fluent/1F968.png", "pretzel"]], ["image", "label"])
    write(tmp_path / "eval_unseen.csv", [], ["image", "label"])
    with pytest.raises(SystemExit, match="1 Fluent images have no OpenMoji twin \\(first: 1F968\\)"):
        swap(tmp_path)
