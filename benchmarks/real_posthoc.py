"""What trained models do on the real held-out sets, after the fact: each model's top-1 split by the
images' folder (in real-emoji, the artist: openmoji or fluent), every combination of the models as a
post-hoc ensemble (their cosine similarities averaged, as `model.ensemble` scores its members), and
each with CSLS hubness correction against the training images.

CSLS (Conneau et al. 2018, "Word translation without parallel data", eq. 6) scores an image x and a
class c by 2 cos(x, c) - r(c) - r(x), with r the mean cosine to the k nearest neighbours in the other
modality. r(x) is the same for every class of an image, so only r(c) can change a prediction; it is
taken over the training images (not the evaluated ones), so the correction sees no held-out image.

    python benchmarks/real_zero_shot.py --skip-openclip --keep /tmp/a -S train.seed=0 ...   # models to analyse
    python benchmarks/real_posthoc.py /tmp/a/project/models /tmp/b/project/models [--csls 20]
        [--sizes 1 3] [--data ../shared/real-emoji] [--out reports/benchmarks/real_posthoc.json]

Raises SystemExit (one line) when a model folder or a data file is missing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clipmodel.encoder import Encoder  # noqa: E402
from clipmodel.evaluation import DEFAULT_TEMPLATES, LabelledSet, embed_images  # noqa: E402
from clipmodel.zeroshot import class_vectors, unit  # noqa: E402
from clipmodel.io import atomic_path  # noqa: E402

SETS = ("eval_cross_style", "eval_unseen")


def similarities(folder: Path, data: Path, sets: dict[str, LabelledSet],
                 k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per set: cosine similarities float32 [N, C] of its images to its classes (bare-name template),
    and the same with CSLS against the training images (k neighbours)."""
    enc = Encoder.load(folder)
    pixels = lambda batch: enc.pixels(np.stack(batch))  # noqa: E731
    train = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    reference, _, skipped = embed_images([data / p for p in train["filepath"]], enc.load_image, pixels)
    if skipped:
        print(f"{folder}: {len(skipped)} training images left out of CSLS's reference (first: {skipped[0]})")
    out = {}
    for name, ds in sets.items():
        classes = class_vectors(enc.texts, ds.classnames, DEFAULT_TEMPLATES)
        sims = set_cosines(enc, ds, classes, "real_posthoc")
        out[name] = (sims, csls(sims, classes, unit(reference), k))
    return out


def set_cosines(enc: Encoder, ds: LabelledSet, classes: np.ndarray, tool: str) -> np.ndarray:
    """float32 [images, classes]: cosines of the set's images to unit class vectors [C, D]. Exits
    (one line, naming `tool`) when an image does not decode."""
    feats, _, rejected = embed_images(ds.images, enc.load_image, lambda batch: enc.pixels(np.stack(batch)))
    if rejected:
        sys.exit(f"{tool}: {rejected[0]['image']}: {rejected[0]['reason']}")
    return unit(feats) @ classes.T


def csls(sims: np.ndarray, classes: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """CSLS scores [N, C] from cosines [N, C], less the image-side term (the same for every class of an
    image): 2 cos(x, c) - the mean cosine of class c [C, D] to its k nearest reference images [M, D]."""
    hubness = np.sort(classes @ reference.T, axis=1)[:, -k:].mean(1)
    return 2 * sims - hubness[None]


def summarise(scores: list[tuple[np.ndarray, np.ndarray]], targets: np.ndarray, folder: np.ndarray) -> dict:
    """top-1 of the models' mean cosine and mean CSLS (each [N, C]) against targets [N], and the first
    by image folder [N]."""
    plain, hub = (sum(s[i] for s in scores) / len(scores) for i in (0, 1))
    hit = plain.argmax(1) == targets
    folders = sorted(set(folder.tolist()))
    return {"top1": float(hit.mean()), "top1_csls": float((hub.argmax(1) == targets).mean()),
            "top1_by_folder": {f: float(hit[folder == f].mean()) for f in folders},
            "images_by_folder": {f: int((folder == f).sum()) for f in folders}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", type=Path, help="model folders the train stage wrote")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/real-emoji")
    ap.add_argument("--csls", type=int, default=20, help="neighbours k of CSLS's hubness term")
    ap.add_argument("--out", type=Path, default=ROOT / "reports/benchmarks/real_posthoc.json")
    ap.add_argument("--sizes", type=int, nargs="+", help="numbers of models per combination to score (default: all)")
    args = ap.parse_args()
    for f in [args.data / f"{n}.csv" for n in ("train", *SETS)] + [m / "clip.safetensors" for m in args.models]:
        if not f.is_file():
            sys.exit(f"real_posthoc: {f} not found")
    sets = {name: LabelledSet.load(args.data / f"{name}.csv") for name in SETS}
    sims = {m: similarities(m, args.data, sets, args.csls) for m in args.models}
    rows = []
    for r in args.sizes or range(1, len(args.models) + 1):
        for combo in itertools.combinations(args.models, r):
            row: dict = {"models": [str(m) for m in combo]}
            for name, ds in sets.items():
                folder = np.array([Path(p).parent.name for p in ds.images])
                row[name] = summarise([sims[m][name] for m in combo], ds.targets(), folder)
            rows.append(row)
            print(" + ".join(map(str, combo)), *(f"{n} {row[n]['top1']:.4f} (csls {row[n]['top1_csls']:.4f}) "
                                                   f"{row[n]['top1_by_folder']}" for n in SETS), sep="\n  ")
    result = {"data": str(args.data), "csls_k": args.csls, "templates": list(DEFAULT_TEMPLATES), "results": rows}
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
