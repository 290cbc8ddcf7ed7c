"""benchmarks/real_resplit.py: a new draw of unseen concepts from real-emoji's training concepts."""
from __future__ import annotations

import sys

import pandas as pd
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_resplit import concept, drawn, resplit  # noqa: E402


def write(path, rows, columns):
    pd.DataFrame(rows, columns=columns).to_csv(path, index=False)


def test_a_concept_and_its_skin_tones_fall_on_one_side(tmp_path):
    assert concept("images/openmoji/1f44b-1F3FB.png") == "1F44B"
    assert concept("images/openmoji/1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC.png") == "1F9D1-200D-1F91D-200D-1F9D1"
    names = ["1F44B", "1F600", "1F170", "2764", "1F968", "1F41D"]
    out_of = [n for n in names if drawn(n, 0.5, 1)]
    assert 0 < len(out_of) < len(names) and out_of == [n for n in names if drawn(n, 0.5, 1)]  # a pure function
    write(tmp_path / "train.csv", [[f"images/openmoji/{n}.png", f"name {n} (tag)"] for n in names]
          + [[f"images/openmoji/{n}-1F3FD.png", f"name {n}: medium skin tone"] for n in names], ["filepath", "caption"])
    write(tmp_path / "eval_cross_style.csv", [[f"images/fluent/{n}.png", f"name {n}"] for n in names[:-1]],
          ["image", "label"])  # the last concept has no Fluent image: it always trains
    write(tmp_path / "eval_unseen.csv", [["images/fluent/1F968.png", "pretzel"]], ["image", "label"])
    out = resplit(tmp_path, 0.5, 1)
    held = {n for n in names[:-1] if drawn(n, 0.5, 1)}
    assert set(out["train.csv"]["filepath"].map(concept)) == set(names) - held  # skin tones with their base
    assert len(out["train.csv"]) == 2 * (len(names) - len(held))
    # unseen: both artists, no skin tone, labelled by the Fluent set's label
    assert sorted(out["eval_unseen.csv"].values.tolist()) == sorted(
        [[f"images/{a}/{n}.png", f"name {n}"] for n in held for a in ("openmoji", "fluent")])
    assert set(out["eval_cross_style.csv"]["label"]) == {f"name {n}" for n in names[:-1]} - {f"name {n}" for n in held}
    assert out["eval_unseen_original.csv"].values.tolist() == [["images/fluent/1F968.png", "pretzel"]]
    with pytest.raises(SystemExit, match="leaves a side empty"):
        resplit(tmp_path, 0.0, 1)
