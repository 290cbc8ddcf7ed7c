"""Prefect 3 orchestration of the DVC pipeline: one task per DVC stage, experiments, sweeps, schedules.

Design
------
DVC stays the source of truth for *what* runs and what is skipped; Prefect adds retries, logs,
schedules and a UI. A `clip-pipeline` flow run is:

1. `apply-overrides` (only with overrides): writes the overrides into params.yaml with DVC's own
   `-S/--set-param` parser (Hydra override grammar, the same code `dvc exp run -S` calls), after
   checking that the experiment name is free. A typo'd key fails here, before any work.
2. One task per stage, in dependency order read from dvc.yaml (stages added later, e.g. `export`,
   join automatically): `dvc repro --single-item <stage>`. DVC skips a stage whose deps and params
   did not change, or restores it from the run cache. The stage's output is streamed line by line
   into the Prefect run logger. A non-zero exit raises `StageFailed`; the task is retried with
   exponential backoff (`retries`, `retry_delay_seconds`), except for a bad params.yaml (the stage
   exits 2 with a `params.yaml: <key>: <msg>` line), which no retry can fix.
3. `save-experiment`: `dvc exp save -n NAME` records the workspace (params.yaml, dvc.lock and the
   uncached metrics/plots files) as a DVC experiment, so every flow run, with or without overrides,
   is reproducible from its experiment (`dvc exp apply NAME`, `dvc exp show`).
4. `collect`: the metrics of every `metrics:` file in dvc.yaml (reports/metrics.json from
   evaluate, reports/train.json from train), read from the workspace the run just updated, and
   the MLflow run id that export logged into (reports/export.json; else train's, reports/run.json).

Why not `dvc exp run -S ... -n NAME`? It runs the whole pipeline in one process, so there would
be one Prefect task for all stages and a retry would restart the pipeline. Steps 1 + 2 + 3 are
what `dvc exp run` does in the workspace (apply params, repro, commit an experiment ref), split so
that each stage is its own task. As with `dvc exp run`, the workspace ends holding the run's
outputs; unlike it, params.yaml is put back as it was (the experiment keeps the overrides), so the
next scheduled run starts from the committed params and not from the last sweep point.

Every subprocess gets `PREFECT__FLOW_RUN_ID` (this flow run), `DVC_EXP_NAME` (the experiment;
DVC itself sets it only inside `dvc exp run`) and `MLFLOW_TRACKING_URI`, so the train stage tags its MLflow run with both ids and the runs of a
sweep sit side by side in the MLflow compare view of experiment `clip-<data.source>`.

`clip-sweep` runs each point of a grid as its own `clip-pipeline` subflow and experiment. With
`concurrency=1` (default) points run one after another in the workspace; with more, each point
runs in its own `git clone --shared` of the repo (with the workspace's uncommitted changes, the
same DVC cache, the same MLflow store), like `dvc exp run --temp`; its experiment ref is fetched
back into the repo and the clone removed.

CLI::

    python -m pipeline.flows run [--set train.lr=3e-4 ...] [--name EXP] [--pipeline real]
    python -m pipeline.flows sweep sweep.yaml [--concurrency 2]
    python -m pipeline.flows serve --cron "0 3 * * *" [--sweep sweep.yaml] [--set ...]
"""
import argparse
import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, serve, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.schedules import Cron
from prefect.tasks import exponential_backoff

from pipeline import workspace
from pipeline.dvcfile import key_metrics, read_metrics, stage_names, uncached_outputs
from pipeline.params import ParamsInvalid, read_params
from pipeline.sweeps import Overrides, expand_grid, format_table, load_grid, parse_sets

ROOT = Path(__file__).resolve().parents[1]
PARAMS = "params.yaml"
RUN_FILE = "reports/run.json"      # written by the train stage (pipeline/tracking.py RUN_FILE)
EXPORT_REPORT = "reports/export.json"  # written by the export stage, with the MLflow run it logged into
PARAMS_ERROR = re.compile(r"^params\.yaml: \S")  # pipeline/params.py's one-line error

# ---------------------------------------------------------------------------------------------
# subprocesses


class StageFailed(RuntimeError):
    """A stage (or a DVC command) exited non-zero. `bad_params` marks a params.yaml error."""

    def __init__(self, stage: str, returncode: int, tail: list[str], params_errors: list[str]):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        self.params_errors = params_errors
        self.bad_params = bool(params_errors) and (
            returncode == 2 or any("exited with 2" in line for line in tail))
        if self.bad_params:  # the stage's own one-line error; DVC's exit status (255) says nothing more
            super().__init__(f"stage {stage!r} refused its params: {'; '.join(params_errors)}")
        else:
            super().__init__(f"stage {stage!r} failed (exit status {returncode}): " + "\n".join(tail[-20:]))

    def __reduce__(self):  # picklable, for Prefect's result handling
        return (StageFailed, (self.stage, self.returncode, self.tail, self.params_errors))


def stream(cmd: list[str], cwd: str | Path, env: dict[str, str], name: str) -> list[str]:
    """Run `cmd`, logging each line of its stdout+stderr; raise StageFailed on a non-zero exit.
    Returns the last 200 lines."""
    logger = get_run_logger()
    logger.info("%s: $ %s", name, " ".join(cmd))
    tail: deque[str] = deque(maxlen=200)
    params_errors: list[str] = []
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # universal newlines: tqdm's \r updates arrive as lines too
            line = line.rstrip()
            if not line:
                continue
            logger.info("%s | %s", name, line)
            tail.append(line)
            if PARAMS_ERROR.match(line):
                params_errors.append(line)
    if proc.returncode:
        raise StageFailed(name, proc.returncode, list(tail), params_errors)
    return list(tail)


# ---------------------------------------------------------------------------------------------
# tasks


def retry_unless_bad_params(task, task_run, state) -> bool:
    """retry_condition_fn: retry anything but a params.yaml error (exit 2 + `params.yaml:` line)."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - whatever it is, inspect it
            exc = e
    return not (isinstance(exc, StageFailed) and exc.bad_params)


@task(name="dvc-stage", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_params,
      task_run_name="{stage}")
def run_stage(stage: str, repo: str, extra_env: dict[str, str] | None = None,
              command: list[str] | None = None) -> str:
    """Reproduce one DVC stage (`dvc repro --single-item`); `command` replaces the DVC call
    (tests inject a flaky script). Returns what DVC did: "ran", "skipped" (unchanged) or
    "restored" (from the run cache)."""
    cmd = command or workspace.dvc("repro", "--single-item", stage)
    try:
        lines = stream(cmd, repo, workspace.subprocess_env(repo, extra_env), stage)
    except StageFailed as e:
        if e.bad_params:
            get_run_logger().error("%s: bad params.yaml, not retrying: %s", stage, "; ".join(e.params_errors))
        raise
    text = "\n".join(lines)
    if "didn't change, skipping" in text:
        return "skipped"
    if "is cached - skipping run" in text:
        return "restored"
    return "ran"


@task(name="apply-overrides", cache_policy=NO_CACHE)
def apply_overrides(repo: str, overrides: Overrides, experiment: str) -> str:
    """Check the experiment name is free, then write the overrides into params.yaml exactly as
    `dvc exp run -S key=value` would. Returns the original params.yaml text.

    Raises: ValueError when the experiment name is taken or an override's key is not in params.yaml."""
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    workspace.check_fresh_name(repo, experiment)
    path = Path(repo) / PARAMS
    original = path.read_text()
    patterns = [f"{key}={workspace.hydra_value(value)}" for key, value in overrides.items()]
    get_run_logger().info("params.yaml overrides: %s", " ".join(patterns))
    try:
        dvc_apply_overrides(path, patterns)
    except Exception as e:
        path.write_text(original)
        cause = f": {e.__cause__}" if e.__cause__ else ""
        raise ValueError(f"bad override {patterns}: {e}{cause}") from None
    return original


@task(name="check-params", cache_policy=NO_CACHE)
def check_params(repo: str) -> None:
    """Validate the run's params.yaml, overrides applied, before any stage runs: DVC deletes a stage's
    outputs before running it, so a value the stage would refuse would otherwise cost the workspace
    the last run's outputs (the stage's own check stays, for `dvc repro`).

    Raises: ParamsInvalid, one line naming the file and the first bad key."""
    read_params(Path(repo) / PARAMS)


@task(name="save-experiment", cache_policy=NO_CACHE)
def save_experiment(repo: str, experiment: str) -> str:
    """`dvc exp save -n NAME dvc.yaml`, including the uncached outputs (metrics, plots, run.json) that
    .gitignore would otherwise leave out, and what DVC wrote that git does not track yet (a new
    pipeline folder's first run: its dvc.lock and the .gitignore files beside its outputs), without
    which the experiment could not be applied. Limited to this folder's pipeline: another's (e.g.
    efficiency/dvc.yaml) outputs need not exist."""
    include = [p for p in uncached_outputs(repo) if (Path(repo) / p).exists()]
    include += filter(None, workspace.git(repo, "ls-files", "-z", "--others", "--exclude-standard", "--", "dvc.lock",
                                          ":(glob)**/.gitignore").split("\0"))
    cmd = workspace.dvc("exp", "save", "-n", experiment, *itertools.chain.from_iterable(("-I", p) for p in include), "dvc.yaml")
    stream(cmd, repo, workspace.subprocess_env(repo), "exp-save")
    return experiment


@task(name="collect", cache_policy=NO_CACHE)
def collect(repo: str) -> dict[str, Any]:
    """What the run produced, read from the workspace it just updated: {"metrics" (every dvc.yaml
    metrics file, `read_metrics`), "mlflow_run_id", "mlflow_experiment_id"}. The run is the one
    export logged into (reports/export.json): train's, or the one nested under it when train was
    skipped (`tracking.pipeline_run`); the ids are None when reports/run.json is absent."""
    run_file, export_report = Path(repo) / RUN_FILE, Path(repo) / EXPORT_REPORT
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    exported = json.loads(export_report.read_text()).get("mlflow_run_id") if export_report.exists() else None
    return {"metrics": read_metrics(repo), "mlflow_run_id": exported or run.get("run_id"),
            "mlflow_experiment_id": run.get("experiment_id")}


# ---------------------------------------------------------------------------------------------
# flows


@flow(name="clip-pipeline")
def clip_pipeline(overrides: dict[str, Any] | None = None, experiment: str | None = None,
                  repo: str = str(ROOT), retries: int = 2, retry_delay_seconds: float = 10.0,
                  isolated: bool = False) -> dict[str, Any]:
    """Reproduce the DVC pipeline, one task per stage, and record the run as a DVC experiment.

    repo: the folder of dvc.yaml and params.yaml, the root of a git + DVC repo or a folder in it
    (e.g. real/: its stages, params, reports and MLflow store, as `cd real && dvc exp run`).
    overrides: params.yaml values for this run, e.g. {"train.lr": 3e-4} (`dvc exp run -S` syntax
    for strings). experiment: the DVC experiment name (default: this flow run's name). retries /
    retry_delay_seconds: per-stage retries with exponential backoff (delay, 2*delay, 4*delay...).
    isolated: run in a temporary clone, leaving the workspace alone (used by concurrent sweeps).

    Returns {"experiment", "overrides", "metrics", "key_metrics", "mlflow_run_id", "stages",
    "flow_run_id"}.
    """
    logger = get_run_logger()
    repo_path = Path(repo).resolve()
    overrides = dict(overrides or {})
    name = experiment or str(current_flow_run.get_name() or "")
    flow_run_id = str(current_flow_run.get_id())
    env = {"PREFECT__FLOW_RUN_ID": flow_run_id, "DVC_EXP_NAME": name,
           "MLFLOW_TRACKING_URI": workspace.subprocess_env(repo_path)["MLFLOW_TRACKING_URI"]}
    stage_task = run_stage.with_options(
        retries=retries, retry_delay_seconds=exponential_backoff(retry_delay_seconds)(retries) or 0)
    original, work, clone = None, repo_path, None
    try:
        if isolated:
            clone, work = workspace.clone(repo_path)
        if overrides:
            original = apply_overrides(str(work), overrides, name)
        else:
            workspace.check_fresh_name(work, name)
        check_params(str(work))
        stages = {}
        for stage in stage_names(work):
            stages[stage] = stage_task(stage, str(work), env)
        save_experiment(str(work), name)
        result = collect(str(work))
        if clone:
            workspace.fetch_experiment(repo_path, clone, name)
    finally:
        if original is not None and not isolated:
            (work / PARAMS).write_text(original)
        if clone:
            shutil.rmtree(clone, ignore_errors=True)
    result.update(experiment=name, overrides=overrides, key_metrics=key_metrics(result["metrics"]),
                  stages=stages, flow_run_id=flow_run_id)
    logger.info("experiment %s: mlflow run %s, %s", name, result["mlflow_run_id"],
                json.dumps(result["key_metrics"]))
    return result


def _outcome(state) -> dict[str, Any]:
    """A finished clip-pipeline state as plain data: its result, or why it failed."""
    if state.is_completed():
        return {"ok": True, "result": state.result()}
    return {"ok": False, "error": state.message}


@task(name="sweep-point", cache_policy=NO_CACHE, task_run_name="{experiment}")
def _sweep_point(overrides: Overrides, experiment: str, repo: str, retries: int,
                 retry_delay_seconds: float, isolated: bool, gate: Any = None) -> dict[str, Any]:
    with gate or threading.Semaphore():
        return _outcome(clip_pipeline.with_options(flow_run_name=experiment)(
            overrides=overrides, experiment=experiment, repo=repo, retries=retries,
            retry_delay_seconds=retry_delay_seconds, isolated=isolated, return_state=True))


@flow(name="clip-sweep")
def clip_sweep(grid: dict[str, Any] | list[dict[str, Any]] | str, concurrency: int = 1,
               repo: str = str(ROOT), retries: int = 2, retry_delay_seconds: float = 10.0,
               prefix: str | None = None) -> list[dict[str, Any]]:
    """Run every point of `grid` as its own clip-pipeline subflow and DVC experiment.

    grid: {key: [values]} (Cartesian product), a list of override dicts, or the path of a
    YAML/JSON file holding either (read when the flow runs, so a served sweep picks up edits).
    Experiments are named `<prefix>-<n>` (prefix: this flow run's name). concurrency > 1 runs
    that many points at once, each in its own clone of the repo.

    Returns one row per point: experiment, status, overrides, mlflow_run_id and its metrics.
    The flow fails after all points ran if any point failed.
    """
    logger = get_run_logger()
    points = expand_grid(load_grid(grid, repo) if isinstance(grid, str) else grid)
    prefix = prefix or str(current_flow_run.get_name() or "sweep")
    names = [f"{prefix}-{i + 1}" for i in range(len(points))]
    common = dict(repo=repo, retries=retries, retry_delay_seconds=retry_delay_seconds)
    if concurrency <= 1:
        outcomes = [_outcome(clip_pipeline.with_options(flow_run_name=name)(
            overrides=point, experiment=name, isolated=False, return_state=True, **common))
            for point, name in zip(points, names)]
    else:
        gate = threading.BoundedSemaphore(concurrency)
        futures = [_sweep_point.submit(point, name, isolated=True, gate=gate, **common)
                   for point, name in zip(points, names)]
        outcomes = [f.result() for f in futures]
    table = []
    for point, name, outcome in zip(points, names, outcomes):
        row: dict[str, Any] = {"experiment": name, "overrides": point}
        if outcome["ok"]:
            result = outcome["result"]
            row.update(status="completed", mlflow_run_id=result["mlflow_run_id"], **result["metrics"])
        else:
            row.update(status="failed", error=outcome["error"])
        table.append(row)
    logger.info("sweep results:\n%s", format_table(table))
    failed = [row["experiment"] for row in table if row["status"] != "completed"]
    if failed:
        raise RuntimeError(f"sweep points failed: {', '.join(failed)}")
    return table


# ---------------------------------------------------------------------------------------------
# deployments and CLI


def build_deployment(name: str, cron: str, sweep: str | None = None,
                     overrides: Overrides | None = None, repo: str = str(ROOT),
                     timezone: str = "UTC", **params: Any):
    """The RunnerDeployment that `serve` runs on `cron` (in `timezone`, an IANA name): the sweep
    of file `sweep` (re-read at each run), or the pipeline with `overrides`."""
    schedule = Cron(cron, timezone=timezone)
    if sweep:
        return clip_sweep.to_deployment(name=name, schedule=schedule,
                                        parameters={"grid": str(Path(sweep).resolve()), "repo": repo, **params})
    return clip_pipeline.to_deployment(name=name, schedule=schedule,
                                       parameters={"overrides": overrides or {}, "repo": repo, **params})


def main(argv: list[str] | None = None) -> int:
    """The CLI above. Returns the exit status: 0, 1 when the run or sweep failed (one line on stderr),
    2 for a bad params.yaml; `serve` blocks until interrupted."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pipeline", "--repo", dest="repo", default=str(ROOT), metavar="DIR",
                        help="the folder of dvc.yaml and params.yaml: a DVC repo's root (default: this "
                             "checkout) or a pipeline folder in it, e.g. real")
    common.add_argument("--retries", type=int, default=2, help="retries per stage (default 2)")
    common.add_argument("--retry-delay", type=float, default=10.0,
                        help="first retry delay in seconds, doubling after (default 10)")
    run_p = sub.add_parser("run", parents=[common], help="run the pipeline once")
    run_p.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE",
                       help="params.yaml override (dvc exp run -S syntax); repeatable")
    run_p.add_argument("--name", "-n", help="experiment name (default: the flow run's name)")
    sweep_p = sub.add_parser("sweep", parents=[common], help="run a grid of overrides")
    sweep_p.add_argument("file", help="YAML/JSON: {key: [values]} or a list of {key: value}")
    sweep_p.add_argument("--concurrency", "-j", type=int, default=1)
    sweep_p.add_argument("--prefix", help="experiment name prefix (default: the flow run's name)")
    serve_p = sub.add_parser("serve", parents=[common], help="serve on a cron schedule (blocks)")
    serve_p.add_argument("--cron", required=True, help='e.g. "0 3 * * *"')
    serve_p.add_argument("--timezone", default="UTC", help="of the cron schedule, e.g. Europe/Berlin (default UTC)")
    serve_p.add_argument("--sweep", metavar="FILE", help="serve the sweep of FILE instead")
    serve_p.add_argument("--set", "-S", action="append", default=[], metavar="KEY=VALUE")
    serve_p.add_argument("--concurrency", "-j", type=int, default=1)
    serve_p.add_argument("--name", help="deployment name (default: nightly)", default="nightly")
    args = ap.parse_args(argv)
    common_params = {"repo": str(Path(args.repo).resolve()), "retries": args.retries,
                     "retry_delay_seconds": args.retry_delay}

    if args.command == "serve":  # blocks, running scheduled runs, until interrupted
        extra = {"concurrency": args.concurrency} if args.sweep else {}
        serve(build_deployment(args.name, args.cron, sweep=args.sweep, overrides=parse_sets(args.set),
                               timezone=args.timezone, **common_params, **extra))
        return 0
    try:
        if args.command == "run":
            result = clip_pipeline(overrides=parse_sets(args.set), experiment=args.name, **common_params)
            print(json.dumps({k: result[k] for k in ("experiment", "mlflow_run_id", "stages", "key_metrics")},
                             indent=2))
        else:
            grid = str(Path(args.file).resolve())
            load_grid(grid, args.repo)  # a missing or malformed file fails here, before Prefect starts a server
            table = clip_sweep(grid=grid, concurrency=args.concurrency, prefix=args.prefix, **common_params)
            print(format_table(table))
    except Exception as e:  # the run logs hold the traceback; the terminal gets one line
        print(f"{args.command} failed: {e}", file=sys.stderr)
        return 2 if isinstance(e, ParamsInvalid) or isinstance(e, StageFailed) and e.bad_params else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
