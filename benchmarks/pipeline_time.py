"""Wall time of every pipeline stage and the metrics they reach, on this machine, CPU or GPU.

Runs each stage's command of dvc.yaml, in dependency order, in a scratch folder holding the repo's
code, templates and params.yaml with the `-S key=value` overrides applied (as `dvc exp run -S`),
so it needs neither DVC nor a git checkout: the same script times the 2-core CI machine and a lent
GPU. Stage logs go beside the JSON (…/<name>.log).

    python benchmarks/pipeline_time.py [-S train.epochs=60 ...] [--name pipeline_cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout, installed or not
from benchmarks.machine import device_name  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from pipeline.dvcfile import key_metrics, read_metrics, stage_names  # noqa: E402
COPIED = ("clipmodel", "pipeline", "templates", "dvc.yaml", "params.yaml")


def override(params: dict, assignment: str) -> None:
    """The part of `dvc exp run -S` the benchmark needs, without DVC (absent on a bare GPU machine):
    an existing key gets a YAML value; adding keys (`+key=`) is not supported."""
    key, sep, value = assignment.partition("=")
    if not sep:
        raise SystemExit(f"-S {assignment!r}: expected key=value")
    *parents, leaf = key.split(".")
    node = params
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"-S {assignment!r}: params.yaml has no section {part!r}")
        node = node[part]
    if leaf not in node:
        raise SystemExit(f"-S {assignment!r}: params.yaml has no key {key!r}")
    node[leaf] = yaml.safe_load(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default="pipeline_cpu", help="writes reports/benchmarks/<name>.json")
    ap.add_argument("--stages", nargs="*", help="a prefix of the dvc.yaml order (default: all)")
    args = ap.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in args.set:
        override(params, assignment)
    stages = args.stages or stage_names(ROOT)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = ROOT / "reports" / "benchmarks" / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}

    with tempfile.TemporaryDirectory(prefix="pipeline-time-") as tmp:
        work = Path(tmp)
        for name in COPIED:
            (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, work / name)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        result = {"device": device_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
                  "python": platform.python_version(), "overrides": args.set, "complete": False,
                  "stage_seconds": {}}
        log_path = out.with_suffix(".log")
        with open(log_path, "w") as log:
            for stage in stages:
                cmd = spec[stage]["cmd"]  # `python -m ...`: run it with this interpreter
                cmd = shlex.quote(sys.executable) + cmd.removeprefix("python") if cmd.startswith("python ") else cmd
                start = time.perf_counter()
                proc = subprocess.run(cmd, shell=True, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
                result["stage_seconds"][stage] = round(time.perf_counter() - start, 1)
                print(f"{stage}: {result['stage_seconds'][stage]} s", flush=True)
                if proc.returncode:
                    log.flush()
                    tail = log_path.read_text().splitlines()[-20:]
                    raise SystemExit(f"{stage} failed ({proc.returncode}); log tail:\n" + "\n".join(tail))
                metrics = read_metrics(work)  # after every stage: a run cut short keeps what it measured
                result.update(complete=stage == stages[-1],
                              total_seconds=round(sum(result["stage_seconds"].values()), 1),
                              metrics=key_metrics(metrics),
                              train={k.removeprefix("train."): v for k, v in metrics.items() if k.startswith("train.")})
                write_json(out, result)

    print(f"{args.name}: {result['total_seconds']} s on {result['device']}; wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
