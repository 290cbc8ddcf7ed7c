"""Stage `supervised`: the paper's supervised baseline, measured on the same footing as CLIP.

The same image encoder, trained from scratch with cross-entropy on the shape label of the
single-object training scenes, for the same number of images seen as CLIP's training run, with
the same loop, optimiser, schedule and colour augmentation. Only the crops are its own (params
`supervised`): a shape label survives a crop, a caption that names size and place does not. One
image tower, whatever model.ensemble says (the baseline is one encoder, as in the paper). Its test top-1 on the shape task goes to
reports/supervised.json, which the evaluate stage puts beside zero-shot and the linear probe.

    python -m pipeline.supervised [--data data] [--report reports/supervised.json] [--log reports/supervised_log.csv]

Reads the corpus in --data; writes the report and the loss log (the defaults; dvc.yaml names them).
The resumable checkpoint stays in checkpoints/supervised.pt, outside DVC. Other data has no shape
labels: the report then says `skipped` and the log holds its header alone, since DVC fails a stage
that leaves a declared output unwritten.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipmodel import synthetic
from clipmodel.data import CorpusBatches, Corpus, to_tensor
from clipmodel.io import atomic_path, write_json
from clipmodel.model import vision_tower
from pipeline import tracking
from pipeline.params import load_params
from pipeline.loop import Objective, fit, open_checkpoint
from pipeline.run import color_augment, model_config, prepare, run_fingerprint


class Classifier(nn.Module):
    """The baseline: an image encoder (CLIP's vision tower, `features` outputs) and a linear head over
    `classes` shapes."""

    def __init__(self, visual: nn.Module, features: int, classes: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(features, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised images (`to_tensor`) -> logits [B, classes], unnormalised."""
        return self.head(self.visual(images))


def shape_labels(corpus: Corpus) -> np.ndarray:
    """Shape index of every single-object scene, -1 for the others."""
    lookup = {s: i for i, s in enumerate(synthetic.SHAPES)}
    scenes = [json.loads(s) for s in corpus.manifest.labels]
    return np.array([lookup[s["objects"][0]["shape"]] if s.get("count") == 1 else -1 for s in scenes])


@torch.no_grad()
def accuracy(model: Classifier, corpus: Corpus, index: np.ndarray, labels: np.ndarray, device) -> float:
    """Top-1 (a fraction in [0, 1]; 0 for no images) on corpus images `index` int [N], against
    `labels` indexed by corpus image, 256 images at a time. Leaves the model's mode alone."""
    correct = 0
    for s in range(0, len(index), 256):
        chunk = index[s:s + 256]
        pred = model(to_tensor(corpus.images(chunk)).to(device)).argmax(-1).cpu().numpy()
        correct += int((pred == labels[chunk]).sum())
    return correct / max(1, len(index))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths: the defaults are the root pipeline's, which dvc.yaml passes explicitly."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.supervised", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data"), help="input: the corpus folder ingest and tokenize wrote")
    ap.add_argument("--report", type=Path, default=Path("reports/supervised.json"), help="output: the test top-1")
    ap.add_argument("--log", type=Path, default=Path("reports/supervised_log.csv"), help="output: the loss log")
    return ap.parse_args(argv)


@tracking.ended_on_error()
def main(argv: list[str] | None = None) -> None:
    """Run the stage; on other than synthetic data, write the report with no metrics and a `skipped`
    reason, and an empty loss log."""
    args = parse_args(argv)
    p = load_params()
    if p.data.source != "synthetic":
        with atomic_path(args.log) as tmp:
            tmp.write_text("step,loss\n")
        write_json(args.report, {"metrics": {}, "skipped": "needs the synthetic data's shape labels"})
        print(f"supervised: skipped, data.source {p.data.source} has no shape labels")
        return
    device, corpus = prepare(p, args.data)
    labels = shape_labels(corpus)
    cfg = model_config(p, p.tokenize.vocab_size)  # the vision tower alone: the vocabulary plays no part
    model = Classifier(vision_tower(cfg), cfg.embed_dim, len(synthetic.SHAPES)).to(device)

    single = np.flatnonzero(labels >= 0)
    train, val, test = (np.intersect1d(corpus.split(s), single) for s in ("train", "val", "test"))
    data = CorpusBatches(corpus, train, p.train.batch_size, p.train.seed, p.supervised.crop_scale,
                         p.supervised.crop_ratio, color_augment(p.train))
    steps = p.train.epochs * (len(corpus.split("train")) // p.train.batch_size)  # CLIP's steps: same images seen
    y = torch.from_numpy(labels).to(device)

    obj = Objective(model, lambda b: F.cross_entropy(model(b["images"]), y[b["image_index"]]),
                    validate=lambda: {"val_top1": accuracy(model, corpus, val, labels, device)},
                    checkpoint=Path("checkpoints/supervised.pt"), log_csv=args.log, name="supervised")
    data_fp = tracking.data_fingerprint([args.data / "manifest.parquet"])
    fingerprint = run_fingerprint(p, data_fp, "supervised", p.supervised)
    state = open_checkpoint(obj.checkpoint, fingerprint, p.train.resume)
    fit(obj, data, p.train, device, steps, fingerprint, state, run_id=None)
    model.eval()
    top1 = accuracy(model, corpus, test, labels, device)
    write_json(args.report, {"metrics": {"shape": {"top1": top1}}, "images_seen": steps * p.train.batch_size,
                        "train_images": len(train)})
    print(f"supervised: shape top-1 {top1:.3f} after {steps * p.train.batch_size} images seen "
          f"({len(train)} single-object training images)")


if __name__ == "__main__":
    main()
