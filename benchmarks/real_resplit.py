"""The real benchmark with another draw of unseen concepts: a third judge built from the same files.

real/params.yaml was chosen against one split of the concepts (its support-set settings on a held-out
fifth of the training concepts). Hidden real sets check the same capability, so this draws a new
split from the training concepts by a salted hash, and `real_zero_shot.py --data` runs both trainers
on it unchanged:

- train.csv: the OpenMoji rows of the concepts kept (skin-tone variants go with their base concept);
- eval_unseen.csv: the concepts drawn out (`--fraction` of those with a Fluent image), both artists,
  labelled with the Fluent set's label (the CLDR name); no skin-tone variants, as the original sets;
- eval_cross_style.csv: the Fluent images of the concepts kept;
- eval_unseen_original.csv: the original unseen set (concepts in no training set of either split).

A concept is an image's code points without the skin-tone modifiers (U+1F3FB..U+1F3FF), the file
stem both artists name their images by. Paths are relative to OUT, which gets a link `images` to the
data's images.

    python benchmarks/real_resplit.py OUT [--data ../shared/real-emoji] [--fraction 0.25] [--salt 1]
    python benchmarks/real_zero_shot.py --data OUT --template-keys label --out reports/benchmarks/real_resplit_s0.json

Raises SystemExit (one line) if a file is missing or the draw leaves a side empty.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.real_swap_styles import check_data, read_table, rebuild_parser, write_benchmark  # noqa: E402

SKIN_TONES = {f"1F3F{c}" for c in "BCDEF"}


def concept(path: str) -> str:
    """`images/openmoji/1F44B-1F3FB.png` -> `1F44B`: the code points without skin-tone modifiers."""
    return "-".join(p for p in Path(path).stem.upper().split("-") if p not in SKIN_TONES)


def drawn(name: str, fraction: float, salt: int) -> bool:
    """Whether a concept goes to the unseen side: a salted hash, so a draw never depends on row order."""
    digest = hashlib.blake2b(f"{salt}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def resplit(data: Path, fraction: float, salt: int) -> dict[str, pd.DataFrame]:
    """The four CSVs of the new split as DataFrames, image paths relative to `data`."""
    openmoji, fluent = read_table(data, "train.csv"), read_table(data, "eval_cross_style.csv")
    openmoji["concept"] = openmoji["filepath"].map(concept)
    fluent["concept"] = fluent["image"].map(concept)
    unseen = {c for c in fluent["concept"] if drawn(c, fraction, salt)}
    if not unseen or unseen == set(fluent["concept"]):
        sys.exit(f"real_resplit: --fraction {fraction} with --salt {salt} leaves a side empty")
    base = openmoji[openmoji["filepath"].map(lambda p: Path(p).stem.upper()) == openmoji["concept"]]
    label = dict(zip(fluent["concept"], fluent["label"]))
    held = base[base["concept"].isin(unseen)]
    eval_unseen = pd.concat([pd.DataFrame({"image": held["filepath"], "label": held["concept"].map(label)}),
                             fluent.loc[fluent["concept"].isin(unseen), ["image", "label"]]], ignore_index=True)
    return {"train.csv": openmoji.loc[~openmoji["concept"].isin(unseen), ["filepath", "caption"]],
            "eval_cross_style.csv": fluent.loc[~fluent["concept"].isin(unseen), ["image", "label"]],
            "eval_unseen.csv": eval_unseen,
            "eval_unseen_original.csv": read_table(data, "eval_unseen.csv")}


def main() -> None:
    ap = rebuild_parser(__doc__)
    ap.add_argument("--fraction", type=float, default=0.25, help="of the concepts with a Fluent image, drawn out")
    ap.add_argument("--salt", type=int, default=1)
    args = ap.parse_args()
    check_data(args.data, "real_resplit")
    write_benchmark(args.out, args.data, resplit(args.data, args.fraction, args.salt))


if __name__ == "__main__":
    main()
