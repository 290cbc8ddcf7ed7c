"""The data-efficiency study end to end through its own DVC file, on tiny data and a tiny budget."""
from __future__ import annotations

import json
import socket

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import TINY, dvc, git_copy, merge
from pipeline.efficiency import OBJECTIVES
from pipeline.efficiency_report import captioning_model, images_to_reach

pytestmark = pytest.mark.slow

STUDY = merge(TINY, {"efficiency": {"budget_images": 128, "checkpoints": 2, "first_checkpoint": 64,
                                    "eval_images": 8, "decoder_width": 32, "decoder_layers": 1,
                                    "decoder_heads": 2, "encoder_layers": 1}})


def test_study_runs_apart_from_the_default_pipeline(tmp_path):
    repo = git_copy(tmp_path, STUDY)
    out = dvc(repo, "repro", "efficiency/dvc.yaml").stdout
    assert "Running stage 'ingest'" in out and "Running stage 'tokenize'" in out  # missing: made first
    assert "Running stage 'train'" not in out  # the study trains its own contrastive model
    report = json.loads((repo / "reports/efficiency.json").read_text())
    assert set(report["curves"]) == set(OBJECTIVES)
    for curve in report["curves"].values():
        assert curve["images_seen"] == [64, 128]
        assert set(curve["tasks"]) == {"shape", "color", "composition_seen"}
        assert all(0 <= a <= 1 for a in curve["top1"])
    assert report["target_accuracy"] == pytest.approx(0.5 * report["curves"]["contrastive"]["top1"][-1])
    assert set(report["ratios"]) == {"contrastive_vs_bow", "bow_vs_captioning"}
    assert (repo / "reports/plots/efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for objective in OBJECTIVES:
        config = json.loads((repo / f"models/efficiency/{objective}/config.json").read_text())
        assert config["objective"] == objective and (repo / "models/efficiency" / objective / config["weights"]).exists()

    run_id = json.loads((repo / "reports/efficiency/decoder.json").read_text())["run_id"]
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(run_id, "zero_shot.mean.top1")) == [64, 128]
    run = client.get_run(run_id)  # host and pid: a killed study run is marked KILLED by the next one
    assert run.info.run_name == "efficiency-decoder" and run.info.status == "FINISHED"
    assert run.data.tags["host"] == socket.gethostname() and run.data.tags["pid"].isdigit()

    again = dvc(repo, "repro", "efficiency/dvc.yaml").stdout
    assert "Running stage" not in again  # ingest, tokenize and the study are all reused
    first = json.loads((repo / "reports/efficiency/bow.json").read_text())
    dvc(repo, "repro", "-f", "-s", "efficiency/dvc.yaml:efficiency_train@bow")  # resumes its finished checkpoint
    resumed = json.loads((repo / "reports/efficiency/bow.json").read_text())
    assert resumed["curve"] == first["curve"]  # the times go on from the last point, not from zero
    assert resumed["wall_s"] == first["wall_s"] == first["curve"][-1]["wall_s"] > 0
    assert resumed["eval_s"] == first["eval_s"] == first["curve"][-1]["eval_s"]
    walls = [pt["wall_s"] for pt in first["curve"]]
    assert walls == sorted(walls) and all(pt["wall_s"] > pt["eval_s"] > 0 for pt in first["curve"])  # run time so far
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, {"evaluate": {"datasets": {"pets": {"path": "pets.csv"}}}})))
    assert "efficiency_train" not in dvc(repo, "status", "efficiency/dvc.yaml").stdout  # a set no task probes
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, {"efficiency": {"eval_images": 4}})))
    assert "efficiency_train@bow" in dvc(repo, "status", "efficiency/dvc.yaml").stdout
    # A plain `dvc repro` plans only the root dvc.yaml: its dry run (which stops at evaluate, whose
    # model does not exist yet) lists the root stages and none of the changed study stages.
    default = dvc(repo, "repro", "--dry", check=False)
    assert "Running stage 'train'" in default.stdout and "efficiency" not in default.stdout + default.stderr
    # a changed template file changes what the points measure: the stage measures afresh, never resumes
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    prompts = yaml.safe_load((repo / "templates/prompts.yaml").read_text())
    (repo / "templates/prompts.yaml").write_text(yaml.safe_dump({**prompts, "shape": ["{}"]}))
    dvc(repo, "repro", "-s", "efficiency/dvc.yaml:efficiency_train@bow")
    assert json.loads((repo / "reports/efficiency/bow.json").read_text())["run_id"] != first["run_id"]


def test_images_to_reach_interpolates_in_log_images():
    curve = [{"images_seen": 100, "top1": 0.1}, {"images_seen": 10000, "top1": 0.5}, {"images_seen": 20000, "top1": 0.9}]
    assert images_to_reach(curve, 0.3) == pytest.approx(1000)  # halfway in log10: 10^3
    assert images_to_reach(curve, 0.05) == 100
    assert images_to_reach(curve, 0.95) is None


@pytest.mark.parametrize("reach, final, chosen", [
    ({"decoder": 5000.0, "encoder_decoder": 9000.0}, {"decoder": 0.3, "encoder_decoder": 0.4}, "decoder"),
    ({"decoder": None, "encoder_decoder": 9000.0}, {"decoder": 0.3, "encoder_decoder": 0.4}, "encoder_decoder"),
    ({"decoder": None, "encoder_decoder": None}, {"decoder": 0.035, "encoder_decoder": 0.039}, "encoder_decoder"),
    ({"decoder": None, "encoder_decoder": None}, {"decoder": 0.04, "encoder_decoder": 0.04}, "decoder"),
])
def test_the_captioner_standing_for_captioning_is_the_faster_then_the_better(reach, final, chosen):
    assert captioning_model({"bow": 100.0, **reach}, {"bow": 0.5, **final}) == chosen
