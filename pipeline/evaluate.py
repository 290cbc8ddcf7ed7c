"""Stage `evaluate`: zero-shot classification on the synthetic tasks and on held-out labelled sets
(`evaluate.datasets`), retrieval and a linear probe on the test split.

    python -m pipeline.evaluate [--model models] [--data data] [--supervised reports/supervised.json]
        [--run reports/run.json] [--metrics reports/metrics.json] [--per-class reports/per_class.json]
        [--plots reports/plots/eval]

Reads the model folder train wrote, the corpus, the supervised baseline's report (when it exists) and
the MLflow run id; writes the metrics (DVC's metrics file; key schema in the README), per-class
results and PNG plots, and logs them into the pipeline's MLflow run. The paths above are the
defaults; dvc.yaml names them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from clipmodel import evaluation
from clipmodel.data import Corpus
from clipmodel.encoder import Encoder
from clipmodel.io import files_sha256, write_json
from clipmodel.retrieval import ranks, summarize
from clipmodel.support import SUPPORT_FILE, WEIGHTS_FILE, Support
from pipeline import plots, tracking
from pipeline.dvcfile import flatten
from pipeline.device import resolve_device
from pipeline.evaluation_sets import held_out_sets, read_templates, templates_of
from pipeline.params import EvaluateParams, load_params
from pipeline.tasks import Task, canonical_scene, tasks_for

def embed_split(enc: Encoder, corpus: Corpus, index: np.ndarray) -> np.ndarray:
    """[N, D] normalised features of corpus images, a batch of pixels in memory at a time."""
    bs = enc.batch_size
    out = [enc.pixels(corpus.images(index[s:s + bs]))
           for s in tqdm(range(0, len(index), bs), desc="embed images", unit="batch", leave=False,
                         disable=not len(index))]
    return np.concatenate(out) if out else np.empty((0, enc.model.cfg.output_dim), np.float32)


def zero_shot(task: Task, features: np.ndarray, embed_texts, templates: list[str],
              support: Support) -> tuple[dict, np.ndarray]:
    """A synthetic task's metrics (clipmodel.evaluation.metrics) and top-5 predictions on the images it covers."""
    return evaluation.zero_shot(features[task.mask], task.targets[task.mask], task.classes, embed_texts, templates,
                                class_texts=task.texts, support=support)


def training_support(enc: Encoder, corpus: Corpus, train: np.ndarray, ev: EvaluateParams, seed: int,
                     weights: Path, features: np.ndarray | None = None) -> Support:
    """clipmodel.support's bank: the train split's images (at most ev.support_images, a seeded sample
    beyond) with every caption ingest kept for them, embedded by `enc`, whose weights file is `weights`.
    `features`: the split's image features when the linear probe has embedded them already."""
    picked = np.arange(len(train))
    if len(train) > ev.support_images:
        picked = np.sort(np.random.default_rng(seed).choice(len(train), ev.support_images, replace=False))
    captions = corpus.manifest.captions.to_numpy()[train[picked]]
    owner = np.repeat(np.arange(len(picked)), [len(c) for c in captions])
    images = features[picked] if features is not None else embed_split(enc, corpus, train[picked])
    return Support(images, enc.texts([c for cs in captions for c in cs]), owner,
                   ev.support_weight, ev.support_temperature, files_sha256([weights]))


def retrieval(image_features: torch.Tensor, text_features: torch.Tensor, image_keys: np.ndarray,
              text_keys: np.ndarray, chunk: int) -> dict[str, dict[str, float]]:
    """Ranks on the features' device: move them to the GPU first to rank a million items there."""
    ik, tk = (torch.from_numpy(k).to(image_features.device) for k in (image_keys, text_keys))
    return {"image_to_text": summarize(ranks(image_features, text_features, ik, tk, chunk)),
            "text_to_image": summarize(ranks(text_features, image_features, tk, ik, chunk))}


def match_keys(corpus: Corpus, index: np.ndarray, caption_id: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys for retrieval hits: a caption's own text, and (synthetic) the scene its image shows.

    Returns the caption rows of the split, image keys [N, max captions + 1] and text keys [C, 2].
    """
    starts, counts = corpus.caption_start[index], corpus.caption_count[index]
    rows = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts)])
    owner = np.repeat(np.arange(len(index)), counts)
    scenes = [canonical_scene(s) for s in corpus.manifest.labels.to_numpy()[index]]
    scene_ids = {s: i for i, s in enumerate(sorted({s for s in scenes if s}))}
    offset = int(caption_id.max()) + 1  # scene keys live above every caption key
    scene_key = np.array([offset + scene_ids[s] if s else -1 for s in scenes], dtype=np.int64)
    image_keys = np.full((len(index), int(counts.max()) + 1), -1, dtype=np.int64)
    for i, (s, c) in enumerate(zip(starts, counts)):
        image_keys[i, :c] = caption_id[s:s + c]
    image_keys[:, -1] = scene_key
    text_keys = np.stack([caption_id[rows], scene_key[owner]], 1)
    return rows, image_keys, text_keys


def linear_probe(task: Task, feats: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                 grid: list[float]) -> dict[str, float] | None:
    """Logistic regression (L-BFGS) on frozen features; C chosen on val, reported on test."""
    xs = {k: feats[k][targets[k] >= 0] for k in feats}
    ys = {k: targets[k][targets[k] >= 0] for k in targets}
    if min(len(v) for v in ys.values()) == 0 or len(np.unique(ys["train"])) < 2:
        return None
    best = max(grid, key=lambda c: LogisticRegression(C=c, max_iter=2000).fit(xs["train"], ys["train"])
               .score(xs["val"], ys["val"]))
    clf = LogisticRegression(C=best, max_iter=2000).fit(xs["train"], ys["train"])
    return {"top1": float(clf.score(xs["test"], ys["test"])), "C": best}


PROBED = ("shape", "color", "size", "position", "count")  # synthetic tasks with a linear probe
SCALARS = ("top1", "top5", "top1_single_template", "top1_without_support", "mean_per_class_recall", "n", "classes",
           "templates", "rejected")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths: the defaults are the root pipeline's, which dvc.yaml passes explicitly."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models"), help="input: the model folder train wrote")
    ap.add_argument("--data", type=Path, default=Path("data"), help="input: the corpus folder ingest and tokenize wrote")
    ap.add_argument("--supervised", type=Path, default=Path("reports/supervised.json"),
                    help="input, read when it exists: the supervised baseline's report")
    ap.add_argument("--run", type=Path, default=Path("reports/run.json"), help="input: the MLflow run id train recorded")
    ap.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"), help="output: the metrics")
    ap.add_argument("--per-class", type=Path, default=Path("reports/per_class.json"),
                    help="output: per-class recall and confusions")
    ap.add_argument("--plots", type=Path, default=Path("reports/plots/eval"), help="output: the plots folder")
    ap.add_argument("--support", type=Path, default=Path("models") / SUPPORT_FILE,
                    help="output: the support bank (clipmodel.support), for the CLIs and export")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the stage. Raises: SystemExit (one line) for a bad templates file or held-out set (before any
    model work), or when there is nothing to evaluate: no test split and no evaluate.datasets."""
    args = parse_args(argv)
    p = load_params()
    ev = p.evaluate
    table = read_templates(ev.templates)
    sets = held_out_sets(ev, table)
    torch.manual_seed(0)
    device = resolve_device(p.train.device)
    enc = Encoder.load(args.model, ev.batch_size, device)
    corpus = Corpus.load(args.data)
    split = {name: corpus.split(name) for name in ("train", "val", "test")}
    test = split["test"]
    labels = corpus.manifest.labels.to_numpy()
    by_split = {name: {t.name: t for t in tasks_for(p.data, labels[idx])} for name, idx in split.items()}
    probed = [name for name in PROBED if all(name in by_split[s] for s in split)]
    # train and val images are embedded only for the linear probe, which needs labels in every split
    feats = {name: embed_split(enc, corpus, idx) for name, idx in split.items() if name == "test" or probed}
    support = training_support(enc, corpus, split["train"], ev, p.data.seed, args.model / WEIGHTS_FILE,
                               feats.get("train"))
    support.save(args.support)
    print(f"evaluate: support bank {args.support}: {len(support.images)} images, {len(support.captions)} captions; "
          f"zero-shot {'at weight ' + str(ev.support_weight) if ev.support_weight else 'without it (weight 0)'}")

    metrics: dict = {"zero_shot": {}, "linear_probe": {}}
    per_class: dict = {}
    plotted: list[plots.Scored] = []
    for task in by_split["test"].values():
        r, top = zero_shot(task, feats["test"], enc.texts, templates_of(table, task.templates, f"task {task.name}"),
                           support)
        metrics["zero_shot"][task.name] = {k: r[k] for k in SCALARS if k in r}
        per_class[task.name] = {"recall": r["per_class_recall"], "most_confused": r["most_confused"]}
        where = test[task.mask]
        plotted.append(plots.Scored(task.name, task.classes, task.targets[task.mask], top, r,
                                    lambda rows, where=where: corpus.images(where[rows])))
        print(f"zero-shot {task.name}: top1 {r['top1']:.3f} (single template {r['top1_single_template']:.3f}, "
              f"n={r['n']})")
    for ds, templates in sets:
        r = evaluation.score(ds, enc.load_image, lambda batch: enc.pixels(np.stack(batch)), enc.texts, templates,
                             ev.batch_size, support=support)
        metrics["zero_shot"][ds.name] = {k: r[k] for k in SCALARS if k in r}
        per_class[ds.name] = {"recall": r["per_class_recall"], "most_confused": r["most_confused"],
                              "rejected_images": r["rejected_images"]}
        kept = r["kept"]
        plotted.append(plots.Scored(ds.name, ds.classnames, ds.targets()[kept], r["predictions"], r,
                                    lambda rows, kept=kept, ds=ds: np.stack([enc.load_image(ds.images[i])
                                                                              for i in kept[rows]])))
        without = f", without support {r['top1_without_support']:.3f}" if "top1_without_support" in r else ""
        print(f"zero-shot {ds.name}: top1 {r['top1']:.3f}, top5 {r.get('top5', float('nan')):.3f} "
              f"(single template {r['top1_single_template']:.3f}{without}, n={r['n']}, {r['classes']} classes, "
              f"{r['rejected']} undecodable image(s){f' listed in {args.per_class}' if r['rejected'] else ''})")

    for name in probed:
        probe = linear_probe(by_split["test"][name], feats, {s: by_split[s][name].targets for s in split},
                             ev.probe_grid)
        if probe:
            metrics["linear_probe"][name] = probe

    text_feats, rows = None, None
    if len(test):
        rows, image_keys, text_keys = match_keys(corpus, test, corpus.caption_ids())
        text_feats = enc.tokens(np.asarray(corpus.tokens[rows]))
        metrics["retrieval"] = retrieval(torch.from_numpy(feats["test"]).to(device),
                                         torch.from_numpy(text_feats).to(device), image_keys, text_keys,
                                         ev.retrieval_chunk)
        print("retrieval:", json.dumps(metrics["retrieval"]))
    else:
        print("evaluate: no test split (data.test_fraction is 0): retrieval and the linear probe are skipped")
    if not metrics["zero_shot"] and "retrieval" not in metrics:
        raise SystemExit("evaluate: nothing to evaluate: no test split and no evaluate.datasets")

    if args.supervised.exists():
        metrics["supervised"] = json.loads(args.supervised.read_text())["metrics"]

    write_json(args.metrics, metrics)
    write_json(args.per_class, per_class)
    figures = plots.evaluation_plots(args.plots, plotted)
    if text_feats is not None:
        figures.append(plots.test_similarity(args.plots / "similarity.png", corpus, test, feats["test"], text_feats, rows))
    with tracking.pipeline_run(flatten(p.model_dump()), args.run):
        tracking.mlflow.log_metrics({k: v for k, v in flatten(metrics).items()
                                     if isinstance(v, (int, float))})
        tracking.mlflow.log_artifact(str(args.metrics))
        tracking.mlflow.log_artifact(str(args.per_class))
        for f in figures:
            tracking.mlflow.log_artifact(str(f), "plots")


if __name__ == "__main__":
    main()
