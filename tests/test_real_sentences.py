"""benchmarks/real_sentences.py: real-emoji's captions rewritten as sentences."""
from __future__ import annotations

import sys

import pandas as pd

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_sentences import name_and_tags, sentence, sentences, spans  # noqa: E402


def test_the_tags_are_the_final_parenthesis_only():
    assert name_and_tags("grinning face (cheerful, happy)") == ("grinning face", ["cheerful", "happy"])
    assert name_and_tags("family: man, girl, boy (child, family)") == ("family: man, girl, boy", ["child", "family"])
    assert name_and_tags("keycap: * (keycap)") == ("keycap: *", ["keycap"])
    assert name_and_tags(" flag: Japan ") == ("flag: Japan", [])
    assert name_and_tags("man (old) dancing") == ("man (old) dancing", [])


def test_every_caption_is_a_sentence_holding_its_name_and_a_rebuild_writes_the_same(tmp_path):
    names = [f"thing number {i}" for i in range(64)]
    train = pd.DataFrame({"filepath": [f"images/openmoji/{i:04X}.png" for i in range(64)],
                          "caption": [f"{n} (alpha, beta, gamma, delta)" for n in names]})
    train.to_csv(tmp_path / "train.csv", index=False)
    evals = {name: pd.DataFrame({"image": ["images/fluent/0001.png"], "label": ["NA"]})
             for name in ("eval_cross_style.csv", "eval_unseen.csv")}
    for name, frame in evals.items():
        frame.to_csv(tmp_path / name, index=False)

    out = sentences(tmp_path)
    captions = out["train.csv"]["caption"].tolist()
    assert out["train.csv"]["filepath"].tolist() == train["filepath"].tolist()
    assert all(n in c.lower() and "(alpha, beta" not in c for n, c in zip(names, captions))
    assert len({c.lower().replace(n, "{}").split("{}")[0] for n, c in zip(names, captions)}) >= 6  # varied wordings
    assert any("delta" not in c and "alpha" in c for c in captions)  # a tag kept, not all
    assert any("alpha" not in c for c in captions)  # some name the thing alone
    assert captions == sentences(tmp_path)["train.csv"]["caption"].tolist()
    for name, frame in evals.items():
        assert out[name].values.tolist() == [["images/fluent/0001.png", "NA"]]  # labels stay strings
    assert sentence("x", ["y"], "1F600") == sentence("x", ["y"], "1F600")


def test_span_views_are_short_runs_of_the_sentence_as_extra_rows_of_its_image(tmp_path):
    caption = "A cartoon grinning face: awesome and happy."
    views = spans(caption, 6)
    assert views and len(views) == len(set(views)) <= 6 and views == spans(caption, 6)
    words = "A cartoon grinning face awesome and happy".split()
    for v in views:
        n = len(v.split())
        assert 1 <= n <= 4 and any(words[i:i + n] == v.split() for i in range(len(words)))
    assert spans("", 3) == [] and spans("hello", 3) == []  # a one-word caption has no shorter run

    pd.DataFrame({"filepath": ["a.png", "b.png"], "caption": ["red fox (wild, animal)", "blue whale (sea)"]}
                 ).to_csv(tmp_path / "train.csv", index=False)
    for name in ("eval_cross_style.csv", "eval_unseen.csv"):
        pd.DataFrame({"image": ["c.png"], "label": ["red fox"]}).to_csv(tmp_path / name, index=False)
    plain, more = sentences(tmp_path)["train.csv"], sentences(tmp_path, span_views=3)["train.csv"]
    for path, caption in zip(plain["filepath"], plain["caption"]):
        rows = more[more["filepath"] == path]["caption"].tolist()
        assert rows == [caption, *spans(caption, 3)] and len(rows) > 1
