"""`clipmodel`: zero-shot classification, embeddings and captions from a trained model folder (torch).

    clipmodel classify --model models/ IMAGE... --labels "red circle,blue square" [--templates FILE] [--top 5]
    clipmodel embed --model models/ --images IMAGE... --out image_emb.npy
    clipmodel embed --model models/ --texts "a red circle" "a blue star" --out text_emb.npy
    clipmodel caption --model models/efficiency/decoder IMAGE... [--beam 4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipmodel.captioner import Captioner
from clipmodel.checkpoint import load_model
from clipmodel.data import to_tensor
from clipmodel.images import ImageError, load_rgb, preprocess
from clipmodel.io import atomic_path
from clipmodel.tokenizer import decode, encode, load_tokenizer
from clipmodel.templates import DEFAULT_TEMPLATES, load_templates
from clipmodel.zeroshot import class_embeddings, classify


def model_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise SystemExit(f"clipmodel: {folder} has no config.json: not a model folder")
    return folder


def load_pixels(paths: list[str], pre: dict) -> torch.Tensor:
    """Images as the model was trained on them: the config's background, size and normalisation."""
    pixels = []
    for path in paths:
        try:
            rgb = load_rgb(path, tuple(pre["background"]))
        except (ImageError, OSError) as e:
            raise SystemExit(f"clipmodel: {path}: {e}") from None
        pixels.append(preprocess(rgb, pre["image_size"]))
    return to_tensor(np.stack(pixels))


def caption(folder: str | Path, paths: list[str], beam: int = 1) -> list[str]:
    """One caption per image from a captioner folder (greedy, or beam search with beam > 1)."""
    model, config = Captioner.load(model_folder(folder))
    tok = load_tokenizer(Path(folder) / config["tokenizer"])
    ids = model.generate(load_pixels(paths, config["preprocess"]), beam=beam)
    return [decode(tok, row) for row in ids.tolist()]


class Encoder:
    """A model folder's encoders with its own preprocessing and tokenizer: L2-normalised outputs."""

    def __init__(self, folder: str | Path, batch_size: int = 64):
        folder = model_folder(folder)
        self.model, config = load_model(folder)
        self.tok = load_tokenizer(folder / config["tokenizer"])
        self.pre = config["preprocess"]
        self.batch_size = batch_size

    @torch.no_grad()
    def images(self, paths: list[str]) -> torch.Tensor:
        x = load_pixels(paths, self.pre)
        return torch.cat([F.normalize(self.model.encode_image(x[s:s + self.batch_size]), dim=-1)
                          for s in range(0, len(x), self.batch_size)])

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        ids = torch.from_numpy(encode(self.tok, texts)[0]).long()
        return torch.cat([F.normalize(self.model.encode_text(ids[s:s + self.batch_size]), dim=-1)
                          for s in range(0, len(ids), self.batch_size)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="clipmodel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="zero-shot top-k labels for each image")
    c.add_argument("--model", required=True)
    c.add_argument("images", nargs="+")
    c.add_argument("--labels", required=True, help="comma-separated class names")
    c.add_argument("--templates", help="file of prompt templates, one per line with {}")
    c.add_argument("--top", type=int, default=5)
    e = sub.add_parser("embed", help="write image or text embeddings to .npy")
    e.add_argument("--model", required=True)
    group = e.add_mutually_exclusive_group(required=True)
    group.add_argument("--images", nargs="+")
    group.add_argument("--texts", nargs="+")
    e.add_argument("--out", required=True)
    k = sub.add_parser("caption", help="write a caption for each image with a captioner folder")
    k.add_argument("--model", required=True)
    k.add_argument("images", nargs="+")
    k.add_argument("--beam", type=int, default=1, help="beam width; 1 is greedy")
    args = parser.parse_args(argv)

    if args.command == "caption":
        if args.beam < 1:
            raise SystemExit("clipmodel: --beam must be >= 1")
        for path, text in zip(args.images, caption(args.model, args.images, args.beam)):
            print(f"{path}\t{text}")
        return
    enc = Encoder(args.model)
    if args.command == "embed":
        emb = enc.images(args.images) if args.images else enc.texts(args.texts)
        with atomic_path(args.out) as tmp:
            np.save(tmp, emb.numpy().astype(np.float32))
        print(f"wrote {args.out}: {tuple(emb.shape)}")
        return
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if not labels:
        raise SystemExit("clipmodel: --labels is empty")
    templates = load_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    classes = class_embeddings(enc.texts, labels, templates)
    top, probs = classify(enc.images(args.images), classes, enc.model.logit_scale.exp().item(), args.top)
    for path, idx, pr in zip(args.images, top.tolist(), probs.tolist()):
        print(path)
        for i, p in zip(idx, pr):
            print(f"  {p:6.1%}  {labels[i]}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
