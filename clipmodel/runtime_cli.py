"""clip-onnx: zero-shot classification, zero-shot accuracy and text-to-image search with an exported model, no torch.

    clip-onnx classify --model models/onnx cat.jpg dog.png --labels "cat,dog" [--templates FILE] [--top 5]
        [--support-weight W]
    clip-onnx classify --model models/onnx cat.jpg --labels-file classes.txt
    clip-onnx zeroshot --model models/onnx test.csv [--labels-file FILE] [--templates FILE] [--json metrics.json]
        [--support-weight W]
    clip-onnx search --model models/onnx --images photos/ "a red circle" [--top 5]
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import numpy as np

from clipmodel import cli_args
from clipmodel.images import ImageError
from clipmodel.runtime import ClipRuntime


def classify(rt: ClipRuntime, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`clip-onnx classify`: print each image's top labels and probabilities.

    Raises: SystemExit, status 2 for bad labels or templates, 1 after the rest for an unreadable image.
    """
    rt.support = cli_args.support_of(args, parser, rt.support, args.model)
    cli_args.classify(args, parser, rt.pre.rgb, lambda batch: rt.embed_pixels(np.stack(batch)), rt.class_embeddings,
                      rt.pre.logit_scale)


def zeroshot(rt: ClipRuntime, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`clip-onnx zeroshot`: `cli_args.zeroshot` with the ONNX encoders.

    Raises: SystemExit for bad templates or a labelled set that cannot be scored.
    """
    cli_args.zeroshot(args, parser, rt.pre.rgb, lambda batch: rt.embed_pixels(np.stack(batch)), rt.encode_texts,
                      cli_args.support_of(args, parser, rt.support, args.model))


def search(rt: ClipRuntime, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`clip-onnx search`: print the best-matching images, cosine similarity first.

    Raises: FileNotFoundError when --images is not a folder; ValueError when it holds no readable image.
    """
    for path, score in rt.search(args.query, args.images, args.top, args.cache):
        print(f"{score:.4f}  {printable(path)}")


def printable(path: Path) -> str:
    """A path as the terminal can show it: bytes that are not UTF-8 as \\xNN (a name is bytes on Linux)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def main(argv: list[str] | None = None) -> None:
    """The `clip-onnx` command (argv: default sys.argv[1:]).

    Raises: SystemExit, status 2 for usage errors (argparse) and 1 with a message for bad input (model
    folder, image, labelled set, search folder).
    """
    parser = argparse.ArgumentParser(prog="clip-onnx", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="models/onnx",
                        help="the exported folder (the export stage's models/onnx; default: %(default)s)")
    common.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: physical cores)")
    top = argparse.ArgumentParser(add_help=False)
    top.add_argument("--top", type=int, default=5, help="results to show (default 5)")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", parents=[common, top], help="top labels for each image")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    cli_args.add_label_args(c)
    c.set_defaults(run=classify)
    z = cli_args.add_zeroshot_command(sub, [common])
    z.set_defaults(run=zeroshot)
    s = sub.add_parser("search", parents=[common, top], help="images in a folder that best match a text")
    s.add_argument("query")
    s.add_argument("--images", required=True, metavar="DIR", help="searched recursively")
    s.add_argument("--cache", metavar="DIR", help="embedding cache folder (default: ~/.cache/clip-onnx)")
    s.set_defaults(run=search)
    args = parser.parse_args(argv)
    parser = sub.choices[args.command]  # usage errors print the subcommand's usage
    if getattr(args, "top", 1) < 1:
        parser.error("--top must be at least 1")
    warnings.formatwarning = lambda message, *_, **__: f"clip-onnx: warning: {message}\n"
    try:
        with cli_args.quiet_broken_pipe():
            args.run(ClipRuntime.load(args.model, args.threads), args, parser)
    except (FileNotFoundError, ImageError, ValueError) as e:
        raise SystemExit(f"clip-onnx: {e}") from None


if __name__ == "__main__":
    main()
