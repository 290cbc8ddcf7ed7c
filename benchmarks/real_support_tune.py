"""Choose support-set zero-shot's weight and temperature (clipmodel.support) away from the judges.

The real benchmark's two held-out sets judge the recipe; tuning on them would fit the judge. This
holds out a fifth of the training concepts instead: `split` writes a training CSV without them and a
labelled set of their images (eval_tune.csv, labelled by their names), `real_zero_shot.py` trains the
recipe on the rest, and `grid` scores the held-out concepts zero-shot at every weight and temperature,
the bank built from the training rows the model saw.

A concept is a caption's name up to " (" (the tags) and ":" (a skin tone, a flag's country), so
`waving hand: dark skin tone` goes with `waving hand`: no held-out concept has a variant in training.

    python benchmarks/real_support_tune.py split /tmp/tune [--data ../shared/real-emoji] [--fraction 0.2] [--seed 0]
    python benchmarks/real_zero_shot.py --data /tmp/tune --skip-openclip --template-keys label --keep /tmp/tune-work \
        --out /tmp/tune/run.json
    python benchmarks/real_support_tune.py grid /tmp/tune-work/project/models --data /tmp/tune \
        [--out reports/benchmarks/real_support_tune.json]

Raises SystemExit (one line) when a file is missing or an image does not decode.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clipmodel.encoder import Encoder  # noqa: E402
from clipmodel.evaluation import DEFAULT_TEMPLATES, LabelledSet, embed_images  # noqa: E402
from clipmodel.zeroshot import class_vectors, top_k, unit  # noqa: E402
from clipmodel.io import atomic_path, write_json  # noqa: E402
from clipmodel.support import Support  # noqa: E402

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
TEMPERATURES = (0.005, 0.01, 0.02, 0.05)


def concept(caption: str) -> str:
    """The concept a `name (tag, tag)` caption shows: its name, less any `: variant`."""
    return caption.split(" (")[0].split(":")[0].strip()


def split(data: Path, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training rows without the held-out concepts, the held-out rows as image,label by caption name)."""
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    concepts = train["caption"].map(concept)
    names = sorted(set(concepts))
    held = set(np.random.default_rng(seed).choice(names, size=round(fraction * len(names)), replace=False))
    out = concepts.isin(held)
    return train[~out], pd.DataFrame({"image": train["filepath"][out],
                                      "label": train["caption"][out].str.split(" (", regex=False).str[0].str.strip()})


def embed(enc: Encoder, paths: list[Path]) -> np.ndarray:
    feats, _, rejected = embed_images(paths, enc.load_image, lambda batch: enc.pixels(np.stack(batch)))
    if rejected:
        sys.exit(f"real_support_tune: {rejected[0]['image']}: {rejected[0]['reason']}")
    return unit(feats)


def grid(folder: Path, data: Path) -> dict:
    """Top-1 on eval_tune.csv for every weight (rows) and temperature, bare-name template."""
    enc = Encoder.load(folder)
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    ds = LabelledSet.load(data / "eval_tune.csv")
    images = embed(enc, [data / p for p in train["filepath"]])
    captions = unit(enc.texts(list(train["caption"])))
    feats, targets = embed(enc, ds.images), ds.targets()
    classes = class_vectors(enc.texts, ds.classnames, DEFAULT_TEMPLATES)
    top1 = {}
    for t in TEMPERATURES:
        for w in WEIGHTS:
            support = Support(images, captions, np.arange(len(train)), w, t)
            top1.setdefault(str(t), {})[str(w)] = float((top_k(feats, support.apply(classes), 1)[:, 0] == targets).mean())
    best = max(((t, w) for t in top1 for w in top1[t]), key=lambda tw: top1[tw[0]][tw[1]])
    return {"model": str(folder), "data": str(data), "train_rows": len(train), "images": len(ds.images),
            "classes": len(ds.classnames), "templates": list(DEFAULT_TEMPLATES), "top1": top1,
            "best": {"temperature": float(best[0]), "weight": float(best[1]), "top1": top1[best[0]][best[1]]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="write OUT/train.csv and OUT/eval_tune.csv")
    s.add_argument("out", type=Path)
    s.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "real-emoji")
    s.add_argument("--fraction", type=float, default=0.2, help="of the concepts held out")
    s.add_argument("--seed", type=int, default=0)
    g = sub.add_parser("grid", help="score the held-out concepts at every weight and temperature")
    g.add_argument("models", type=Path, help="the model folder trained on DATA/train.csv")
    g.add_argument("--data", type=Path, required=True, help="the folder `split` wrote")
    g.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "real_support_tune.json")
    args = ap.parse_args()
    needed = [args.data / "train.csv"] + ([args.data / "images"] if args.command == "split" else
                                          [args.data / "eval_tune.csv", args.models / "clip.safetensors"])
    for f in needed:
        if not f.exists():
            sys.exit(f"real_support_tune: {f} not found")
    if args.command == "split":
        train, held = split(args.data, args.fraction, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        link = args.out / "images"
        if not link.exists():
            link.symlink_to((args.data / "images").resolve(), target_is_directory=True)
        for name, frame in (("train.csv", train), ("eval_tune.csv", held)):
            with atomic_path(args.out / name) as tmp:
                frame.to_csv(tmp, index=False)
        print(f"{args.out}: train.csv {len(train)} rows, eval_tune.csv {len(held)} images of "
              f"{held['label'].nunique()} names")
        return
    result = grid(args.models, args.data)
    write_json(args.out, result)
    for t, row in result["top1"].items():
        print(f"temperature {t:>6}: " + "  ".join(f"w {w} {v:.3f}" for w, v in row.items()))
    print(f"best {result['best']}; wrote {args.out}")


if __name__ == "__main__":
    main()
