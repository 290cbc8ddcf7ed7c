"""Several seeds of `benchmarks/real_zero_shot.py` in one table: each side's top-1 per seed on every
held-out set (those of the first run), the project's over open_clip's as the ratio of the means and
seed by seed.

    python benchmarks/real_seeds.py RUN_S0.json RUN_S1.json RUN_S2.json \
        --out reports/benchmarks/real_zero_shot_e30_seeds.json [--template label] [--how "what was run"]
        [--scores scores_support]

Each RUN is one real_zero_shot.py output holding both sides (a `--skip-openclip` run into a copy of an
earlier output keeps that output's open_clip side). Raises SystemExit (one line) when a run lacks a
side, a set or the template, or when the runs differ in epochs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clipmodel.io import write_json  # noqa: E402

SIDES = ("open_clip", "project")


def ratio(project: float, open_clip: float) -> float | None:
    """project / open_clip to 3 decimals; None where open_clip scored nothing."""
    return round(float(project / open_clip), 3) if open_clip else None


def summary(runs: list[dict], names: list[str], template: str, scores: str = "scores") -> dict:
    """The table of `runs` (real_zero_shot.py outputs, one per seed, named by `names` in errors), by
    `scores`: "scores" (the paper's zero-shot) or "scores_support" (support-set zero-shot on both
    sides; then also open_clip's better of the two scorings, seed by seed, and the ratio to that)."""
    sets = list(runs[0].get("open_clip", {}).get("scores", {}))  # a run without the side fails below
    kinds = ("scores", "scores_support") if scores == "scores_support" else ("scores",)
    top1 = {kind: {s: {k: [] for k in sets} for s in SIDES} for kind in kinds}
    epochs = set()
    for run, name in zip(runs, names):
        for side in SIDES:
            if side not in run:
                raise SystemExit(f"real_seeds: {name} has no {side} side")
            epochs.add(run[side]["epochs"])
            for kind in kinds:
                for k in sets:
                    try:
                        top1[kind][side][k].append(round(run[side][kind][k][template]["top1"], 4))
                    except KeyError:
                        raise SystemExit(f"real_seeds: {name}: {side} has no {k} in {kind} with template "
                                         f"{template!r}") from None
    if len(epochs) != 1:
        raise SystemExit(f"real_seeds: the runs differ in epochs ({sorted(epochs)}); compare like with like")
    a, b = top1[scores]["open_clip"], top1[scores]["project"]
    extra = {}
    if scores == "scores_support":
        best = {k: [max(x, y) for x, y in zip(top1["scores"]["open_clip"][k], a[k])] for k in sets}
        extra = {"top1_zero_shot": top1["scores"], "open_clip_best_of_both": best,
                 "ratio_of_means_to_open_clip_best": {k: ratio(np.mean(b[k]), np.mean(best[k])) for k in sets}}
    return {
        "epochs": epochs.pop(), "templates": template, "scores": scores, "top1": top1[scores],
        "ratio_of_means": {k: ratio(np.mean(b[k]), np.mean(a[k])) for k in sets},
        "ratio_per_seed": {k: [ratio(y, x) for x, y in zip(a[k], b[k])] for k in sets}, **extra,
        "train_seconds": {s: [r[s]["train_seconds"] for r in runs] for s in SIDES},
        "params": {s: runs[0][s]["params"] for s in SIDES},
        "seeds": {"open_clip": [r["open_clip"].get("seed") for r in runs],
                  "project": [r["project"].get("overrides") for r in runs]},
        "machine": sorted({r.get("machine", "?") for r in runs}),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--template", default="label", help="the template key whose top-1 is compared (default: the bare name)")
    ap.add_argument("--how", default="", help="how the runs were made, kept in the output")
    ap.add_argument("--scores", choices=("scores", "scores_support"), default="scores",
                    help="the paper's zero-shot (default) or support-set zero-shot (clipmodel.support) on both sides")
    args = ap.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_file()]
    if missing:
        raise SystemExit(f"real_seeds: no such file: {missing[0]}")
    runs = [json.loads(p.read_text()) for p in args.runs]
    out = {**summary(runs, [str(p) for p in args.runs], args.template, args.scores), "how": args.how,
           "runs": [{k: r[k] for k in (*SIDES, "total_seconds", "machine") if k in r} for r in runs]}
    write_json(args.out, out)
    for k in out["ratio_of_means"]:
        print(f"{k:17} open_clip {out['top1']['open_clip'][k]}  project {out['top1']['project'][k]}  "
              f"ratio of means {out['ratio_of_means'][k]}x  per seed {out['ratio_per_seed'][k]}"
              + (f"  to open_clip's best {out['ratio_of_means_to_open_clip_best'][k]}x"
                 if args.scores != "scores" else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
