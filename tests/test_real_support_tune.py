"""benchmarks/real_support_tune.py: the held-out concepts never leave a variant in training."""
from __future__ import annotations

import sys

import pandas as pd

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_support_tune import concept, split  # noqa: E402


def test_a_concept_is_the_name_less_its_tags_and_variant():
    assert concept("waving hand: dark skin tone (hand, wave)") == "waving hand"
    assert concept("flag: New Zealand (flag)") == "flag"
    assert concept("grinning face (cheerful, happy)") == "grinning face"
    assert concept("pretzel") == "pretzel"


def test_split_holds_out_whole_concepts_labelled_by_their_names(tmp_path):
    captions = [f"thing {i} (tag)" for i in range(20)] + [f"thing {i}: dark skin tone (tag)" for i in range(20)]
    pd.DataFrame({"filepath": [f"images/{i}.png" for i in range(40)], "caption": captions}).to_csv(
        tmp_path / "train.csv", index=False)
    train, held = split(tmp_path, 0.2, seed=0)
    assert len(train) == 32 and len(held) == 8 and list(held.columns) == ["image", "label"]
    held_concepts = {concept(c) for c in held["label"]}
    assert len(held_concepts) == 4 and not held_concepts & {concept(c) for c in train["caption"]}
    assert all({c, f"{c}: dark skin tone"} <= set(held["label"]) for c in held_concepts)  # variants go together
    assert split(tmp_path, 0.2, seed=0)[1].equals(held)  # seeded
