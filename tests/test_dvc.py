"""`dvc repro` in a temporary git copy of the repo: stages chain, cache, and rerun only what changed."""
from __future__ import annotations

import json
import subprocess

import mlflow
import pytest
import yaml

from clipmodel import synthetic
from pipeline import registry
from conftest import ROOT, TINY, dvc, git, git_copy, merge
from conftest_ingest_helpers import good_images

pytestmark = pytest.mark.slow


def test_repro_ingest_tokenize_caches_and_ignores_unrelated_params(tmp_path):
    repo = git_copy(tmp_path, TINY)
    out = dvc(repo, "repro", "ingest", "tokenize").stdout
    assert "Running stage 'ingest'" in out and "Running stage 'tokenize'" in out
    assert json.loads((repo / "reports/ingest.json").read_text())["accepted"] > 0
    assert (repo / "data/tokens.npy").exists() and (repo / "data/tokenizer.json").exists()

    again = dvc(repo, "repro", "ingest", "tokenize").stdout
    assert "Running stage" not in again

    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, {"train": {"lr": 0.0005}, "data": {"workers": 2}})))
    assert "Running stage" not in dvc(repo, "repro", "ingest", "tokenize").stdout

    (repo / "params.yaml").write_text(yaml.safe_dump(merge(params, {"tokenize": {"vocab_size": 320}})))
    out = dvc(repo, "repro", "ingest", "tokenize").stdout
    assert "Running stage 'tokenize'" in out and "Running stage 'ingest'" not in out


METRIC_KEYS = [f"zero_shot.{t}.top1" for t in ("shape", "color", "size", "position", "count",
                                                "composition_seen", "composition_unseen")] + [
    f"zero_shot.{t}.top1_single_template" for t in ("shape", "color")] + [
    f"retrieval.{d}.{k}" for d in ("image_to_text", "text_to_image") for k in ("r1", "r5", "r10", "median_rank")] + [
    "linear_probe.shape.top1", "linear_probe.color.top1", "supervised.shape.top1"]


def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_full_pipeline_then_experiments_diff(tmp_path):
    repo = git_copy(tmp_path, merge(TINY, {"train": {"checkpoint_every": 50}}))
    dvc(repo, "repro")
    metrics = flat(json.loads((repo / "reports/metrics.json").read_text()))
    missing = [k for k in METRIC_KEYS if k not in metrics]
    assert not missing, missing
    for plot in ("confusion_shape.png", "per_class_color.png", "similarity.png", "predictions.png"):
        assert (repo / "reports/plots/eval" / plot).stat().st_size > 0
    # Per-class accuracy only for classes with test images: the unseen task never lists a seen pair.
    per_class = json.loads((repo / "reports/per_class.json").read_text())
    held = {f"{c} {s}" for c, s in synthetic.holdout_pairs(0, 0.2)}
    assert per_class["composition_unseen"]["recall"] and set(per_class["composition_unseen"]["recall"]) <= held
    assert "Running stage" not in dvc(repo, "repro").stdout
    # As DVC intends for `cache: false` metrics: git holds them, so a commit is the baseline to diff against.
    assert "reports/metrics.json" not in git(repo, "check-ignore", "-v", "reports/metrics.json", check=False)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "baseline")

    # An experiment on evaluate's params alone: train is skipped, and evaluate and export log into one
    # MLflow run nested under the training run, whose metrics stay those of its own params.
    training = json.loads((repo / "reports/run.json").read_text())["run_id"]
    dvc(repo, "exp", "run", "-S", "evaluate.batch_size=64")
    exps = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    runs = [e for row in exps for e in (row.get("experiments") or [])]
    assert len(runs) == 1
    data = runs[0]["revs"][0]["data"]  # the experiment's commit carries its own params and metrics
    assert data["params"]["params.yaml"]["data"]["evaluate"]["batch_size"] == 64
    assert flat(data["metrics"]["reports/metrics.json"]["data"])["zero_shot.shape.top1"] is not None
    # --all: a metric the experiment left where it was is still listed
    diff = json.loads(dvc(repo, "metrics", "diff", "--all", "--json").stdout)["reports/metrics.json"]
    old, new = diff["zero_shot.shape.top1"]["old"], diff["zero_shot.shape.top1"]["new"]
    assert old == metrics["zero_shot.shape.top1"] and new is not None
    plots = dvc(repo, "plots", "diff", "main", "--json").stdout
    assert "confusion_shape.png" in plots and "train_log.csv" in plots

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    nested = json.loads((repo / "reports/export.json").read_text())["mlflow_run_id"]
    run = client.get_run(nested)
    assert run.data.tags["mlflow.parentRunId"] == training and run.data.params["evaluate.batch_size"] == "64"
    assert "zero_shot.shape.top1" in run.data.metrics and run.data.tags["dvc_experiment"] == runs[0]["name"]
    assert len(client.get_metric_history(training, "zero_shot.shape.top1")) == 1
    assert client.get_run(training).data.params["evaluate.batch_size"] != "64"

    # Two pipeline runs registered two versions, the second from the nested run; the champion is the
    # first to reach the best metric, so a run that is not better (worse or equal) left the alias where
    # it was (test_registry.py covers each case on its own).
    for name in (registry.IMAGE_MODEL, registry.TEXT_MODEL):
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        values = [float(v.tags["zero_shot.shape.top1"]) for v in versions]
        assert len(values) == 2 and [v.tags["mlflow_run_id"] for v in versions] == [training, nested]
        assert versions[1].tags["dvc_experiment"] == runs[0]["name"] and "dvc_experiment" not in versions[0].tags
        assert str(client.get_model_version_by_alias(name, "champion").version) == str(values.index(max(values)) + 1)


def test_full_pipeline_on_a_csv_source(tmp_path):
    """README's "your own data": data.source csv in the root params.yaml, then `dvc repro`. The
    supervised baseline has no shape labels there; it must still write every output dvc.yaml
    declares, or DVC stops the pipeline at it."""
    repo = git_copy(tmp_path, merge(TINY, {"data": {"source": "csv", "csv": {
        "path": "photos/captions.csv", "image_column": "filepath", "caption_column": "caption", "sep": ","}}}))
    names = good_images(repo / "photos", 96)
    (repo / "photos/captions.csv").write_text("filepath,caption\n" + "".join(
        f"{n},a {['red', 'blue', 'green'][i % 3]} thing number {i}\n" for i, n in enumerate(names)))
    out = dvc(repo, "repro").stdout
    assert "Running stage 'export'" in out and "supervised: skipped" in out
    assert json.loads((repo / "reports/supervised.json").read_text())["skipped"]
    assert (repo / "reports/supervised_log.csv").read_text() == "step,loss\n"
    metrics = flat(json.loads((repo / "reports/metrics.json").read_text()))
    assert "retrieval.image_to_text.r1" in metrics and "supervised.shape.top1" not in metrics
    assert (repo / "models/onnx/image_encoder.onnx").stat().st_size > 0
    json.loads(dvc(repo, "plots", "show", "--json").stdout)  # an empty log is still a plot DVC reads
    assert "Running stage" not in dvc(repo, "repro").stdout


def test_a_copied_pipeline_folder_ignores_what_dvc_caches_and_keeps_the_reports(tmp_path):
    """The .gitignore users copy from real/ ignores every cached stage output by itself: DVC takes back
    the entries it added during a `dvc repro` that then fails, so after a Ctrl-C in train the data
    would otherwise be committed. The reports (cache: false) stay for git."""
    git(tmp_path, "init", "-q")
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata/.gitignore").write_text((ROOT / "real/.gitignore").read_text())
    outs = [out for stage in yaml.safe_load((ROOT / "real/dvc.yaml").read_text())["stages"].values()
            for out in stage.get("outs", [])]
    for out in outs:
        path, spec = next(iter(out.items())) if isinstance(out, dict) else (out, {})
        ignored = subprocess.run(["git", "check-ignore", "-q", f"mydata/{path}"], cwd=tmp_path).returncode == 0
        assert ignored == spec.get("cache", True), path


def test_dvc_neither_reports_usage_nor_checks_for_updates():
    """The repo's own config, so that it holds for any `dvc` run in it, with or without the Makefile's
    DVC_NO_ANALYTICS: no usage analytics, and `dvc version` does not ask updater.dvc.org for news."""
    for key in ("core.analytics", "core.check_update"):
        assert dvc(ROOT, "config", "--project", key).stdout.strip() == "false", key
