"""Prefect flows (pipeline/flows.py) against one ephemeral Prefect server per test session.

The end-to-end tests run the real DVC pipeline on a tiny synthetic set in a temporary git copy
of the repo; the retry and deployment tests need no pipeline run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_HOME, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from conftest import ROOT, TINY, git, git_copy, merge
from pipeline import flows, sweeps
from pipeline.params import ParamsInvalid
from pipeline.workspace import hydra_value, subprocess_env

SMALL = merge(TINY, {"data": {"synthetic": {"num_images": 300}},
                     "train": {"epochs": 1, "checkpoint_every": 50}})
MLFLOW_TAGS = ("git_commit", "data_fingerprint", "dvc_experiment", "prefect_flow_run_id")


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One ephemeral Prefect server (≈20 s to start) for the whole session, PREFECT_HOME in tmp."""
    home = tmp_path_factory.mktemp("prefect_home")
    with temporary_settings({PREFECT_HOME: home}), prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        mp.setenv("OMP_NUM_THREADS", "2")
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory, mlflow_store):
    """A git copy with SMALL params and the whole pipeline."""
    return git_copy(tmp_path_factory.mktemp("flows_repo"), SMALL)


@pytest.fixture(scope="module")
def train_repo(tmp_path_factory, mlflow_store):
    """A git copy with SMALL params and the stages up to train only: the sweep tests are about
    experiments and MLflow runs, which `train` makes; supervised + evaluate would add ~40 s a point."""
    return git_copy(tmp_path_factory.mktemp("flows_train_repo"), SMALL, stages=["ingest", "tokenize", "train"])


@pytest.fixture(scope="module")
def sub_pipeline(tmp_path_factory, mlflow_store):
    """A git copy whose pipeline lives in a folder below the root, as real/ does: real/dvc.yaml's
    stages up to train with SMALL's synthetic params, and as real/'s data, a dep outside the repo
    named by a relative path (`../../outside/notes.txt`)."""
    base = tmp_path_factory.mktemp("flows_sub")
    (base / "outside").mkdir()
    (base / "outside" / "notes.txt").write_text("data beside the repo, as ../shared/real-emoji is\n")
    (base / "repo").mkdir()
    repo = git_copy(base / "repo", SMALL, stages=["ingest", "tokenize", "train"])
    sub = repo / "sub"
    sub.mkdir()
    stages = yaml.safe_load((repo / "real" / "dvc.yaml").read_text())["stages"]
    stages = {name: stages[name] for name in ("ingest", "tokenize", "train")}
    stages["ingest"]["deps"] = [d for d in stages["ingest"]["deps"] if not d.startswith("../../")]
    stages["ingest"]["deps"].append("../../outside/notes.txt")
    (sub / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    shutil.copy(repo / "params.yaml", sub / "params.yaml")
    shutil.copy(repo / "real" / ".gitignore", sub / ".gitignore")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a pipeline in sub/")
    return sub


def dvc_experiments(repo: Path) -> dict[str, dict]:
    """name -> `dvc exp show --json` data of every experiment."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=repo,
                          env=subprocess_env(repo), capture_output=True, text=True, check=True)
    return {e["name"]: rev["data"] for row in json.loads(proc.stdout) for e in (row.get("experiments") or [])
            for rev in e["revs"]}


def mlflow_runs() -> dict[str, object]:
    """run id -> run, in the tests' MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("clip-synthetic")
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id])} if exp else {}


def task_runs(flow_run_id) -> list:
    """Task runs of a flow run, through the Prefect API."""
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


# ---------------------------------------------------------------------------------------------
# fast: stage list, retries, deployment


def test_stages_come_from_dvc_yaml_in_dependency_order(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "export": {"cmd": "x", "deps": ["models"], "outs": ["exported"]},
        "train": {"cmd": "x", "deps": ["data/tokens.npy"], "outs": ["models"]},
        "tokenize": {"cmd": "x", "deps": ["data/manifest.parquet"], "outs": ["data/tokens.npy"]},
        "ingest": {"cmd": "x", "outs": ["data/manifest.parquet"]},
    }}))
    assert flows.stage_names(tmp_path) == ["ingest", "tokenize", "train", "export"]
    stages = flows.stage_names(ROOT)
    declared = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert sorted(stages) == sorted(declared) and stages[0] == "ingest"


FLAKY = """
import sys, pathlib
calls = pathlib.Path(sys.argv[1])
n = int(calls.read_text()) + 1 if calls.exists() else 1
calls.write_text(str(n))
print(f"attempt {n}")
if sys.argv[2] == "bad-params":
    print("params.yaml: train.lr: Input should be greater than 0", file=sys.stderr)
    sys.exit(2)
if n == 1:
    print("transient failure", file=sys.stderr)
    sys.exit(1)
"""


@flow
def one_stage(repo: str, command: list[str], retries: int):
    return flows.run_stage.with_options(retries=retries, retry_delay_seconds=0)("flaky", repo, None, command)


def test_transient_stage_failure_is_retried(prefect_api, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    calls = tmp_path / "calls"
    assert one_stage(str(tmp_path), [sys.executable, "flaky.py", str(calls), "transient"], retries=2) == "ran"
    assert calls.read_text() == "2"


def test_params_error_is_not_retried(prefect_api, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    calls = tmp_path / "calls"
    state = one_stage(str(tmp_path), [sys.executable, "flaky.py", str(calls), "bad-params"], retries=3,
                      return_state=True)
    assert state.is_failed()
    assert calls.read_text() == "1"
    with pytest.raises(flows.StageFailed, match=r"params\.yaml: train\.lr") as err:
        state.result()
    assert err.value.bad_params and err.value.returncode == 2


def test_serve_deployment_has_the_cron_schedule(prefect_api, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("train.lr: [0.001, 0.0003]\n")
    for name, kwargs, flow_name in (("nightly-sweep", {"sweep": str(sweep)}, "clip-sweep"),
                                    ("nightly", {"overrides": {"train.epochs": "2"}}, "clip-pipeline")):
        deployment = flows.build_deployment(name, "0 3 * * *", repo=str(ROOT), **kwargs)
        deployment_id = deployment.apply()
        with get_client(sync_client=True) as client:
            found = client.read_deployment_by_name(f"{flow_name}/{name}")
        assert found.id == deployment_id
        assert [(s.schedule.cron, s.schedule.timezone) for s in found.schedules] == [("0 3 * * *", "UTC")]
        assert all(s.active for s in found.schedules)
        assert found.parameters["repo"] == str(ROOT)
        if "sweep" in kwargs:
            assert found.parameters["grid"] == str(sweep)
        else:
            assert found.parameters["overrides"] == {"train.epochs": "2"}


def test_grid_expansion_and_override_syntax():
    assert sweeps.expand_grid({"train.lr": [1e-3, 3e-4], "train.loss": "sigmoid"}) == [
        {"train.lr": 1e-3, "train.loss": "sigmoid"}, {"train.lr": 3e-4, "train.loss": "sigmoid"}]
    assert sweeps.expand_grid([{"train.lr": 1e-3}, {"model.vision": "resnet"}]) == [
        {"train.lr": 1e-3}, {"model.vision": "resnet"}]
    assert [hydra_value(v) for v in (3e-4, True, None, [1, 1, 1, 1], "resnet")] == [
        "0.0003", "true", "null", "[1,1,1,1]", "resnet"]
    assert sweeps.parse_sets(["train.lr=3e-4", "model.vision_layers=[1,1,1,1]"]) == {
        "train.lr": "3e-4", "model.vision_layers": "[1,1,1,1]"}


def test_a_missing_sweep_file_fails_before_any_flow_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(flows, "clip_sweep", lambda **kw: pytest.fail("the sweep flow started"))
    assert flows.main(["sweep", str(tmp_path / "nosuch.yaml")]) == 1
    assert capsys.readouterr().err.startswith("sweep failed: [Errno 2] No such file or directory")
    (tmp_path / "empty.yaml").write_text("")
    assert flows.main(["sweep", str(tmp_path / "empty.yaml")]) == 1
    assert "expected {key: [values]}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# end to end: the real pipeline in a git copy (run in file order: later ones reuse the DVC cache)


@pytest.mark.slow
def test_pipeline_runs_each_stage_and_returns_metrics(prefect_api, repo):
    params_before = (repo / "params.yaml").read_text()
    result = flows.clip_pipeline(repo=str(repo), retries=0)

    assert list(result["stages"]) == flows.stage_names(repo)
    assert set(result["stages"].values()) == {"ran"}
    assert result["metrics"]["train.final_loss"] > 0
    if "evaluate" in result["stages"]:
        assert 0 <= result["metrics"]["retrieval.image_to_text.r1"] <= 1
        assert "zero_shot.shape.top1" in result["key_metrics"]
    assert result["mlflow_run_id"] == json.loads((repo / "reports/run.json").read_text())["run_id"]
    assert (repo / "params.yaml").read_text() == params_before

    exp = dvc_experiments(repo)[result["experiment"]]
    assert exp["metrics"]["reports/train.json"]["data"]["final_loss"] == result["metrics"]["train.final_loss"]
    tags = mlflow_runs()[result["mlflow_run_id"]].data.tags
    assert tags["dvc_experiment"] == result["experiment"]
    assert tags["prefect_flow_run_id"] == result["flow_run_id"]

    # nothing changed: every stage is skipped, and the run is still recorded as an experiment
    again = flows.clip_pipeline(repo=str(repo), retries=0)
    assert set(again["stages"].values()) == {"skipped"}
    assert again["mlflow_run_id"] == result["mlflow_run_id"]
    assert again["experiment"] in dvc_experiments(repo)


@pytest.mark.slow
def test_sweep_makes_one_experiment_and_one_mlflow_run_per_point_sequentially_or_concurrently(
        prefect_api, train_repo, tmp_path):
    params_before = (train_repo / "params.yaml").read_text()
    grid = tmp_path / "sweep.yaml"
    grid.write_text("train.lr: [0.002, 0.0005]\n")
    table = flows.clip_sweep(grid=str(grid), repo=str(train_repo), prefix="lr", retries=0)

    assert [row["experiment"] for row in table] == ["lr-1", "lr-2"]
    assert [row["status"] for row in table] == ["completed", "completed"]
    assert [row["overrides"] for row in table] == [{"train.lr": 0.002}, {"train.lr": 0.0005}]
    assert all(row["train.final_loss"] > 0 for row in table)
    assert (train_repo / "params.yaml").read_text() == params_before

    exps = dvc_experiments(train_repo)
    for row in table:
        data = exps[row["experiment"]]
        assert data["params"]["params.yaml"]["data"]["train"]["lr"] == row["overrides"]["train.lr"]
        assert data["metrics"]["reports/train.json"]["data"]["final_loss"] == row["train.final_loss"]

    runs = mlflow_runs()
    tagged = {r.data.tags.get("dvc_experiment"): r for r in runs.values()}
    assert {"lr-1", "lr-2"} <= set(tagged)
    for row in table:
        run = tagged[row["experiment"]]
        assert run.info.run_id == row["mlflow_run_id"]
        assert all(run.data.tags.get(t) for t in MLFLOW_TAGS)
        assert float(run.data.params["train.lr"]) == row["overrides"]["train.lr"]
    assert tagged["lr-1"].data.tags["prefect_flow_run_id"] != tagged["lr-2"].data.tags["prefect_flow_run_id"]
    assert tagged["lr-1"].data.tags["git_commit"] == tagged["lr-2"].data.tags["git_commit"]

    # The same points again, concurrently, each in a clone of its own: every stage is restored from
    # the run cache the sequential sweep filled (one test, so the dependence does not hang on test order).
    before = {f: (train_repo / f).read_text() for f in ("params.yaml", "dvc.lock")}
    earlier = dvc_experiments(train_repo)
    table = flows.clip_sweep(grid=[{"train.lr": 0.002}, {"train.lr": 0.0005}], concurrency=2,
                             repo=str(train_repo), prefix="par", retries=0)

    assert [row["status"] for row in table] == ["completed", "completed"]
    assert {f: (train_repo / f).read_text() for f in before} == before
    assert not list(train_repo.parent.glob(f".{train_repo.name}-exp-*"))
    exps = dvc_experiments(train_repo)
    runs = {r.data.tags.get("dvc_experiment"): r.info.run_id for r in mlflow_runs().values()}
    for row, twin in zip(table, ("lr-1", "lr-2")):
        assert exps[row["experiment"]]["params"] == earlier[twin]["params"]
        assert exps[row["experiment"]]["metrics"] == earlier[twin]["metrics"]
        assert row["mlflow_run_id"] == runs[twin]  # nothing retrained, so no new MLflow run


@pytest.mark.slow
def test_a_pipeline_in_a_folder_of_the_repo_runs_alone_and_concurrently(prefect_api, sub_pipeline):
    """`--pipeline real` as `cd real && dvc exp run`: that folder's stages, params, outputs and
    experiment; concurrent points clone the whole repo and run in the folder's copy."""
    root = sub_pipeline.parent
    before = {p: p.read_text() for p in (root / "params.yaml", sub_pipeline / "params.yaml")}
    result = flows.clip_pipeline(overrides={"train.lr": 0.002}, experiment="sub-lr", repo=str(sub_pipeline),
                                 retries=0)

    assert result["stages"] == {"ingest": "ran", "tokenize": "ran", "train": "ran"}
    assert (sub_pipeline / "models" / "clip.safetensors").is_file() and not (root / "models").exists()
    assert {p: p.read_text() for p in before} == before
    assert result["mlflow_run_id"] == json.loads((sub_pipeline / "reports/run.json").read_text())["run_id"]
    assert mlflow_runs()[result["mlflow_run_id"]].data.tags["dvc_experiment"] == "sub-lr"
    exp = dvc_experiments(root)["sub-lr"]
    # the folder's first run: git tracked no dvc.lock of it yet, and the experiment holds the one it wrote
    ref = next(r for r in git(root, "for-each-ref", "--format=%(refname)", "refs/exps").split() if r.endswith("/sub-lr"))
    assert git(root, "show", f"{ref}:sub/dvc.lock") == (sub_pipeline / "dvc.lock").read_text()
    assert "sub/dvc.lock" not in git(root, "ls-files")
    assert exp["params"]["sub/params.yaml"]["data"]["train"]["lr"] == 0.002
    assert exp["metrics"]["sub/reports/train.json"]["data"]["final_loss"] == result["metrics"]["train.final_loss"]

    # concurrency > 1 runs each point in a clone, even a single point: restored from the run cache, its
    # dep outside the repo found from the clone as from the repo
    table = flows.clip_sweep(grid=[{"train.lr": 0.002}], concurrency=2, repo=str(sub_pipeline), prefix="sub-par",
                             retries=0)
    assert [row["status"] for row in table] == ["completed"]
    par = dvc_experiments(root)["sub-par-1"]
    assert par["metrics"] == exp["metrics"] and par["params"]["sub/params.yaml"]["data"]["train"]["lr"] == 0.002
    assert {p: p.read_text() for p in before} == before
    assert not list(root.parent.glob(f".{root.name}-exp-*"))  # the clone, beside the repo, is gone


@pytest.mark.slow
def test_bad_params_fail_the_flow_without_retries(prefect_api, train_repo, capsys):
    params_before = (train_repo / "params.yaml").read_text()
    manifest = train_repo / "data" / "manifest.parquet"  # ingest's output: an earlier test's, or a stand-in
    stand_in = not manifest.exists()
    if stand_in:
        manifest.parent.mkdir(exist_ok=True)
        manifest.write_bytes(b"ingest's output")
    before = manifest.read_bytes()
    state = flows.clip_pipeline(overrides={"train.lr": -1.0}, experiment="bad-lr", repo=str(train_repo),
                                retries=3, retry_delay_seconds=0, return_state=True)
    assert state.is_failed()
    assert (train_repo / "params.yaml").read_text() == params_before
    runs = {t.name: t for t in task_runs(state.state_details.flow_run_id)}
    failed = [t for t in runs.values() if t.state.is_failed()]
    assert len(failed) == 1 and failed[0].run_count == 1, [(t.name, t.run_count, t.state.name) for t in runs.values()]
    # refused before any stage ran: DVC deletes a stage's outputs before running it
    assert failed[0].name.startswith("check-params") and not any(n.startswith(("ingest", "save-experiment")) for n in runs)
    assert manifest.read_bytes() == before
    if stand_in:
        manifest.unlink()
    assert "bad-lr" not in dvc_experiments(train_repo)
    with pytest.raises(ParamsInvalid, match=r"params\.yaml: train\.lr: Input should be greater than 0"):
        state.result()
    assert flows.main(["run", "--pipeline", str(train_repo), "--set", "train.lr=-1", "--retries", "0"]) == 2
    assert "params.yaml: train.lr: Input should be greater than 0" in capsys.readouterr().err

    # in a sweep, the bad point fails, the others still run, and the sweep fails naming it
    state = flows.clip_sweep(grid=[{"train.lr": -1.0}, {"train.lr": 0.0005}], repo=str(train_repo),
                             prefix="mixed", retries=3, retry_delay_seconds=0, return_state=True)
    assert state.is_failed() and "mixed-1" in state.message and "mixed-2" not in state.message
    exps = dvc_experiments(train_repo)
    assert "mixed-2" in exps and "mixed-1" not in exps
    assert (train_repo / "params.yaml").read_text() == params_before
