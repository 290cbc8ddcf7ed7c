"""The train stage end to end on the tiny workspace: determinism, kill-and-resume, bad steps, MLflow."""
from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import psutil
import pandas as pd
import pytest
import yaml
from safetensors.numpy import load_file

from conftest import ROOT, TINY, kill_at_step, merge, run_stage, stage_env, write_params
from pipeline.loop import open_checkpoint


def weights(workdir):
    return load_file(workdir / "models" / "clip.safetensors")


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] == wb[k]).all(), k


def clone(workspace, dest):
    shutil.copytree(workspace / "data", dest / "data")
    shutil.copy(workspace / "params.yaml", dest / "params.yaml")
    return dest


def test_same_seed_same_loss_curve_and_weights(workspace, tmp_path_factory):
    """Two runs from one seed: one loss curve, the same weights. Checked with SLIP's second view, which
    is drawn from the step's own generator too; the plain step is checked by the SIGKILL test below
    (its uninterrupted reference against the resumed run), so it trains once here, for its rates."""
    run_stage(workspace, "train")
    la = pd.read_csv(workspace / "reports/train_log.csv")
    assert len(la) > 2
    assert (la.vision_lr - 5 * la.lr).abs().max() < 1e-9  # the image tower's groups: 5e-3 against 1e-3
    assert la.vision_lr.max() == 5e-3

    slip = [clone(workspace, tmp_path_factory.mktemp(f"slip{i}")) for i in range(2)]
    for w in slip:
        params = yaml.safe_load((w / "params.yaml").read_text())
        write_params(w, merge(params, {"train": {"ssl_weight": 0.5}}))
        run_stage(w, "train")
    ls = [pd.read_csv(w / "reports/train_log.csv") for w in slip]
    assert ls[0].loss.tolist() == ls[1].loss.tolist() and (ls[0].loss > la.loss + 0.1).all()
    assert "ssl_loss" not in la and ((ls[0].ssl_loss > 0) & (ls[0].ssl_loss < ls[0].loss)).all()
    assert_same_weights(*slip)


def test_sigkill_then_resume_matches_uninterrupted_run(workspace, tmp_path_factory):
    reference = clone(workspace, tmp_path_factory.mktemp("reference"))
    run_stage(reference, "train")
    total = int(pd.read_csv(reference / "reports/train_log.csv").step.max())

    kill_after = random.Random(0).randint(2, total - 2)  # seeded: a failure must reproduce
    kill_at_step(workspace, kill_after)

    out = run_stage(workspace, "train")
    assert "resuming at step" in out.stdout
    assert_same_weights(workspace, reference)
    log = pd.read_csv(workspace / "reports/train_log.csv")
    assert log.step.tolist() == list(range(1, total + 1))

    # `dvc repro -f` deletes the stage's outputs, then the stage finds its finished checkpoint
    (workspace / "reports/train_log.csv").unlink()
    out = run_stage(workspace, "train")
    assert f"resuming at step {total}/{total}" in out.stdout
    assert pd.read_csv(workspace / "reports/train_log.csv").equals(log)
    # that process trained nothing: the summary's peak is the largest the training processes logged
    assert json.loads((workspace / "reports/train.json").read_text())["peak_rss_mb"] == log.peak_rss_mb.max()


@pytest.mark.parametrize("nproc, signum", [(1, signal.SIGINT), (2, signal.SIGINT), (2, signal.SIGTERM)])
def test_a_second_training_on_a_checkpoint_stops_and_ctrl_c_or_sigterm_ends_the_run_killed(workspace, nproc, signum):
    """Two trainings on one checkpoint would interleave their snapshots: the second stops at once,
    naming the first (still running, e.g. after its dvc process alone was stopped). Ctrl-C ends the
    MLflow run KILLED, where MLflow's exit hook would record FINISHED, and says where a rerun resumes;
    so does SIGTERM (a scheduler's preemption), where its default would leave the run RUNNING. Each says
    it in one line: no traceback from any rank."""
    write_params(workspace, merge(TINY, {"train": {"epochs": 10_000, "nproc": nproc}}))  # still training when stopped
    # SIGINT at its default: a shell that starts a command in the background without job control (a CI
    # runner's `cmd &`) ignores it, the children inherit that, and Python then installs no Ctrl-C handler
    with open(workspace / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-m", "pipeline.train"], cwd=workspace, env=stage_env(workspace),
                                 stdout=subprocess.DEVNULL, stderr=err,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 300
        while not (workspace / "checkpoints/train.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        second = run_stage(workspace, "train", check=False)
        holder = int((workspace / "checkpoints/train.pt.lock").read_text())  # rank 0: `first` itself or its child
        assert holder in {first.pid} | {c.pid for c in psutil.Process(first.pid).children()}
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.strip().splitlines()[-1] == (
            f"checkpoints/train.pt is being written by another training, pid {holder} (a stage goes on when only "
            f"its dvc process is stopped): wait for it to end or stop it as Ctrl-C does (kill -INT {holder}), "
            "then rerun")
        first.send_signal(signum)
        assert first.wait(timeout=60) == 128 + signum  # a shell's status for Ctrl-C, or for `kill`
    finally:
        first.kill()
    stderr = (workspace / "first.err").read_text()
    assert "Traceback" not in stderr, stderr
    # the step Ctrl-C landed in is saved (with 2 ranks, a peer may stop first, failing rank 0's step)
    how = " \\(SIGTERM\\)" if signum == signal.SIGTERM else ""
    stopped = re.search(rf"^train: stopped at step (\d+)/\d+{how}; checkpoints/train.pt holds step (\d+): rerun the stage "
                        r"to resume there$", stderr, re.M)
    assert stopped and int(stopped[2]) > 0 and (nproc > 1 or stopped[1] == stopped[2]), stderr
    run = json.loads((workspace / "reports/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    assert client.get_run(run).info.status == "KILLED"
    assert open_checkpoint(workspace / "checkpoints/train.pt", "", resume=False) is None  # the claim went with it


def test_nonfinite_losses_stop_training_and_keep_checkpoint(workspace):
    write_params(workspace, merge(TINY, {"train": {"lr": 1e30, "grad_clip": 0.0, "max_bad_steps": 2,
                                                   "warmup_fraction": 0}}))
    proc = run_stage(workspace, "train", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "non-finite losses in a row" in last and "Traceback" not in proc.stderr
    assert (workspace / "checkpoints" / "train.pt").exists()


def test_mlflow_run_holds_params_curves_and_artifacts(workspace):
    run_stage(workspace, "train")
    info = json.loads((workspace / "reports/run.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(info["run_id"])
    assert run.data.params["train.lr"] == "0.001"
    assert run.data.params["model.vision"] == "vit"
    assert "data_fingerprint" in run.data.tags and "git_commit" in run.data.tags
    for key in ("loss", "lr", "logit_scale", "samples_per_s", "val_loss", "val_r1"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run.info.run_id, "loss")) > 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.json" in artifacts and "plots" in artifacts
    config = json.loads((workspace / "models/config.json").read_text())
    assert config["model"]["vision"] == "vit" and (workspace / "models/tokenizer.json").exists()


def test_fewer_training_images_than_a_batch_is_one_line(workspace):
    write_params(workspace, merge(TINY, {"train": {"batch_size": 4096}}))
    proc = run_stage(workspace, "train", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "fewer than train.batch_size=4096" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("spec, why", [
    ({"path": "pets/tset.csv"}, "pets/tset.csv: no such file or folder"),
    ({"path": "pets", "classnames": "names.csv"},  # a mapping that misses a folder's label
     "pets: pets/n02/0.png: label 'n02' is not in the mapping names.csv (1 of 2 images have labels outside it)"),
])
def test_a_held_out_set_that_evaluate_cannot_read_stops_train_before_it_trains(workspace, spec, why):
    """A typo in evaluate.datasets, or a class-name mapping short of a label, would cost the whole
    training before evaluate said so: evaluate's own check runs first."""
    shutil.copytree(ROOT / "templates", workspace / "templates")
    for label in ("n01", "n02"):
        (workspace / "pets" / label).mkdir(parents=True)
        (workspace / "pets" / label / "0.png").write_bytes(b"not opened by the check")
    (workspace / "names.csv").write_text("label,name\nn01,beagle\n")
    write_params(workspace, merge(TINY, {"evaluate": {"datasets": {"pets": spec}}}))
    proc = run_stage(workspace, "train", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"train: evaluate.datasets.pets: {why} (checked before training: "
                                                    "the evaluate stage reads it)")
    assert not (workspace / "models").exists() and not (workspace / "checkpoints").exists()
