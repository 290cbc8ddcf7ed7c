"""benchmarks/efficiency_seeds.py: the data-efficiency study over several seeds in one table."""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks.efficiency_seeds import study_params, summary  # noqa: E402

IMAGES = [1000, 4000, 16000, 64000]


def report(curves: dict[str, list[float]], ratios: dict, at_least: dict | None = None) -> dict:
    """A study's report as pipeline.efficiency_report writes it, reduced to what the table reads."""
    return {"curves": {o: {"images_seen": IMAGES, "top1": t} for o, t in curves.items()},
            "ratios": ratios, "ratios_at_least": at_least or {}}


def test_ratios_seed_by_seed_and_of_the_mean_curves():
    a = report({"contrastive": [0.1, 0.3, 0.5, 0.6], "bow": [0.1, 0.1, 0.3, 0.5],
                "decoder": [0.1, 0.1, 0.1, 0.2], "encoder_decoder": [0.1, 0.1, 0.2, 0.4]},
               {"contrastive_vs_bow": 4.0, "bow_vs_captioning": None}, {"bow_vs_captioning": 1.2})
    b = report({"contrastive": [0.1, 0.2, 0.4, 0.6], "bow": [0.1, 0.1, 0.2, 0.4],
                "decoder": [0.1, 0.1, 0.1, 0.1], "encoder_decoder": [0.1, 0.1, 0.1, 0.3]},
               {"contrastive_vs_bow": 2.0, "bow_vs_captioning": 1.5})
    out = summary({0: a, 1: b})
    assert out["seeds"] == [0, 1]
    assert out["ratios"] == {"contrastive_vs_bow": [4.0, 2.0], "bow_vs_captioning": [None, 1.5]}
    assert out["ratios_at_least"]["bow_vs_captioning"] == [1.2, None]
    assert out["final_top1"]["bow"] == [0.5, 0.4]
    mean = out["mean"]
    assert mean["top1"]["contrastive"] == [0.1, 0.25, 0.45, 0.6]
    assert mean["top1_sd"]["contrastive"][1] == pytest.approx(0.0707, abs=1e-4)
    assert mean["target_accuracy"] == pytest.approx(0.3)  # half the mean contrastive final top-1
    # contrastive crosses 0.3 between 4k (0.25) and 16k (0.45), a quarter of the way in log images: 4k * 4**0.25
    assert mean["images_to_target"]["contrastive"] == pytest.approx(4000 * 4 ** 0.25)
    assert mean["images_to_target"]["bow"] == pytest.approx(16000 * 4 ** 0.25)  # 0.25 at 16k, 0.45 at 64k
    assert mean["images_to_target"]["decoder"] is None and mean["captioning"] == "encoder_decoder"
    # encoder-decoder's mean (0.15 at 16k, 0.35 at 64k) crosses three quarters of the way: 16k * 4**0.75
    assert mean["ratios"] == {"contrastive_vs_bow": pytest.approx(4.0), "bow_vs_captioning": pytest.approx(2.0)}
    assert mean["ratios_at_least"] == {}
    b["curves"]["encoder_decoder"]["top1"][-1] = 0.1  # the mean now stops at 0.25: only a lower bound
    mean = summary({0: a, 1: b})["mean"]
    assert mean["ratios"]["bow_vs_captioning"] is None
    assert mean["ratios_at_least"] == {"bow_vs_captioning": pytest.approx(64000 / (16000 * 4 ** 0.25))}
    fixed = summary({0: a, 1: b}, target_accuracy=0.45)["mean"]  # efficiency.target_accuracy, as the stage reads it
    assert fixed["target_accuracy"] == 0.45 and fixed["images_to_target"]["contrastive"] == pytest.approx(16000)


def test_runs_with_other_checkpoints_are_refused():
    a = report({"contrastive": [0.1, 0.3, 0.5, 0.6], "bow": [0.1, 0.1, 0.3, 0.5]},
               {"contrastive_vs_bow": 3.0, "bow_vs_captioning": None})
    b = {**a, "curves": {o: {**c, "images_seen": [1, 2, 3, 4]} for o, c in a["curves"].items()}}
    with pytest.raises(SystemExit, match="seed 7's study has other objectives or checkpoints"):
        summary({0: a, 7: b})


def test_the_study_reads_its_paths_absolute_with_the_seed_set(tmp_path):
    params = {"train": {"seed": 0, "lr": 1e-3},
              "evaluate": {"templates": "../templates/prompts.yaml",
                           "datasets": {"unseen": {"path": "../../shared/eval.csv", "classnames": "names.txt"},
                                        "listed": {"path": "/abs/set", "classnames": ["a", "b"]}}}}
    tmp_path = tmp_path.resolve()
    out = study_params(params, tmp_path / "real", 3)
    assert out["train"] == {"seed": 3, "lr": 1e-3} and params["train"]["seed"] == 0  # the input is left alone
    assert out["evaluate"]["templates"] == str(tmp_path / "templates/prompts.yaml")
    assert out["evaluate"]["datasets"]["unseen"] == {"path": str(tmp_path.parent / "shared/eval.csv"),
                                                     "classnames": str(tmp_path / "real/names.txt")}
    assert out["evaluate"]["datasets"]["listed"] == {"path": "/abs/set", "classnames": ["a", "b"]}
