"""clip-onnx: zero-shot classification and text-to-image search with an exported model, no torch.

    clip-onnx classify --model models/onnx cat.jpg dog.png --labels "cat,dog" [--templates FILE] [--top 5]
    clip-onnx search --model models/onnx --images photos/ "a red circle" [--top 5]
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from clipmodel.images import ImageError
from clipmodel.runtime import ClipRuntime
from clipmodel.templates import DEFAULT_TEMPLATES, load_templates


def classify(rt: ClipRuntime, args: argparse.Namespace) -> None:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        raise ValueError("--labels needs at least one comma-separated label")
    templates = load_templates(args.templates) if args.templates else DEFAULT_TEMPLATES
    width = max(map(len, labels))
    for image, top in zip(args.images, rt.classify(args.images, labels, templates, args.top)):
        print(image)
        for label, prob in top:
            print(f"  {label:<{width}}  {prob:.4f}")


def search(rt: ClipRuntime, args: argparse.Namespace) -> None:
    for path, score in rt.search(args.query, args.images, args.top, args.cache):
        print(f"{score:.4f}  {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="clip-onnx", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default="models/onnx", help="folder written by `python -m clipmodel.export`")
    common.add_argument("--top", type=int, default=5, help="results to show (default 5)")
    common.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: physical cores)")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", parents=[common], help="top labels for each image")
    c.add_argument("images", nargs="+", metavar="IMAGE")
    c.add_argument("--labels", required=True, help='comma-separated, e.g. "red circle,blue square"')
    c.add_argument("--templates", metavar="FILE", help="prompt templates, one per line with {} for the label")
    c.set_defaults(run=classify)
    s = sub.add_parser("search", parents=[common], help="images in a folder that best match a text")
    s.add_argument("query")
    s.add_argument("--images", required=True, metavar="DIR", help="searched recursively")
    s.add_argument("--cache", metavar="DIR", help="embedding cache folder (default: ~/.cache/clip-onnx)")
    s.set_defaults(run=search)
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be at least 1")
    warnings.formatwarning = lambda message, *_, **__: f"clip-onnx: warning: {message}\n"
    try:
        args.run(ClipRuntime.load(args.model, args.threads), args)
    except (FileNotFoundError, ImageError, ValueError) as e:
        raise SystemExit(f"clip-onnx: {e}") from None


if __name__ == "__main__":
    main()
