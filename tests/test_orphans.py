"""What a killed stage leaves behind is cleaned by the next run: its temporaries and its MLflow run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import mlflow
import pytest

from clipmodel.io import atomic_path
from pipeline import tracking
from pipeline.dvcfile import flatten


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_write_removes_temporaries_of_dead_writers_only(tmp_path):
    dead = dead_pid()
    stale = [tmp_path / f".train.tmp-{dead}.pt", tmp_path / f".onnx.tmp-{dead}"]
    stale[0].write_bytes(b"")
    stale[1].mkdir()
    (stale[1] / "image_encoder.onnx").write_bytes(b"half")
    alive = tmp_path / f".train.tmp-{os.getppid()}.pt"  # a live process's is not ours to delete
    alive.write_bytes(b"")
    other = tmp_path / f".other.tmp-{dead}.pt"  # another target's: left to that target's writer
    other.write_bytes(b"")
    with atomic_path(tmp_path / "train.pt") as tmp:
        tmp.write_bytes(b"new")
    assert not stale[0].exists() and stale[1].exists() and alive.exists() and other.exists()
    with atomic_path(tmp_path / "onnx") as tmp:
        tmp.mkdir()
    assert not stale[1].exists()


def test_runs_of_dead_processes_end_as_killed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracking._experiment("orphans")
    client = mlflow.MlflowClient(tracking.tracking_uri())
    host = socket.gethostname()
    orphan = client.create_run(experiment, tags={"host": host, "pid": str(dead_pid())}).info.run_id
    live = client.create_run(experiment, tags={"host": host, "pid": str(os.getppid())}).info.run_id
    elsewhere = client.create_run(experiment, tags={"host": "another-host", "pid": "1"}).info.run_id
    assert tracking.end_orphaned_runs(experiment) == [orphan]
    status = {r: client.get_run(r).info.status for r in (orphan, live, elsewhere)}
    assert status == {orphan: "KILLED", live: "RUNNING", elsewhere: "RUNNING"}


def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
    """The steps replayed after a checkpoint, which the run logged before its stop, are not logged again."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    first = tracking.start_run("resume", None, {}, tmp_path / "run.json")
    for step in range(1, 6):
        mlflow.log_metrics({"loss": float(step)}, step=step)
    mlflow.log_metrics({"val_r1": 0.5}, step=3)
    mlflow.end_run("KILLED")

    assert tracking.start_run("resume", first, {}, tmp_path / "run.json") == first
    log = tracking.step_logger(first)
    for step in range(3, 8):  # resumed from a checkpoint at step 2
        log(step, {"loss": 100.0 + step, **({"val_r1": 0.9} if step in (3, 6) else {})})
    mlflow.end_run()
    client = mlflow.MlflowClient(tracking.tracking_uri())
    loss = sorted((m.step, m.value) for m in client.get_metric_history(first, "loss"))
    assert loss == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 106.0), (7, 107.0)]
    assert sorted((m.step, m.value) for m in client.get_metric_history(first, "val_r1")) == [(3, 0.5), (6, 0.9)]


def test_stages_after_a_skipped_train_log_into_a_run_nested_under_it(tmp_path, monkeypatch):
    """Evaluate and export continue train's run only when it was made under the same params and commit;
    otherwise (train skipped by `dvc exp run -S evaluate.x=...`) they share one run nested under it, and
    the training run's metrics stay those of its own params."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_file, params = tmp_path / "run.json", {"train": {"lr": 0.001}, "evaluate": {"templates": None}}
    training = tracking.start_run("nested", None, {"git_commit": tracking.git_commit(), "data_fingerprint": "fp"},
                                  run_file)
    mlflow.log_params({**flatten(params), "total_steps": 10})  # train logs a few more than params.yaml
    mlflow.end_run()
    with tracking.pipeline_run(flatten(params), run_file) as run:
        assert run == training
        mlflow.log_metric("top1", 0.5)

    changed = {**params, "evaluate": {"templates": "clip"}}
    with tracking.pipeline_run(flatten(changed), run_file) as evaluation:
        mlflow.log_metric("top1", 0.4)
    with tracking.pipeline_run(flatten(changed), run_file) as export:
        pass
    client = mlflow.MlflowClient(tracking.tracking_uri())
    assert export == evaluation != training
    nested = client.get_run(evaluation)
    assert nested.data.tags["mlflow.parentRunId"] == training and nested.data.tags["data_fingerprint"] == "fp"
    assert nested.data.params["evaluate.templates"] == "clip" and nested.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(training, "top1")] == [0.5]
    assert client.get_run(training).data.params["evaluate.templates"] == "None"

    monkeypatch.setattr(tracking, "git_commit", lambda: "another commit")
    with tracking.pipeline_run(flatten(params), run_file) as run:
        assert run not in (training, evaluation)


def test_a_store_without_the_checkpoints_run_gives_a_new_run_and_later_stages_say_what_to_do(tmp_path, monkeypatch):
    """The store was deleted (or MLFLOW_TRACKING_URI now names another) after train recorded its run:
    reopening that run for a resume starts a new one, and evaluate/export stop with one line."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'old.db'}")
    old = tracking.start_run("gone", None, {}, tmp_path / "run.json")
    mlflow.end_run()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'new.db'}")
    with pytest.raises(SystemExit, match=f"run {old} .* is not in sqlite:///.*new.db: rerun the train stage"):
        with tracking.pipeline_run({}, tmp_path / "run.json"):
            pass
    new = tracking.start_run("gone", old, {"git_commit": tracking.git_commit()}, tmp_path / "run.json")
    mlflow.end_run()
    assert new != old and json.loads((tmp_path / "run.json").read_text())["run_id"] == new
    with tracking.pipeline_run({}, tmp_path / "run.json") as run:
        assert run == new
