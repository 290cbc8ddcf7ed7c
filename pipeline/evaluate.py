"""Stage `evaluate`: zero-shot classification, retrieval and a linear probe on the test split.

Writes reports/metrics.json (DVC's metrics file; key schema in the README), PNG plots under
reports/plots/eval/, and logs both into the pipeline's MLflow run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from clipmodel.data import Corpus, to_tensor
from clipmodel.checkpoint import load_model
from clipmodel.io import write_json
from clipmodel.model import CLIP
from clipmodel.retrieval import ranks, summarize
from clipmodel.tokenizer import encode, load_tokenizer, trim_padding
from clipmodel.zeroshot import class_embeddings, classify
from pipeline import plots, tracking
from pipeline.loop import resolve_device
from pipeline.params import Params, load_params
from pipeline.tasks import Task, canonical_scene, csv_tasks, synthetic_tasks

PLOTS = Path("reports/plots/eval")


def _device(model: CLIP) -> torch.device:
    return model.logit_scale.device


@torch.no_grad()
def embed_images(model: CLIP, corpus: Corpus, index: np.ndarray, batch_size: int) -> torch.Tensor:
    """Normalised features on the CPU, computed on the model's device (a GPU embeds a large test set in seconds)."""
    out = [F.normalize(model.encode_image(to_tensor(corpus.images(index[s:s + batch_size])).to(_device(model))),
                       dim=-1).cpu()
           for s in tqdm(range(0, len(index), batch_size), desc="embed images", unit="batch", leave=False)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


@torch.no_grad()
def embed_tokens(model: CLIP, ids: np.ndarray, batch_size: int) -> torch.Tensor:
    """Normalised features on the CPU; each batch trimmed to its longest text (exact, and faster)."""
    out = [F.normalize(model.encode_text(torch.from_numpy(trim_padding(ids[s:s + batch_size])).long()
                                         .to(_device(model))), dim=-1).cpu()
           for s in range(0, len(ids), batch_size)]
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


def text_encoder(model: CLIP, tok, batch_size: int):
    return lambda texts: embed_tokens(model, encode(tok, texts)[0], batch_size)


def zero_shot(task: Task, features: torch.Tensor, encode_text, templates: list[str]) -> dict:
    x, y = features[task.mask], torch.from_numpy(task.targets[task.mask])
    result: dict = {}
    for name, used in (("single_template", templates[:1]), ("ensemble", templates)):
        top, _ = classify(x, class_embeddings(encode_text, task.texts, used), k=5)
        top1 = (top[:, 0] == y).float().mean().item()
        if name == "single_template":
            result["top1_single_template"] = top1
            continue
        result["top1"] = top1
        if len(task.classes) > 5:
            result["top5"] = (top == y[:, None]).any(1).float().mean().item()
        confusion = np.zeros((len(task.classes),) * 2, dtype=np.int64)
        np.add.at(confusion, (y.numpy(), top[:, 0].numpy()), 1)
        result["confusion"] = confusion
        # Only classes with test images: a held-out pair has none in composition_seen, and 0.0 would read as a miss.
        result["per_class"] = {c: float(confusion[i, i] / confusion[i].sum())
                               for i, c in enumerate(task.classes) if confusion[i].sum()}
        result["predictions"] = top[:, :3].numpy()
    result["n"] = int(task.mask.sum())
    return result


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


def linear_probe(task: Task, feats: dict[str, torch.Tensor], targets: dict[str, np.ndarray],
                 grid: list[float]) -> dict[str, float] | None:
    """Logistic regression (L-BFGS) on frozen features; C chosen on val, reported on test."""
    xs = {k: feats[k][targets[k] >= 0].numpy() for k in feats}
    ys = {k: targets[k][targets[k] >= 0] for k in targets}
    if min(len(v) for v in ys.values()) == 0 or len(np.unique(ys["train"])) < 2:
        return None
    best = max(grid, key=lambda c: LogisticRegression(C=c, max_iter=2000).fit(xs["train"], ys["train"])
               .score(xs["val"], ys["val"]))
    clf = LogisticRegression(C=best, max_iter=2000).fit(xs["train"], ys["train"])
    return {"top1": float(clf.score(xs["test"], ys["test"])), "C": best}


def tasks_for(p: Params, corpus: Corpus, index: np.ndarray) -> list[Task]:
    """The zero-shot tasks of a split: built from the synthetic labels, or from a user's labels CSV."""
    if p.data.source == "synthetic":
        return synthetic_tasks(corpus.manifest.labels.to_numpy()[index], p.data.seed, p.data.synthetic.holdout_fraction)
    if p.evaluate.labels_csv:
        return csv_tasks(p.evaluate.labels_csv, corpus.manifest.source.to_numpy()[index], p.evaluate.classnames)
    return []


def main() -> None:
    p = load_params()
    ev = p.evaluate
    torch.manual_seed(0)
    model, _ = load_model("models")
    device = resolve_device(p.train.device)
    model.to(device)
    tok = load_tokenizer("models/tokenizer.json")
    corpus = Corpus.load("data")
    templates: dict[str, list[str]] = yaml.safe_load(Path(ev.templates).read_text())
    encode_text = text_encoder(model, tok, ev.batch_size)
    split = {name: corpus.split(name) for name in ("train", "val", "test")}
    test = split["test"]
    feats = {name: embed_images(model, corpus, idx, ev.batch_size) for name, idx in split.items()}

    metrics: dict = {"zero_shot": {}, "linear_probe": {}}
    per_class: dict = {}
    results = {}
    for task in tasks_for(p, corpus, test):
        r = zero_shot(task, feats["test"], encode_text, templates[task.templates])
        results[task.name] = (task, r)
        metrics["zero_shot"][task.name] = {k: r[k] for k in ("top1", "top5", "top1_single_template") if k in r}
        per_class[task.name] = r["per_class"]
        print(f"zero-shot {task.name}: top1 {r['top1']:.3f} (single template {r['top1_single_template']:.3f}, n={r['n']})")

    by_split = {name: {t.name: t for t in tasks_for(p, corpus, idx)} for name, idx in split.items()}
    for name in ("shape", "color", "size", "position", "count"):
        if all(name in by_split[s] for s in split):
            probe = linear_probe(by_split["test"][name], feats, {s: by_split[s][name].targets for s in split},
                                 ev.probe_grid)
            if probe:
                metrics["linear_probe"][name] = probe

    rows, image_keys, text_keys = match_keys(corpus, test, corpus.caption_ids())
    text_feats = embed_tokens(model, corpus.tokens[rows], ev.batch_size)
    metrics["retrieval"] = retrieval(feats["test"].to(device), text_feats.to(device), image_keys, text_keys,
                                     ev.retrieval_chunk)
    print("retrieval:", json.dumps(metrics["retrieval"]))

    supervised = Path("reports/supervised.json")
    if supervised.exists():
        metrics["supervised"] = json.loads(supervised.read_text())["metrics"]

    write_json("reports/metrics.json", metrics)
    write_json("reports/per_class.json", per_class)
    figures = plots.evaluation_plots(PLOTS, results, corpus, test, feats["test"], text_feats, rows,
                                     tok, model.logit_scale.exp().item())
    with tracking.pipeline_run():
        tracking.mlflow.log_metrics({k: v for k, v in tracking.flatten(metrics).items()
                                     if isinstance(v, (int, float))})
        tracking.mlflow.log_artifact("reports/metrics.json")
        tracking.mlflow.log_artifact("reports/per_class.json")
        for f in figures:
            tracking.mlflow.log_artifact(str(f), "plots")


if __name__ == "__main__":
    main()
