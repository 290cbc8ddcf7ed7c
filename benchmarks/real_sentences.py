"""The real benchmark with sentence captions: the same images, captions written as people write them.

real/params.yaml was chosen on captions of one form, `name (tag, tag)`, and its caption views
(`tokenize.caption_views`) split that form at `(),;`. Photo collections are captioned in sentences
("A grinning face, looking happy."), with the class name somewhere inside, and hidden real sets check
the same capability, so this rewrites each training caption as a sentence and `real_zero_shot.py
--data` runs both trainers on it unchanged:

- train.csv: real-emoji's rows, each caption rewritten from its name and tags by one of eight
  templates (some keep no tag, some put the name last, some start with a capital), chosen by a hash
  of the image's file stem, so a rebuild writes the same file;
- eval_cross_style.csv, eval_unseen.csv: the originals (labels are bare names, as a user's classes).

Paths are relative to OUT, which gets a link `images` to the data's images.

`--span-views K` adds a lever: up to K short spans of each sentence (1 to 4 consecutive words, drawn by
a hash of the sentence) as extra rows of its image, so that the model also trains on text as short as
a label (docs/real-data.md: it did not pay).

    python benchmarks/real_sentences.py OUT [--data ../shared/real-emoji] [--span-views K]
    python benchmarks/real_zero_shot.py --data OUT --epochs 30 --out reports/benchmarks/real_sentences_e30_s0.json

Raises SystemExit (one line) if a file is missing.
"""
from __future__ import annotations

import hashlib
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.real_swap_styles import check_data, read_table, rebuild_parser, write_benchmark  # noqa: E402


def name_and_tags(caption: str) -> tuple[str, list[str]]:
    """`family: man, girl, boy (child, family)` -> ("family: man, girl, boy", ["child", "family"]):
    the tags are the final parenthesis only, since names hold commas and colons of their own."""
    head, sep, tail = caption.strip().rpartition(" (")
    if not sep or not tail.endswith(")"):
        return caption.strip(), []
    return head.strip(), [t.strip() for t in tail[:-1].split(",") if t.strip()]


def listed(words: list[str], last: str) -> str:
    """["a", "b", "c"], "or" -> "a, b or c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def sentence(name: str, tags: list[str], key: str) -> str:
    """One caption in one of eight wordings, picked with the number of tags (1-3) by a hash of `key`."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    form, tags = h % 8, tags[:1 + (h >> 8) % 3]
    capital = name[:1].upper() + name[1:]
    if not tags or form == 0:
        return ["a small drawing of a {}", "A picture of {}.", "an icon showing {}", "{} as a flat emoji"][(h >> 16) % 4].format(name)
    return [f"An emoji of a {name}, looking {listed(tags, 'and')}.",
            f"a {name} icon that means {listed(tags, 'or')}",
            f"{capital}. {', '.join(tags).capitalize()}.",
            f"A cartoon {name}: {listed(tags, 'and')}.",
            f"this is the {name} emoji, used for {listed(tags, 'or')}",
            f"Something {tags[0]}: the {name}.",
            f"a flat illustration of a {name}, {listed(tags, 'and')}"][form - 1]


def spans(caption: str, k: int, longest: int = 4) -> list[str]:
    """Up to `k` distinct runs of 1 to `longest` consecutive words of `caption` (punctuation at a
    word's ends dropped), none equal to the caption; the draw is seeded by the caption's text."""
    words = [w for w in (w.strip(".,:;!?()") for w in caption.split()) if w]
    rng = np.random.default_rng(zlib.crc32(caption.encode()))
    out: list[str] = []
    for _ in range(k if words else 0):
        n = int(rng.integers(1, min(longest, len(words)) + 1))
        start = int(rng.integers(0, len(words) - n + 1))
        span = " ".join(words[start:start + n])
        if span != caption and span not in out:
            out.append(span)
    return out


def sentences(data: Path, span_views: int = 0) -> dict[str, pd.DataFrame]:
    """The three CSVs with train.csv's captions rewritten, image paths relative to `data`; with
    `span_views`, each image's sentence is followed by rows of its `spans`."""
    train = read_table(data, "train.csv")
    train["caption"] = [sentence(*name_and_tags(c), Path(p).stem) for p, c in zip(train["filepath"], train["caption"])]
    if span_views:
        train = pd.DataFrame([(p, v) for p, c in zip(train["filepath"], train["caption"]) for v in [c, *spans(c, span_views)]],
                             columns=["filepath", "caption"])
    return {"train.csv": train, "eval_cross_style.csv": read_table(data, "eval_cross_style.csv"),
            "eval_unseen.csv": read_table(data, "eval_unseen.csv")}


def main() -> None:
    ap = rebuild_parser(__doc__)
    ap.add_argument("--span-views", type=int, default=0, metavar="K", help="K short spans of each sentence as extra rows")
    args = ap.parse_args()
    check_data(args.data, "real_sentences")
    write_benchmark(args.out, args.data, sentences(args.data, args.span_views))


if __name__ == "__main__":
    main()
