"""Stage `efficiency_report` of the data-efficiency study (the paper's Figure 2): how many images each
objective needed to reach the target zero-shot accuracy, and the ratios between them.

    python -m pipeline.efficiency_report [--curves reports/efficiency/{contrastive,bow,decoder,encoder_decoder}.json]
        [--metrics reports/efficiency.json] [--plot reports/plots/efficiency.png]

Reads the curves `pipeline.efficiency train` wrote (one file per objective, named after it); writes
the comparison --metrics and its plot --plot, and logs both to the study's MLflow experiment. The
paths shown are the defaults; efficiency/dvc.yaml names them.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from clipmodel.io import write_json
from pipeline import tracking
from pipeline.params import load_params
from pipeline.plots import efficiency_curves

CAPTIONERS = ("decoder", "encoder_decoder")
PAPER = {"contrastive_vs_bow": 4.0, "bow_vs_captioning": 3.0}  # CLIP paper, Figure 2


def images_to_reach(curve: list[dict], target: float) -> float | None:
    """Images seen when the accuracy first reaches `target`, interpolated linearly in log(images)
    between the two checkpoints around the crossing; None if it never does within the budget."""
    for before, after in zip([None, *curve], curve):
        if after["top1"] >= target:
            if before is None:
                return float(after["images_seen"])  # at or before the first checkpoint
            f = (target - before["top1"]) / (after["top1"] - before["top1"])
            return math.exp(math.log(before["images_seen"]) + f * math.log(after["images_seen"] / before["images_seen"]))
    return None


OBJECTIVES = ("contrastive", "bow", "decoder", "encoder_decoder")  # pipeline.efficiency's, not imported: stages stay apart


def captioning_model(reach: dict[str, float | None], final_top1: dict[str, float]) -> str:
    """Which of our two captioners stands for the paper's one captioning model: the faster to the
    target (images seen, None for never); when neither gets there, the one with the higher final top-1.
    CAPTIONERS' order breaks a tie, so the choice never depends on set order."""
    return min((o for o in CAPTIONERS if o in reach),
               key=lambda o: (math.inf if reach[o] is None else reach[o], -final_top1[o]))


def compare(reach: dict[str, float | None], final: dict[str, float], budget: float) -> tuple[str, dict, dict]:
    """The paper's two ratios from the images each objective needed to reach the target (None: not
    within `budget` images) and their final top-1. Returns the captioner standing for captioning, each
    ratio (None where it has no value) and, where only the slower objective never got there, its lower
    bound (budget / the faster one's images)."""
    captioning = captioning_model(reach, final)
    ratios, bounds = {}, {}
    for key, slow, fast in (("contrastive_vs_bow", "bow", "contrastive"), ("bow_vs_captioning", captioning, "bow")):
        ratios[key] = reach[slow] / reach[fast] if reach[fast] is not None and reach[slow] is not None else None
        if reach[fast] is not None and reach[slow] is None:
            bounds[key] = budget / reach[fast]
    return captioning, ratios, bounds


def report(files: list[Path], metrics: Path, plot_file: Path) -> None:
    """Compare the objectives' curves (reports/efficiency/<objective>.json, one per file) at the target;
    write the comparison to `metrics` and its plot to `plot_file`."""
    missing = [str(f) for f in files if not f.exists()]
    names = {f.stem for f in files}
    if missing or not {"contrastive", "bow"} <= names or not names & set(CAPTIONERS):
        raise SystemExit(f"efficiency: need the results of contrastive, bow and a captioner; got {sorted(names)}"
                         f"{', missing ' + ', '.join(missing) if missing else ''}: "
                         "run `python -m pipeline.efficiency train <objective>` first")
    results = {f.stem: json.loads(f.read_text()) for f in files}
    target_accuracy = load_params().efficiency.target_accuracy
    target = target_accuracy or 0.5 * results["contrastive"]["curve"][-1]["top1"]
    reach = {o: images_to_reach(r["curve"], target) for o, r in results.items()}
    budget = max(r["budget_images"] for r in results.values())
    final = {o: r["curve"][-1]["top1"] for o, r in results.items()}
    captioning, ratios, bounds = compare(reach, final, budget)
    out = {
        "target_accuracy": target,
        "target_rule": "efficiency.target_accuracy" if target_accuracy else "half the contrastive final top-1",
        "tasks": list(results["contrastive"]["curve"][0]["tasks"]), "budget_images": budget, "images_to_target": reach,
        "ratios": ratios, "ratios_at_least": bounds,
        "captioning": captioning, "paper_ratios": PAPER,
        "final_top1": final,
        "wall_s": {o: r["wall_s"] for o, r in results.items()},
        "curves": {o: {"images_seen": [pt["images_seen"] for pt in r["curve"]],
                       "top1": [pt["top1"] for pt in r["curve"]],
                       "tasks": {t: [pt["tasks"][t] for pt in r["curve"]] for t in r["curve"][0]["tasks"]}}
                   for o, r in results.items()},
    }
    write_json(metrics, out)
    plot = efficiency_curves(plot_file,
                             {o: (c["images_seen"], c["top1"]) for o, c in out["curves"].items()}, target)
    experiment = tracking.mlflow.get_run(results["contrastive"]["run_id"]).info.experiment_id  # the study's
    with tracking.mlflow.start_run(experiment_id=experiment, run_name="efficiency-report",
                                   tags={"study": "efficiency", "git_commit": tracking.git_commit()}):
        tracking.mlflow.log_metrics({"target_accuracy": target,
                                     **{f"ratio.{k}": v for k, v in ratios.items() if v is not None},
                                     **{f"images_to_target.{o}": v for o, v in reach.items() if v is not None}})
        tracking.mlflow.log_artifact(str(metrics))
        tracking.mlflow.log_artifact(str(plot), "plots")
    print(f"efficiency: target {target:.3f}; images to reach it {reach}; ratios {ratios} (paper {PAPER})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths: the defaults are the root pipeline's, which efficiency/dvc.yaml passes explicitly."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.efficiency_report", description=__doc__.split("\n")[0])
    ap.add_argument("--curves", nargs="+", type=Path, default=[Path(f"reports/efficiency/{o}.json") for o in OBJECTIVES],
                    help="inputs: the objectives' results, <objective>.json each (default: "
                         "reports/efficiency/<objective>.json for contrastive, bow, decoder and encoder_decoder)")
    ap.add_argument("--metrics", type=Path, default=Path("reports/efficiency.json"),
                    help="output: the comparison (default: reports/efficiency.json)")
    ap.add_argument("--plot", type=Path, default=Path("reports/plots/efficiency.png"),
                    help="output: its plot (default: reports/plots/efficiency.png)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: the objectives' curves -> the ratios (metrics) and the plot (see `report`)."""
    args = parse_args(argv)
    report(args.curves, args.metrics, args.plot)


if __name__ == "__main__":
    main()
