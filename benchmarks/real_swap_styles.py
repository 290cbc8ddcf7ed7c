"""The real benchmark with the artists swapped: train on Fluent Emoji, judge on OpenMoji.

The recipe in real/params.yaml was chosen on one training set (OpenMoji artwork, 3,696 captioned
images) and its two judges. Hidden real sets check the same capability, so this builds a second
benchmark from the same files with the roles reversed, and `real_zero_shot.py --data` runs both
trainers on it unchanged:

- train.csv: the Fluent images of `eval_cross_style.csv` (1,319 concepts, one image each), each
  captioned with OpenMoji's caption of the same concept (its CLDR name and tags: the text is the
  concept's, not the artist's). No skin-tone variants: a third as many images, a harder regime.
- eval_cross_style.csv: OpenMoji's images of those concepts, labelled with the Fluent set's label
  (the CLDR name); skin-tone variants are left out, as the Fluent set has none.
- eval_unseen.csv: the original (concepts in neither training set, both artists).

Paths in the written CSVs are relative to OUT, which gets a link `images` to the data's images.

    python benchmarks/real_swap_styles.py OUT [--data ../shared/real-emoji]
    python benchmarks/real_zero_shot.py --data OUT --template-keys label --out reports/benchmarks/real_swap_styles_s0.json

Raises SystemExit (one line) if a file is missing, or if a Fluent image has no OpenMoji twin.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clipmodel.io import atomic_path  # noqa: E402


def swap(data: Path) -> dict[str, pd.DataFrame]:
    """The three CSVs of the swapped benchmark as DataFrames, image paths relative to `data`.

    Both artists' files are named by the emoji's code points, so a Fluent image and OpenMoji's of the
    same concept share a file stem (skin-tone variants have their own code points, and no Fluent twin)."""
    openmoji, fluent, unseen = (read_table(data, n) for n in ("train.csv", "eval_cross_style.csv", "eval_unseen.csv"))
    openmoji.index = [Path(p).stem for p in openmoji["filepath"]]
    fluent.index = [Path(p).stem for p in fluent["image"]]
    missing = fluent.index.difference(openmoji.index)
    if len(missing):
        sys.exit(f"real_swap_styles: {len(missing)} Fluent images have no OpenMoji twin (first: {missing[0]})")
    twins = openmoji.loc[fluent.index]
    return {"train.csv": pd.DataFrame({"filepath": fluent["image"], "caption": twins["caption"]}),
            "eval_cross_style.csv": pd.DataFrame({"image": twins["filepath"], "label": fluent["label"]}),
            "eval_unseen.csv": unseen}


def read_table(data: Path, name: str) -> pd.DataFrame:
    """One of real-emoji's CSVs, every field a string (labels such as `NA` stay text)."""
    return pd.read_csv(data / name, dtype=str, keep_default_na=False)


def check_data(data: Path, prog: str) -> None:
    """Raises SystemExit (one line) when `data` lacks a file of real-emoji that a rebuild reads."""
    for name in ("train.csv", "eval_cross_style.csv", "eval_unseen.csv", "images"):
        if not (data / name).exists():
            sys.exit(f"{prog}: {data / name}: not found")


def write_benchmark(out: Path, data: Path, frames: dict[str, pd.DataFrame]) -> None:
    """The CSVs into `out` (created), each written whole or not at all, beside a link `images` to the
    data's images, so that the CSVs' relative paths resolve."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if not link.exists():
        link.symlink_to((data / "images").resolve(), target_is_directory=True)
    for name, frame in frames.items():
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
        print(f"{out / name}: {len(frame)} rows")


def rebuild_parser(doc: str) -> argparse.ArgumentParser:
    """The command line every benchmark rebuilt from real-emoji shares: OUT, and --data (the source)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="a folder for the CSVs (created)")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "real-emoji")
    return ap


def main() -> None:
    args = rebuild_parser(__doc__).parse_args()
    check_data(args.data, "real_swap_styles")
    write_benchmark(args.out, args.data, swap(args.data))


if __name__ == "__main__":
    main()
