"""`clipmodel`: zero-shot classification, embeddings and captions from a trained model folder (torch).

    clipmodel classify --model models/ IMAGE... --labels "red circle,blue square" [--templates FILE] [--top 5]
        [--support-weight W]
    clipmodel classify --model models/ IMAGE... --labels-file classes.txt
    clipmodel zeroshot --model models/ test.csv [--labels-file FILE] [--templates FILE] [--json metrics.json]
        [--support-weight W]
    clipmodel embed --model models/ --images IMAGE... --out image_emb.npy
    clipmodel embed --model models/ --texts "a red circle" "a blue star" --out text_emb.npy
    clipmodel caption --model models/efficiency/decoder IMAGE... [--beam 4]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

try:
    import torch
except ModuleNotFoundError as e:  # the core install, without the train extra: clip-onnx is its CLI
    raise SystemExit("clipmodel needs torch, which the train extra installs (pip install 'clip-pipeline[train]'); "
                     "clip-onnx runs exported models without it") from e

from clipmodel import cli_args
from clipmodel.captioner import Captioner
from clipmodel.data import to_tensor
from clipmodel.encoder import Encoder
from clipmodel.images import ImageError, load_image
from clipmodel.io import atomic_path
from clipmodel.tokenizer import decode, load_tokenizer


def model_folder(folder: str | Path) -> Path:
    """`folder` as a Path, checked to hold a config.json.

    Raises: SystemExit (a one-line message, status 1) when it does not.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"clipmodel: model folder {folder} not found")
    if not (folder / "config.json").exists():
        raise SystemExit(f"clipmodel: {folder} has no config.json: not a model folder")
    return folder


def load_pixels(paths: list[str], pre: dict) -> torch.Tensor:
    """float32 [N, 3, S, S] (S = pre["image_size"] pixels): images as the model was trained on them,
    with the config's background, size and normalisation.

    Raises: SystemExit naming the first image that cannot be read or decoded.
    """
    pixels = []
    for path in paths:
        try:
            pixels.append(load_image(path, pre["image_size"], tuple(pre["background"])))
        except (ImageError, OSError) as e:
            raise SystemExit(f"clipmodel: {path}: {e}") from None
    return to_tensor(np.stack(pixels))


def caption(folder: str | Path, paths: list[str], beam: int = 1) -> list[str]:
    """One caption per image from a captioner folder (greedy, or beam search with beam > 1).

    Raises: SystemExit for a folder that is not a captioner's or an image that cannot be decoded.
    """
    model, config = Captioner.load(model_folder(folder))
    tok = load_tokenizer(Path(folder) / config["tokenizer"])
    ids = model.generate(load_pixels(paths, config["preprocess"]), beam=beam)
    return [decode(tok, row) for row in ids.tolist()]


def main(argv: list[str] | None = None) -> None:
    """The `clipmodel` command (argv: default sys.argv[1:]).

    Raises: SystemExit, status 2 for usage errors (argparse) and 1 with a message for a bad model
    folder, image or labelled set.
    """
    parser = argparse.ArgumentParser(prog="clipmodel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="zero-shot top-k labels for each image")
    c.add_argument("--model", required=True)
    c.add_argument("images", nargs="+")
    cli_args.add_label_args(c)
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
    z = cli_args.add_zeroshot_command(sub, [])
    z.add_argument("--model", required=True)
    args = parser.parse_args(argv)
    parser = sub.choices[args.command]  # usage errors print the subcommand's usage
    if getattr(args, "top", 1) < 1:
        parser.error("--top must be at least 1")
    if args.command == "embed" and not args.out.endswith(".npy"):
        parser.error("--out must name a .npy file")

    if args.command == "caption":
        if args.beam < 1:
            raise SystemExit("clipmodel: --beam must be >= 1")
        with cli_args.quiet_broken_pipe():
            for path, text in zip(args.images, caption(args.model, args.images, args.beam)):
                print(f"{path}\t{text}")
        return
    enc = Encoder.load(model_folder(args.model), batch_size=64)
    try:
        with cli_args.quiet_broken_pipe():
            run(args, parser, enc)
    except ImageError as e:
        raise SystemExit(f"clipmodel: {e}") from None


def run(args: argparse.Namespace, parser: argparse.ArgumentParser, enc: Encoder) -> None:
    """The zeroshot, embed and classify commands with a loaded encoder; `embed` writes float32 [N, D].

    Raises: ImageError for an image that cannot be decoded (main turns it into SystemExit);
    SystemExit for usage errors and unreadable labelled sets.
    """
    if args.command in ("zeroshot", "classify"):
        enc.support = cli_args.support_of(args, parser, enc.support, args.model)
    if args.command == "zeroshot":
        cli_args.zeroshot(args, parser, enc.load_image, lambda batch: enc.pixels(np.stack(batch)), enc.texts,
                          enc.support)
        return
    if args.command == "embed":
        emb = enc.images(args.images) if args.images else enc.texts(args.texts)
        with atomic_path(args.out) as tmp:
            np.save(tmp, emb.astype(np.float32))
        print(f"wrote {args.out}: {tuple(emb.shape)}")
        return
    cli_args.classify(args, parser, enc.load_image, lambda batch: enc.pixels(np.stack(batch)), enc.class_embeddings,
                      enc.logit_scale)


if __name__ == "__main__":
    main()
