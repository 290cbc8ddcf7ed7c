"""The data-efficiency study (the paper's Figure 2): how many images each objective needs to learn zero-shot.

    python -m pipeline.efficiency train contrastive|bow|decoder|encoder_decoder [--data data]
        [--model models/efficiency/<objective>] [--report reports/efficiency/<objective>.json]
        [--log reports/efficiency/<objective>_log.csv]

The paths shown are the defaults; efficiency/dvc.yaml names them. Checkpoints and partial curves
stay in checkpoints/efficiency/, outside DVC.

Every objective trains with `pipeline.loop.fit` on the same data, image encoder, batch, optimiser,
schedule and budget of images seen; only the model head and loss differ (train.ssl_weight, SLIP's
image self-supervision, is left out: it would help the contrastive objective alone). Zero-shot top-1 on the
test tasks is measured at log-spaced numbers of images seen (from `Objective.on_step`), each point
logged to MLflow with step = images seen; `pipeline.efficiency_report` compares the curves.
Stages in efficiency/dvc.yaml, outside the default `dvc repro`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipmodel.bow import BagOfWords, bow_loss, score_prompts
from clipmodel.captioner import Captioner
from clipmodel.checkpoint import save_safetensors
from clipmodel.data import MEAN, STD, CorpusBatches, Corpus, to_tensor
from clipmodel.io import atomic_path, write_json
from clipmodel.model import CLIP
from clipmodel.tokenizer import encode, load_tokenizer
from clipmodel.zeroshot import class_vectors
from pipeline import tracking
from pipeline.dvcfile import flatten
from clipmodel.evaluation import embed_images
from clipmodel.images import load_image
from pipeline.evaluation_sets import held_out_sets, read_templates, templates_of
from pipeline.tasks import tasks_for
from pipeline.params import EfficiencyParams, EvaluateParams, Params, load_params
from pipeline.loop import Batch, Objective, fit, median_samples_per_s, open_checkpoint
from pipeline.objectives import clip_objective, clip_split
from pipeline.run import color_augment, model_config, prepare, run_fingerprint

OBJECTIVES = ("contrastive", "bow", "decoder", "encoder_decoder")
CHECKPOINTS = Path("checkpoints/efficiency")
EXPERIMENT = "clip-efficiency"


def eval_steps(e: EfficiencyParams, batch_size: int) -> list[int]:
    """Optimiser steps after which zero-shot is measured: log-spaced from first_checkpoint to the budget."""
    total = e.budget_images // batch_size
    first = min(total, max(1, round(e.first_checkpoint / batch_size)))
    return sorted({int(round(s)) for s in np.geomspace(first, total, e.checkpoints)})


def build(objective: str, p: Params, vocab_size: int) -> tuple[nn.Module, Callable[[Batch], torch.Tensor], dict]:
    """The model, its loss on a training batch, and what config.json needs to rebuild it."""
    cfg = dataclasses.replace(model_config(p, vocab_size), ensemble=1)  # objectives compared on one image tower
    if objective == "contrastive":
        model = CLIP(cfg)
        return model, clip_objective(model, p), {"model": cfg.to_dict()}
    if objective == "bow":
        model = BagOfWords(cfg)
        return model, lambda b: bow_loss(model(b["images"]), b["tokens"]), {"model": cfg.to_dict()}
    e = p.efficiency
    cfg = dataclasses.replace(cfg, text_width=e.decoder_width, text_layers=e.decoder_layers, text_heads=e.decoder_heads)
    layers = e.encoder_layers if objective == "encoder_decoder" else 0
    model = Captioner(cfg, layers)
    return model, lambda b: model.loss(b["images"], b["tokens"]), {"model": cfg.to_dict(), "encoder_layers": layers}


@dataclass
class Probe:
    """One zero-shot task on a fixed sample of test images, its prompts tokenized once."""
    name: str
    images: torch.Tensor    # [N, 3, S, S] normalised
    targets: torch.Tensor   # [N] class index
    texts: list[str]        # class texts
    templates: list[str]
    prompts: torch.Tensor   # [classes * templates, ctx] ids, class-major like class_vectors


def probes(p: Params, corpus: Corpus, tok, device: torch.device) -> list[Probe]:
    """efficiency.tasks as probes: synthetic tasks on the test split, or held-out sets of evaluate.datasets
    (a seeded sample of efficiency.eval_images images each). Only the sets a task names are read, so
    a set added for the evaluate stage leaves the study's DVC deps (evaluate.datasets.<task>) alone."""
    e = p.efficiency
    test = corpus.split("test")
    table = read_templates(p.evaluate.templates)
    tasks = {t.name: t for t in tasks_for(p.data, corpus.manifest.labels.to_numpy()[test])}
    named = EvaluateParams(datasets={n: s for n, s in p.evaluate.datasets.items() if n in e.tasks})
    sets = {ds.name: (ds, templates) for ds, templates in held_out_sets(named, table)}
    missing = [name for name in e.tasks if name not in tasks and name not in sets]
    if missing:
        raise SystemExit(f"efficiency: params.yaml efficiency.tasks: {', '.join(missing)} is neither a task with test "
                         f"images on this data nor an evaluate.datasets set (available: "
                         f"{', '.join([*tasks, *p.evaluate.datasets]) or 'none'})")
    out = []
    for name in e.tasks:
        if name in tasks:
            task = tasks[name]
            sel = np.flatnonzero(task.mask)[: e.eval_images]
            images, targets, texts = corpus.images(test[sel]), task.targets[sel], task.texts
            used = templates_of(table, task.templates, f"task {name}")
        else:
            ds, used = sets[name]
            sel = np.sort(np.random.default_rng(p.data.seed).permutation(len(ds.images))[: e.eval_images])
            images, kept, _ = embed_images([ds.images[i] for i in sel], partial(load_image, size=p.data.image_size,
                                           background=p.data.background), np.stack)
            targets, texts = ds.targets()[sel[kept]], ds.classnames
        ids = encode(tok, [t.format(c) for c in texts for t in used])[0]
        out.append(Probe(name, to_tensor(images).to(device), torch.from_numpy(targets).to(device), list(texts), used,
                         torch.from_numpy(ids).long().to(device)))
    return out


def probe_digest(tests: list[Probe]) -> str:
    """16 hex digits of a SHA-256 of what the probes measure: their images, targets, class texts, templates
    and prompt tokens (so a changed template file or held-out set is measured afresh, never resumed)."""
    h = hashlib.sha256()
    for t in tests:
        h.update(json.dumps([t.name, t.texts, t.templates]).encode())
        for x in (t.images, t.targets, t.prompts):
            h.update(x.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def zero_shot_top1(objective: str, model: nn.Module, probe: Probe, tok) -> float:
    """CLIP ensembles prompts in embedding space (as in evaluate); the baselines average each
    class's per-template scores (BoW word log-probabilities, captioner log-likelihoods)."""
    x = probe.images
    if objective == "contrastive":
        def encode_text(texts: list[str]) -> np.ndarray:
            return model.encode_text(torch.from_numpy(encode(tok, texts)[0]).long().to(x.device)).float().cpu().numpy()
        classes = torch.from_numpy(class_vectors(encode_text, probe.texts, probe.templates)).to(x.device)
        pred = (F.normalize(model.encode_image(x).float(), dim=-1) @ classes.T).argmax(1)
    else:
        scores = score_prompts(model(x), probe.prompts) if objective == "bow" else model.log_likelihood(x, probe.prompts)
        pred = scores.view(len(x), len(probe.texts), len(probe.templates)).mean(-1).argmax(1)
    return (pred == probe.targets).float().mean().item()


def save_folder(folder: Path, model: nn.Module, objective: str, arch: dict, p: Params, data_fp: str,
                tokenizer: Path = Path("data/tokenizer.json")) -> None:
    """The same files as models/ (weights, config.json, `tokenizer` as tokenizer.json), the folder replaced atomically."""
    weights = "clip.safetensors" if objective == "contrastive" else f"{objective}.safetensors"
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        save_safetensors(model, tmp / weights)
        (tmp / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
        write_json(tmp / "config.json", {
            "objective": objective, "weights": weights, **arch, "tokenizer": "tokenizer.json",
            "preprocess": {"image_size": p.data.image_size, "resize": "shorter_side_bicubic", "crop": "center",
                           "mean": list(MEAN), "std": list(STD), "background": list(p.data.background)},
            "data_fingerprint": data_fp})


def train(objective: str, data_dir: Path, folder: Path, report: Path, log_csv: Path) -> None:
    """The stage for one objective (one of OBJECTIVES) on the corpus in `data_dir`: train to
    efficiency.budget_images images seen, measuring zero-shot top-1 at `eval_steps`, resumable like
    train. Writes the model to `folder` (models/efficiency/<objective>/), the summary and curve to
    `report` (reports/efficiency/<objective>.json), the loss log to `log_csv`
    (reports/efficiency/<objective>_log.csv), one MLflow run.

    Raises: SystemExit (one line) when efficiency.tasks names neither a task with test images nor an
    evaluate.datasets set, for a bad templates file or held-out set, or when `fit` stops (see there).
    """
    p = load_params()
    p = p.model_copy(update={"train": p.train.model_copy(update={"ssl_weight": 0.0})})  # each objective alone (Figure 2)
    e, bs = p.efficiency, p.train.batch_size
    device, corpus = prepare(p, data_dir)
    tok = load_tokenizer(data_dir / "tokenizer.json")
    model, loss, arch = build(objective, p, tok.get_vocab_size())
    model.to(device)
    data = CorpusBatches(corpus, corpus.split("train"), bs, p.train.seed, p.train.crop_scale,
                         p.train.crop_ratio, color_augment(p.train))
    total, steps = e.budget_images // bs, set(eval_steps(e, bs))
    tests = probes(p, corpus, tok, device)

    data_fp = tracking.data_fingerprint([data_dir / "manifest.parquet", data_dir / "tokens.npy"])
    # the curve's points are measured while training: a resumed run must also measure what they measured
    fingerprint = run_fingerprint(p, f"{data_fp} {probe_digest(tests)}", f"efficiency-{objective}", e)
    checkpoint, curve_file = CHECKPOINTS / f"{objective}.pt", CHECKPOINTS / f"{objective}_curve.json"
    state = open_checkpoint(checkpoint, fingerprint, p.train.resume)
    curve = []  # points past the checkpoint being resumed are measured again
    if state is not None and curve_file.exists():
        curve = [pt for pt in json.loads(curve_file.read_text()) if pt["step"] <= state["step"]]
    run_id = tracking.start_run(EXPERIMENT, state and state["run_id"],
                                {**tracking.pipeline_tags(data_fp), "study": "efficiency", "objective": objective},
                                run_file=None, run_name=f"efficiency-{objective}")
    log = tracking.step_logger(run_id)
    if state is None or run_id != state["run_id"]:  # a new run, or the checkpoint's is not in the store
        tracking.mlflow.log_params({**flatten({"efficiency": e.model_dump(), "train": p.train.model_dump()}),
                                    **flatten(arch), "objective": objective, "total_steps": total,
                                    "parameters": sum(x.numel() for x in model.parameters())})

    # Each point records the run's seconds so far, so a resumed run's wall_s and eval_s go on from its
    # last point (time after that point, before the stop, is not counted) instead of timing only its last leg.
    last = curve[-1] if curve else {}
    started, eval_s = time.perf_counter() - last.get("wall_s", 0.0), [last.get("eval_s", 0.0)]

    def on_step(step: int) -> None:
        if step not in steps:
            return
        t0 = time.perf_counter()
        model.eval()
        top1 = {pr.name: zero_shot_top1(objective, model, pr, tok) for pr in tests}
        model.train()
        eval_s[0] += time.perf_counter() - t0
        point = {"step": step, "images_seen": step * bs, "top1": float(np.mean(list(top1.values()))), "tasks": top1,
                 "wall_s": time.perf_counter() - started, "eval_s": eval_s[0]}
        curve.append(point)
        write_json(curve_file, curve)
        log(step * bs, {"zero_shot.mean.top1": point["top1"], **{f"zero_shot.{k}.top1": v for k, v in top1.items()}})
        print(f"efficiency {objective}: {step * bs} images seen, zero-shot top-1 {point['top1']:.3f} {top1}")

    # Contrastive couples the batch: its halves let train.accum_steps accumulate exactly (GradCache), as in
    # train; the other objectives' losses are per-sample means, which plain accumulation keeps exact.
    halves = dict(zip(("features", "loss_from_features"), clip_split(model, p))) if objective == "contrastive" else {}
    obj = Objective(model, loss, after_step=getattr(model, "clamp_logit_scale_", lambda: None), on_step=on_step,
                    checkpoint=checkpoint, log_csv=log_csv, name=f"efficiency {objective}", **halves)
    # Same optimiser and schedule as train, but a warmup as long as the whole budget would never decay.
    schedule = p.train if e.warmup_fraction is None else p.train.model_copy(update={"warmup_fraction": e.warmup_fraction})
    rows = fit(obj, data, schedule, device, total, fingerprint, state, run_id, log=log)
    wall = curve[-1]["wall_s"]  # to the last point, at the budget's end: the same when a finished run is resumed
    model.eval()
    save_folder(folder, model, objective, arch, p, data_fp, data_dir / "tokenizer.json")
    summary = {"objective": objective, "budget_images": total * bs, "batch_size": bs, "steps": total,
               "parameters": sum(x.numel() for x in model.parameters()),
               "train_samples_per_s": median_samples_per_s(rows), "wall_s": wall, "eval_s": eval_s[0],
               "final_loss": rows[-1]["loss"], "run_id": run_id, "curve": curve}
    write_json(report, summary)
    tracking.mlflow.log_metrics({"train_samples_per_s": summary["train_samples_per_s"], "eval_s": eval_s[0]})
    tracking.mlflow.log_artifact(str(folder / "config.json"))
    tracking.mlflow.end_run()
    print(f"efficiency {objective}: done in {wall:.0f} s ({eval_s[0]:.0f} s zero-shot); wrote {folder}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`train <objective>` and the stage's paths: the defaults are the root pipeline's, which
    efficiency/dvc.yaml passes explicitly. Raises: SystemExit with the usage for anything else."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.efficiency", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["train"])
    ap.add_argument("objective", choices=OBJECTIVES)
    ap.add_argument("--data", type=Path, default=Path("data"),
                    help="input: the corpus folder ingest and tokenize wrote (default: data)")
    ap.add_argument("--model", type=Path, help="output: the model folder (default: models/efficiency/<objective>)")
    ap.add_argument("--report", type=Path, help="output: summary and curve (default: reports/efficiency/<objective>.json)")
    ap.add_argument("--log", type=Path, help="output: the loss log (default: reports/efficiency/<objective>_log.csv)")
    args = ap.parse_args(argv)
    args.model = args.model or Path("models/efficiency") / args.objective
    args.report = args.report or Path("reports/efficiency") / f"{args.objective}.json"
    args.log = args.log or Path("reports/efficiency") / f"{args.objective}_log.csv"
    return args


@tracking.ended_on_error()
def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.efficiency train OBJECTIVE`: one objective's run of the study (see `train`)."""
    args = parse_args(argv)
    train(args.objective, args.data, args.model, args.report, args.log)


if __name__ == "__main__":
    main()
