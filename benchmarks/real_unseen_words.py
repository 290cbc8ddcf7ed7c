"""Where the real benchmark's unseen concepts fail: top-1 split by whether a label's words were ever
in a training caption.

A class whose every word occurs in some training caption can be named by composition ("woman
juggling" from "woman" and "juggling"); one with a word no caption has ("pretzel") can only be
reached through shared subwords. Splitting the recall of `zero_shot.unseen` that way bounds what
any training recipe on these captions can reach. Words are lower-cased runs of letters, digits and
apostrophes (any script), as the tokenizer's normaliser lower-cases. It also counts the label words
that GPT-2's byte-level split (this project's before 2026-12-04) spells as no training caption does,
and the labels whose novel words are two caption words run together ("sunflower"). With --model, it
also scores that model on the set and describes its errors on the labels of seen words.

    python benchmarks/real_unseen_words.py [--data ../shared/real-emoji] [--per-class real/reports/per_class.json]
        [--model real/models] [--out reports/benchmarks/real_unseen_words.json]

Raises SystemExit (one line) when a file is missing or unreadable, a label of the set has no recall
in per_class, or the model cannot decode an image of the set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tokenizers import pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clipmodel.evaluation import DatasetError, LabelledSet  # noqa: E402
from clipmodel.io import atomic_path  # noqa: E402
from clipmodel.tokenizer import _normalizer  # noqa: E402 - the tokenizer's own, not a copy

WORD = re.compile(r"[\w']+")


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def caption_words(captions: list[str]) -> set[str]:
    """Every word of every caption: what a label's words are checked against."""
    return set().union(*map(words, captions))


def split_by_novel_words(captions: list[str], labels: pd.Series, recall: dict[str, float]) -> dict:
    """Per group (labels with every word seen in `captions`, labels with a novel word): classes,
    images, mean per-class recall and top-1 over images (recall weighted by each class's images)."""
    seen = caption_words(captions)
    images = labels.value_counts()
    missing = sorted(set(images.index) - set(recall))
    if missing:
        raise SystemExit(f"per_class recall lacks {len(missing)} labels of the set, e.g. {missing[0]!r}")
    groups: dict[str, dict] = {}
    for name, keep in (("all_words_seen", lambda w: w <= seen), ("novel_word", lambda w: not w <= seen)):
        cls = [c for c in images.index if keep(words(c))]
        n = int(images[cls].sum())
        groups[name] = {"classes": len(cls), "images": n,
                        "mean_per_class_recall": sum(recall[c] for c in cls) / max(len(cls), 1),
                        "top1": sum(recall[c] * images[c] for c in cls) / max(n, 1)}
    groups["novel_word"]["examples"] = sorted(
        {w for c in images.index for w in words(c) - seen})[:30]
    return groups


def compound_labels(captions: list[str], labels: pd.Series, part: int = 3) -> dict:
    """The labels whose every novel word is two caption words run together, each at least `part`
    letters ("sunflower" from "sun" and "flower"): what captions spelling out compound names could
    reach at most. Classes, images and the labels themselves."""
    seen = caption_words(captions)

    def compound(w: str) -> bool:
        return any(w[:i] in seen and w[i:] in seen for i in range(part, len(w) - part + 1))
    images = labels.value_counts()
    cls = sorted(c for c in images.index if (novel := words(c) - seen) and all(map(compound, novel)))
    return {"classes": len(cls), "images": int(images[cls].sum()), "labels": cls}


def gpt2_split_forms(captions: list[str], labels: list[str]) -> dict[str, int]:
    """How the labels' words fare under GPT-2's byte-level split, which this project's tokenizer used
    before it split words apart: a word carries its leading space there, so "cake" at the start of a
    label or after "(" is another pre-token than " cake" after a space. Counts the label pre-tokens
    with a letter whose form some caption has, those whose only the other form (with or without the
    space) some caption has, and those no caption has in either form."""
    split, normalizer = pre_tokenizers.ByteLevel(add_prefix_space=False), _normalizer()

    def pieces(text: str) -> list[str]:
        return [p for p, _ in split.pre_tokenize_str(normalizer.normalize_str(text))]
    trained = {p for c in captions for p in pieces(c)}
    counts = {"form_trained": 0, "only_other_form_trained": 0, "not_trained": 0}
    for label in labels:
        for p in pieces(label):
            if not any(ch.isalpha() for ch in p):
                continue
            other = p[1:] if p.startswith("Ġ") else "Ġ" + p  # Ġ: the byte-level space
            counts["form_trained" if p in trained else
                   "only_other_form_trained" if other in trained else "not_trained"] += 1
    return counts


def model_similarities(model: Path, ds: LabelledSet) -> np.ndarray:
    """float32 [images, classes]: a model folder's cosine similarities on the set, bare-name prompts."""
    from benchmarks.real_posthoc import set_cosines
    from clipmodel.encoder import Encoder
    from clipmodel.zeroshot import class_vectors

    enc = Encoder.load(model)
    return set_cosines(enc, ds, class_vectors(enc.texts, ds.classnames, ["{}"]), "real_unseen_words")


def seen_word_errors(sims: np.ndarray, targets: np.ndarray, classnames: list[str], folders: list[str],
                     captions: list[str]) -> dict:
    """What a model gets wrong on the images whose label has every word in some caption: top-1 by
    folder (in real-emoji, the artist), how far down its ranking the true class sits, and how many
    errors name a class that shares a word with the truth (a near miss between compositions, `man
    juggling` for `woman juggling`) rather than an unrelated one. `sims` float [N, C], `targets` int [N]."""
    rank = (sims > sims[np.arange(len(targets)), targets][:, None]).sum(1)  # 0: top-1
    vocab = caption_words(captions)
    class_words = [words(c) for c in classnames]
    seen = np.array([class_words[t] <= vocab for t in targets])
    wrong = seen & (rank > 0)
    shares = np.array([bool(class_words[p] & class_words[t]) for p, t in zip(sims.argmax(1), targets)])
    folder = np.array(folders)
    return {"images": int(seen.sum()), "top1": float((rank[seen] == 0).mean()), "top5": float((rank[seen] < 5).mean()),
            "top1_by_folder": {f: {"images": int((seen & (folder == f)).sum()),
                                   "top1": float((rank[seen & (folder == f)] == 0).mean())}
                               for f in sorted(set(folder[seen]))},
            "errors": int(wrong.sum()), "median_rank_of_truth_in_errors": float(np.median(rank[wrong]) + 1),
            "errors_sharing_a_word_with_the_truth": int((wrong & shares).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared/real-emoji"))
    ap.add_argument("--per-class", default=str(ROOT / "real/reports/per_class.json"))
    ap.add_argument("--set", default="unseen", help="the set's key in per_class.json; its CSV is eval_<set>.csv")
    ap.add_argument("--model", type=Path, help="a model folder (the train stage's models/): adds its errors on "
                    "the labels of seen words (seen_word_errors)")
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks/real_unseen_words.json"))
    args = ap.parse_args()
    data = Path(args.data)
    for f in (data / "train.csv", Path(args.per_class), *([args.model / "config.json"] if args.model else [])):
        if not f.is_file():
            sys.exit(f"real_unseen_words: {f} not found")
    captions = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)["caption"].tolist()
    try:  # the evaluate stage's reader: image or filepath column, labels kept as strings
        ds = LabelledSet.load(data / f"eval_{args.set}.csv")
    except DatasetError as e:
        sys.exit(f"real_unseen_words: {e}")
    labels = pd.Series(ds.labels)
    recall = json.loads(Path(args.per_class).read_text())[args.set]["recall"]
    source = os.path.relpath(Path(args.per_class).resolve(), ROOT)  # the report names it from the repo root
    result = {"set": args.set, "per_class": source, **split_by_novel_words(captions, labels, recall),
              "novel_words_compound_of_caption_words": compound_labels(captions, labels),
              "gpt2_split_label_words": gpt2_split_forms(captions, sorted(set(labels)))}
    if args.model:
        sims = model_similarities(args.model, ds)
        folders = [p.parent.name for p in ds.images]
        result["seen_word_errors"] = {"model": os.path.relpath(args.model.resolve(), ROOT),
                                      **seen_word_errors(sims, ds.targets(), ds.classnames, folders, captions)}
    with atomic_path(Path(args.out)) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
