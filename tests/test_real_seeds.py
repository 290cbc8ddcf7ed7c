"""benchmarks/real_seeds.py: several seeds of the real benchmark in one table."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.real_seeds import summary  # noqa: E402


def run(open_clip: tuple[float, float], project: tuple[float, float], epochs: int = 30,
        sets: tuple[str, str] = ("eval_cross_style", "eval_unseen")) -> dict:
    def side(top1, **extra):
        return {"epochs": epochs, "train_seconds": 10.0, "params": 5,
                "scores": {k: {"label": {"top1": t}} for k, t in zip(sets, top1)}, **extra}
    return {"open_clip": side(open_clip, seed=0), "project": side(project, overrides=[])}


def test_ratio_of_the_means_and_per_seed():
    out = summary([run((0.01, 0.08), (0.05, 0.16)), run((0.03, 0.04), (0.07, 0.12))], ["a", "b"], "label")
    assert out["ratio_of_means"] == {"eval_cross_style": 3.0, "eval_unseen": 2.333}
    assert out["ratio_per_seed"] == {"eval_cross_style": [5.0, 2.333], "eval_unseen": [2.0, 3.0]}
    assert out["top1"]["project"]["eval_unseen"] == [0.16, 0.12] and out["epochs"] == 30


def test_runs_of_other_epochs_a_missing_side_or_template_are_one_line_errors():
    with pytest.raises(SystemExit, match="differ in epochs"):
        summary([run((0.01, 0.08), (0.05, 0.16)), run((0.01, 0.08), (0.05, 0.16), epochs=20)], ["a", "b"], "label")
    with pytest.raises(SystemExit, match="b has no project side"):
        summary([run((0.01, 0.08), (0.05, 0.16)), {"open_clip": run((0.01, 0.08), (0.0, 0.0))["open_clip"]}],
                ["a", "b"], "label")
    with pytest.raises(SystemExit, match="a: open_clip has no eval_cross_style in scores with template 'clip'"):
        summary([run((0.01, 0.08), (0.05, 0.16))], ["a"], "clip")


def test_the_sets_are_the_first_runs_and_a_zero_reference_gives_no_ratio():
    out = summary([run((0.0, 0.08), (0.05, 0.16), sets=("pets", "styles")),
                   run((0.02, 0.04), (0.07, 0.12), sets=("pets", "styles"))], ["a", "b"], "label")
    assert out["ratio_of_means"] == {"pets": 6.0, "styles": 2.333}
    assert out["ratio_per_seed"]["pets"] == [None, 3.5]
    with pytest.raises(SystemExit, match="b: open_clip has no pets in scores"):
        summary([run((0.01, 0.08), (0.05, 0.16), sets=("pets", "styles")), run((0.01, 0.08), (0.05, 0.16))],
                ["a", "b"], "label")


def test_support_scores_against_open_clips_better_scoring_seed_by_seed():
    runs = [run((0.01, 0.08), (0.05, 0.14)), run((0.02, 0.07), (0.06, 0.13))]
    for r, (oc, pr) in zip(runs, [((0.012, 0.075), (0.07, 0.17)), ((0.018, 0.09), (0.08, 0.16))]):
        for side, top1 in (("open_clip", oc), ("project", pr)):
            r[side]["scores_support"] = {k: {"label": {"top1": t}}
                                         for k, t in zip(("eval_cross_style", "eval_unseen"), top1)}
    out = summary(runs, ["a", "b"], "label", "scores_support")
    assert out["scores"] == "scores_support" and out["top1"]["project"]["eval_unseen"] == [0.17, 0.16]
    assert out["ratio_of_means"]["eval_unseen"] == round(0.165 / 0.0825, 3)
    assert out["open_clip_best_of_both"]["eval_unseen"] == [0.08, 0.09]
    assert out["ratio_of_means_to_open_clip_best"]["eval_unseen"] == round(0.165 / 0.085, 3)
    assert out["top1_zero_shot"]["project"]["eval_unseen"] == [0.14, 0.13]
    with pytest.raises(SystemExit, match="a: open_clip has no eval_cross_style in scores_support"):
        summary([run((0.01, 0.08), (0.05, 0.16))], ["a"], "label", "scores_support")
