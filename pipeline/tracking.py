"""MLflow wiring: one run per pipeline run, opened by `train` and continued by later stages.

The run id travels between stages in a small DVC output (reports/run.json: train's --run, which
evaluate and export read), so they log into the same run however far apart they execute. The MLflow
store itself is no stage path: $MLFLOW_TRACKING_URI, else mlflow.db in the current directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from clipmodel.io import _alive, files_sha256, write_json

RUN_FILE = Path("reports/run.json")  # the default of the stages' --run


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the SQLite store mlflow.db in the current directory (an absolute URI)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _experiment(name: str) -> str:
    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):  # keep artifacts beside the store, not in ./mlruns of any cwd
        location = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    """The full hash of the current directory's HEAD commit, or "unknown" outside git (never raises).
    Uncommitted changes are not reflected."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def data_fingerprint(paths: list[str | Path]) -> str:
    """A short hash of the files training read: the same fingerprint means the same data."""
    return files_sha256(paths)[:16]


def start_run(experiment: str, run_id: str | None, tags: dict[str, str], run_file: str | Path | None = RUN_FILE,
              run_name: str | None = None) -> str:
    """Open (or reopen, after a resume) a training run and return its id; record the id in `run_file`
    for later stages unless None. A run to reopen that the store lacks (the store was deleted or
    moved) is replaced by a new one: the caller logs its params when the id it gets is not the one
    it gave. A new run is named `run_name`, else $DVC_EXP_NAME. The run is tagged
    with this host and pid, so that the next start_run marks it KILLED if this process dies without
    ending it (SIGKILL, out of memory)."""
    experiment_id = _experiment(experiment)
    end_orphaned_runs(experiment_id)
    if run_id is not None and _stored_run(run_id) is None:
        print(f"MLflow: run {run_id}, which the checkpoint names, is not in {tracking_uri()}; "
              "training goes on in a new run", file=sys.stderr)
        run_id = None
    tags = {**tags, "host": socket.gethostname(), "pid": str(os.getpid())}
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else experiment_id, tags=tags,
                           run_name=None if run_id else run_name or os.environ.get("DVC_EXP_NAME"))
    if run_file is not None:
        write_json(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                              "tracking_uri": tracking_uri()})
    return run.info.run_id


def _stored_run(run_id: str) -> Run | None:
    """The run `run_id` from the store, or None where the store lacks it."""
    try:
        return mlflow.MlflowClient(tracking_uri()).get_run(run_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs still RUNNING whose process (tags `host`, `pid`) is gone from this host: a
    stage killed mid-run never ends its run itself. Returns their ids."""
    client = mlflow.MlflowClient(tracking_uri())
    ended = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        host, pid = run.data.tags.get("host"), run.data.tags.get("pid", "")
        if host == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def pipeline_tags(fingerprint: str) -> dict[str, str]:
    """MLflow tags that tie a run to its code, data and orchestration: git_commit, data_fingerprint,
    and dvc_experiment / prefect_flow_run_id when the flow set DVC_EXP_NAME / PREFECT__FLOW_RUN_ID."""
    tags = {"git_commit": git_commit(), "data_fingerprint": fingerprint}
    for env, tag in (("DVC_EXP_NAME", "dvc_experiment"), ("PREFECT__FLOW_RUN_ID", "prefect_flow_run_id")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def step_logger(run_id: str) -> Callable[[int, dict[str, float]], None]:
    """`pipeline.loop.fit`'s `log` for the active run `run_id`: metrics at a step, each key once per
    step. A resumed run replays the steps after its checkpoint, some of which the run logged before
    the stop; the replay computes the same values (bit-exact resume), so those points are kept, not
    logged twice."""
    client = mlflow.MlflowClient(tracking_uri())
    last = {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in client.get_run(run_id).data.metrics}

    def log(step: int, metrics: dict[str, float]) -> None:
        if new := {k: v for k, v in metrics.items() if step > last.get(k, -1)}:
            mlflow.log_metrics(new, step=step)
    return log


@contextmanager
def ended_on_error() -> Iterator[None]:
    """End the active run KILLED on Ctrl-C and FAILED on an error or a failing SystemExit, then re-raise:
    MLflow's exit hook would mark a run that never finished FINISHED. (SIGKILL, and SIGTERM outside
    the training loop, leave it RUNNING; `end_orphaned_runs` marks it KILLED at the next start_run.)
    Ctrl-C leaves as SystemExit(130), a shell's status for it, and a KeyboardInterrupt that carries a
    `status` (pipeline.stopping.Terminated: SIGTERM, 143) with that status; without a traceback from each
    rank: the training loop has said where it stopped. Works as a decorator too."""
    try:
        yield
    except BaseException as e:
        if mlflow.active_run() and not (isinstance(e, SystemExit) and e.code in (0, None)):
            mlflow.end_run("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(getattr(e, "status", 130)) from None
        raise


@contextmanager
def pipeline_run(params: dict[str, Any], run_file: str | Path = RUN_FILE) -> Iterator[str]:
    """Log into this pipeline run's MLflow run (for evaluate and export); yields its id.

    That is the run `train` opened and recorded in `run_file`, when it was made under `params` (the
    whole params.yaml, flattened as train logged it, by `pipeline.dvcfile.flatten`) and this git
    commit. When train did not run (`dvc exp run -S evaluate.x=...`, a new commit that changed only
    later stages), logging there would overwrite the metrics of a run whose params say otherwise.
    This run is then one of its own, nested under the training run (tag mlflow.parentRunId), holding
    these params and this commit's tags: made by the first stage of the pipeline run that needs it,
    found again (tag params_hash) by the next."""
    training = json.loads(Path(run_file).read_text())["run_id"]
    mlflow.set_tracking_uri(tracking_uri())
    parent = _stored_run(training)
    if parent is None:
        raise SystemExit(f"MLflow: run {training} ({run_file}, written by train) is not in {tracking_uri()}: "
                         "rerun the train stage (dvc repro -f -s train: it resumes its checkpoint into a new run), "
                         "or set MLFLOW_TRACKING_URI to the store that holds it")
    logged = {k: str(v) for k, v in params.items()}
    own = pipeline_tags(parent.data.tags.get("data_fingerprint", "unknown"))
    key = hashlib.sha256(json.dumps([logged, own["git_commit"]], sort_keys=True).encode()).hexdigest()[:16]
    run_id = training
    if (any(parent.data.params.get(k) != v for k, v in logged.items())
            or parent.data.tags.get("git_commit") != own["git_commit"]):
        found = mlflow.MlflowClient(tracking_uri()).search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{training}' and tags.params_hash = '{key}'",
            max_results=1)
        run_id = found[0].info.run_id if found else None
    tags = {"host": socket.gethostname(), "pid": str(os.getpid())}
    if run_id is None:
        tags |= {**own, "mlflow.parentRunId": training, "params_hash": key}
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else parent.info.experiment_id, tags=tags,
                          run_name=None if run_id else os.environ.get("DVC_EXP_NAME")) as run:
        if run_id is None:
            mlflow.log_params(logged)
            print(f"MLflow: run {run.info.run_id}, nested under training run {training}, which was made "
                  "under other params or another commit")
        yield run.info.run_id
