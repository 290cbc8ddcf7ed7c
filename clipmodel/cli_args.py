"""What `clipmodel` (torch) and `clip-onnx` (onnxruntime) share: label and template arguments and the
`zeroshot` command, so both CLIs parse, score and print identically."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clipmodel.evaluation import DatasetError, LabelledSet, read_lines, score
from clipmodel.images import ImageError
from clipmodel.io import write_json
from clipmodel.support import SUPPORT_FILE, Support, reweighted
from clipmodel.templates import DEFAULT_TEMPLATES, load_templates
from clipmodel.zeroshot import classify as zeroshot_classify


def add_label_args(parser: argparse.ArgumentParser) -> None:
    """Add --labels or --labels-file (one of them required; read by `labels_of`) and --templates."""
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog"')
    labels.add_argument("--labels-file", metavar="FILE", help="one class name per line (names may hold commas)")
    add_templates_arg(parser)
    add_support_arg(parser)


def add_support_arg(parser: argparse.ArgumentParser) -> None:
    """Add --support-weight W (read by `support_of`)."""
    parser.add_argument("--support-weight", type=float, metavar="W",
                        help=f"weight of the model folder's training images in each class vector ({SUPPORT_FILE}, "
                             "clipmodel.support); 0: plain zero-shot (default: the weight the evaluate stage used)")


@contextlib.contextmanager
def quiet_broken_pipe() -> Iterator[None]:
    """A reader that stops early (`| head`) ends the command quietly with status 1 instead of a
    BrokenPipeError traceback (the Python docs' note on SIGPIPE, in the signal module's page)."""
    try:
        yield
        sys.stdout.flush()  # inside: a closed pipe found now is still caught
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's last flush goes nowhere
        raise SystemExit(1) from None


def support_of(args: argparse.Namespace, parser: argparse.ArgumentParser, found: Support | None,
               folder: str | Path) -> Support | None:
    """The support bank to score with: the model folder's (`found`), at --support-weight when given
    (`clipmodel.support.reweighted`).

    Raises: SystemExit (status 2, usage error) for a negative weight, or a positive one when the
    folder has no support file.
    """
    try:
        return reweighted(found, args.support_weight, "--support-weight", folder)
    except ValueError as e:
        parser.error(str(e))


def add_templates_arg(parser: argparse.ArgumentParser) -> None:
    """Add --templates FILE (read by `templates_of`)."""
    parser.add_argument("--templates", metavar="FILE",
                        help=f"prompt templates, one per line with {{}} for the class (default: {list(DEFAULT_TEMPLATES)})")


def labels_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The class names of --labels or --labels-file, blanks dropped.

    Raises: SystemExit (status 2, usage error) for an empty or unreadable list.
    """
    try:
        labels = read_lines(args.labels_file) if args.labels_file else [s.strip() for s in args.labels.split(",")]
    except DatasetError as e:
        parser.error(str(e))
    labels = [s for s in labels if s]
    if not labels:
        parser.error("no class names given")
    return labels


def templates_of(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """--templates FILE, or DEFAULT_TEMPLATES.

    Raises: SystemExit (status 2, usage error) for an unreadable or malformed file.
    """
    if not args.templates:
        return list(DEFAULT_TEMPLATES)
    try:
        return load_templates(args.templates)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        parser.error(f"--templates {args.templates}: {e}")


def print_top(image: object, top: list[tuple[str, float]]) -> None:
    """One image's classification as both CLIs print it: its name, then `probability  label` per line,
    most probable first (probabilities as fractions in [0, 1], like `search`'s scores)."""
    print(image)
    for label, prob in top:
        print(f"  {prob:.4f}  {label}")


def classify(args: argparse.Namespace, parser: argparse.ArgumentParser, load_image: Callable[[Path], Any],
             embed_batch: Callable[[list[Any]], np.ndarray],
             class_embeddings: Callable[[list[str], list[str]], np.ndarray], logit_scale: float,
             batch_size: int = 256) -> None:
    """`classify` for either CLI: print each readable image's top labels (`print_top`), `batch_size`
    images in memory at a time. An image that cannot be decoded does not stop the others: it is a
    `skipped REASON: PATH` line on stderr, and the command then exits 1, as `ls` does for a missing name.

    `load_image` maps a path to what `embed_batch` takes a list of; `class_embeddings(labels, templates)`
    gives the class vectors (support set included) and `logit_scale` the softmax's scale.

    Raises: SystemExit, status 2 for bad labels or templates, 1 after the rest when an image was skipped.
    """
    labels = labels_of(args, parser)
    classes = class_embeddings(labels, templates_of(args, parser))
    skipped = 0
    for start in range(0, len(args.images), batch_size):
        kept, pixels = [], []
        for path in args.images[start:start + batch_size]:
            try:
                pixels.append(load_image(path))
                kept.append(path)
            except ImageError as e:
                print(f"{parser.prog}: skipped {e.naming(path)}", file=sys.stderr)
                skipped += 1
        if kept:
            top, probs = zeroshot_classify(embed_batch(pixels), classes, logit_scale, args.top)
            for path, idx, pr in zip(kept, top.tolist(), probs.tolist()):
                print_top(path, [(labels[i], p) for i, p in zip(idx, pr)])
    if skipped:
        raise SystemExit(f"{parser.prog}: {skipped} of {len(args.images)} images could not be read (skipped above)")


def add_zeroshot_command(sub: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the `zeroshot` subcommand to `sub` (add_subparsers' result) and return its parser, for the
    CLI to add its own --model."""
    z = sub.add_parser("zeroshot", parents=parents, help="zero-shot accuracy on a labelled set (CSV or ImageFolder)")
    z.add_argument("dataset", metavar="SET", help="CSV with image (or filepath) and label columns, or a folder "
                                                   "with one subfolder of images per class")
    z.add_argument("--classnames", "--labels-file", dest="classnames", metavar="FILE",
                   help="the class list, one per line, names may hold commas; or a .csv/.tsv with columns "
                        "label and name: the name prompted for each label (default: the sorted labels)")
    add_templates_arg(z)
    add_support_arg(z)
    z.add_argument("--json", metavar="OUT", help="also write the metrics, per-class recall and rejections here")
    z.add_argument("--name", help="the set's key in the output, as evaluate.datasets names it (default: the "
                                  "file's stem or the folder's name)")
    return z


def zeroshot(args: argparse.Namespace, parser: argparse.ArgumentParser, load_image: Callable[[Path], Any],
             embed_batch: Callable[[list[Any]], np.ndarray], embed_texts: Callable[[list[str]], np.ndarray],
             support: Support | None) -> dict:
    """Score SET and print its metrics: the same function and output for either CLI's encoders.

    `load_image` maps a path to what `embed_batch` takes a list of; both embedders return [N, D];
    `support` (from `support_of`) joins the class vectors.
    Returns `evaluation.score`'s result; with --json, also writes the metrics there.

    Raises: SystemExit, status 2 for a bad --templates file and 1 with a message for a labelled set
    that cannot be scored (DatasetError).
    """
    templates = templates_of(args, parser)
    try:
        ds = LabelledSet.load(args.dataset, args.classnames, name=args.name)
        result = score(ds, load_image, embed_batch, embed_texts, templates, support=support)
    except DatasetError as e:
        raise SystemExit(f"{parser.prog}: {e}") from None
    for r in result["rejected_images"]:
        print(f"{parser.prog}: skipped {r['image']}: {r['reason']}")
    summary = {k: result[k] for k in ("top1", "top5", "top1_single_template", "top1_without_support",
                                      "mean_per_class_recall", "n", "classes", "templates", "rejected") if k in result}
    print(json.dumps({ds.name: summary}, indent=2))
    if args.json:
        write_json(args.json, {ds.name: {**summary, **{k: result[k] for k in ("per_class_recall", "most_confused",
                                                                               "rejected_images")}}})
    return result
