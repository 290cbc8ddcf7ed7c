"""The data-efficiency study (the paper's Figure 2) over several training seeds: how far its ratios
move with the draw, and the ratios of the seeds' mean curves.

    python benchmarks/efficiency_seeds.py [--pipeline real] --seeds 1 2 [-S efficiency.eval_images=512 ...]
        [--no-committed] [--work DIR] [--out FILE]

One committed run of the study is one draw: with 128 to 256 probe images per task, a ratio read
where two curves cross the target moves by half of itself between draws (docs/efficiency.md). This
runs the study's own stages (`python -m pipeline.efficiency train <objective>` for each objective,
then `python -m pipeline.efficiency_report`) once per seed in a scratch folder: on the pipeline's
data (its `data/`, as its ingest and tokenize stages wrote it) and its `params.yaml` with
`train.seed` set and the paths the study reads made absolute. The pipeline's committed run
(`<pipeline>/reports/efficiency.json`, at its params' `train.seed`) is the first draw unless
`--no-committed`; it must come from the same code, data and params (`dvc status` says so). `-S
key=value` changes a params key for the new runs (a larger probe: `efficiency.eval_images`), and then
the committed run, measured without it, is left out.

Writes reports/benchmarks/efficiency_seeds[_<pipeline>][_<each -S>].json (or --out):
- `runs`: each seed's report as the stage wrote it (curves, target, images to it, ratios or lower
  bounds, final top-1, wall seconds);
- `ratios`: each ratio seed by seed (null where it is only a lower bound, given in `ratios_at_least`);
- `mean`: every objective's curve averaged over the seeds with its standard deviation, the images
  each mean curve needs to reach the target (efficiency.target_accuracy, or by default half the mean
  contrastive final top-1), and the ratios of those.
Raises SystemExit (one line) when the pipeline lacks its data, a committed run or a params key.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.pipeline_time import override  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from pipeline.efficiency import OBJECTIVES  # noqa: E402
from pipeline.efficiency_report import compare, images_to_reach  # noqa: E402


def study_params(params: dict[str, Any], base: Path, seed: int) -> dict[str, Any]:
    """`params` (a pipeline's params.yaml, its paths relative to `base`) with train.seed = `seed` and the
    paths the study reads (the templates file, the held-out sets and their class-list files) absolute."""
    out = json.loads(json.dumps(params))
    out["train"]["seed"] = seed
    ev = out.get("evaluate", {})
    if "templates" in ev:
        ev["templates"] = str((base / ev["templates"]).resolve())
    for held_out in (ev.get("datasets") or {}).values():
        held_out["path"] = str((base / held_out["path"]).resolve())
        if isinstance(held_out.get("classnames"), str):
            held_out["classnames"] = str((base / held_out["classnames"]).resolve())
    return out


def run_seed(pipeline: Path, params: dict[str, Any], seed: int, scratch: Path) -> dict[str, Any]:
    """The study's stages for one seed in `scratch` (its own checkpoints and MLflow store: a stage resumes
    from a checkpoint left there); returns the report efficiency_report wrote. Each stage's output goes
    to `scratch/<stage>.log`."""
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "params.yaml").write_text(yaml.safe_dump(study_params(params, pipeline, seed), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    data = str((pipeline / "data").resolve())
    stages = [[f"train_{o}", "pipeline.efficiency", "train", o, "--data", data] for o in OBJECTIVES]
    stages.append(["report", "pipeline.efficiency_report"])
    for name, *cmd in stages:
        start = time.perf_counter()
        with open(scratch / f"{name}.log", "w") as log:
            done = subprocess.run([sys.executable, "-m", *cmd], cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            tail = (scratch / f"{name}.log").read_text().strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"efficiency_seeds: seed {seed}: {name} failed ({tail[0]}); log in {scratch / name}.log")
        print(f"efficiency_seeds: seed {seed}: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((scratch / "reports/efficiency.json").read_text())


def summary(runs: dict[int, dict[str, Any]], target_accuracy: float | None = None) -> dict[str, Any]:
    """The table across `runs` (seed -> the study's report): the ratios seed by seed and those of the
    mean curves, whose target is the stage's rule on the means: `target_accuracy` (efficiency.target_accuracy)
    or, when None, half the mean contrastive final top-1."""
    first = next(iter(runs.values()))
    objectives = list(first["curves"])
    images = first["curves"]["contrastive"]["images_seen"]
    for seed, r in runs.items():
        if list(r["curves"]) != objectives or any(c["images_seen"] != images for c in r["curves"].values()):
            raise SystemExit(f"efficiency_seeds: seed {seed}'s study has other objectives or checkpoints than "
                             f"the first's; compare like with like")
    keys = ("contrastive_vs_bow", "bow_vs_captioning")
    ratios = {k: [r["ratios"][k] for r in runs.values()] for k in keys}
    at_least = {k: [r["ratios_at_least"].get(k) for r in runs.values()] for k in keys}
    top1 = {o: np.array([r["curves"][o]["top1"] for r in runs.values()]) for o in objectives}
    mean = {o: t.mean(0) for o, t in top1.items()}
    target = target_accuracy or 0.5 * float(mean["contrastive"][-1])
    reach = {o: images_to_reach([{"images_seen": i, "top1": float(a)} for i, a in zip(images, m)], target)
             for o, m in mean.items()}
    captioning, mean_ratios, mean_bounds = compare(reach, {o: float(m[-1]) for o, m in mean.items()}, images[-1])
    return {
        "seeds": list(runs),
        "ratios": ratios,
        "ratios_at_least": at_least,
        "final_top1": {o: [round(float(x), 4) for x in t[:, -1]] for o, t in top1.items()},
        "mean": {"images_seen": images, "target_accuracy": target, "captioning": captioning,
                 "top1": {o: [round(float(x), 4) for x in m] for o, m in mean.items()},
                 "top1_sd": {o: [round(float(x), 4) for x in t.std(0, ddof=1 if len(t) > 1 else 0)]
                             for o, t in top1.items()},
                 "images_to_target": reach,
                 "ratios": mean_ratios, "ratios_at_least": mean_bounds},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", type=Path, default=Path("."),
                    help="the pipeline folder (the repo root, real/, mydata/): its params.yaml, data/ and committed study")
    ap.add_argument("--seeds", type=int, nargs="+", required=True, help="train.seed of each new run")
    ap.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a params key for the new runs, as `dvc exp run -S` (implies --no-committed)")
    ap.add_argument("--no-committed", action="store_true", help="leave the committed run out of the table")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: reports/benchmarks/efficiency_seeds[_<pipeline folder>][_<each -S>].json")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep each seed's scratch folder (logs, checkpoints, MLflow store) here, not in a temporary "
                         "one; a rerun with the same folder resumes each seed's stages from their checkpoints")
    args = ap.parse_args()
    pipeline = args.pipeline.resolve()
    name = "".join("_" + re.sub(r"[^\w.=-]", "", part) for part in [*([] if pipeline == ROOT else [pipeline.name]), *args.set])
    out = args.out or ROOT / f"reports/benchmarks/efficiency_seeds{name}.json"
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    for assignment in args.set:
        override(params, assignment)
    if not (pipeline / "data/tokens.npy").exists():
        raise SystemExit(f"efficiency_seeds: {pipeline / 'data'} has no tokens.npy: run `dvc repro` of the pipeline's "
                         "efficiency/dvc.yaml (or its ingest and tokenize stages) first")
    runs: dict[int, dict[str, Any]] = {}
    if not (args.no_committed or args.set):
        committed = pipeline / "reports/efficiency.json"
        if not committed.exists():
            raise SystemExit(f"efficiency_seeds: no committed run at {committed}; give --no-committed")
        runs[int(params["train"]["seed"])] = json.loads(committed.read_text())
    repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1 or s in runs})
    if repeated:
        raise SystemExit(f"efficiency_seeds: --seeds {' '.join(map(str, repeated))} would be in the table twice "
                         "(the committed run is its params' train.seed)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="efficiency-seeds-") as tmp:
        work = args.work.resolve() if args.work else Path(tmp)
        for seed in args.seeds:
            runs[seed] = run_seed(pipeline, params, seed, work / f"s{seed}")
    result = {"pipeline": str(pipeline.relative_to(ROOT)) if pipeline.is_relative_to(ROOT) else str(pipeline),
              "committed_seed": None if args.no_committed or args.set else int(params["train"]["seed"]),
              "overrides": args.set, "cpu": cpu_name(), "cpus": len(os.sched_getaffinity(0)),
              **summary(runs, params.get("efficiency", {}).get("target_accuracy")),
              "runs": {str(s): r for s, r in runs.items()}, "wall_s": time.perf_counter() - start}
    write_json(out, result)
    print(f"efficiency_seeds: wrote {out}: ratios {result['ratios']} (at least {result['ratios_at_least']}); "
          f"of the mean curves {result['mean']['ratios']} (at least {result['mean']['ratios_at_least']})")


if __name__ == "__main__":
    main()
