"""Stage `tokenize`: train BPE on the train captions only, then encode every caption.

    python -m pipeline.tokenize [--manifest data/manifest.parquet] [--tokenizer data/tokenizer.json]
        [--tokens data/tokens.npy] [--caption-image data/caption_image.npy] [--report reports/tokenize.json]

Reads the manifest; writes (the defaults; dvc.yaml names them) data/tokenizer.json, data/tokens.npy
(int32 [captions, context]), data/caption_image.npy (int32 [captions], the manifest row of each
caption) and reports/tokenize.json.

With tokenize.caption_views = K > 0 every train caption also yields K variants built from its parts
(clipmodel.caption_views): the head alone, then the head with random subsets of the other parts. They
are extra caption rows of the same image, so the loader's per-step draw of one row per image picks
them (the streaming loader of data.output_format: webdataset builds the same views itself).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from clipmodel.caption_views import with_views
from clipmodel.io import atomic_path, write_json
from clipmodel.tokenizer import PAD_ID, encode, train_tokenizer
from pipeline.params import load_params

BATCH = 8192
TRUNCATED_EXAMPLES = 10  # truncated captions kept in full in the report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths: the defaults are the root pipeline's, which dvc.yaml passes explicitly."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.tokenize", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--manifest", type=Path, default=Path("data/manifest.parquet"), help="input: ingest's manifest")
    ap.add_argument("--tokenizer", type=Path, default=Path("data/tokenizer.json"), help="output: the BPE tokenizer")
    ap.add_argument("--tokens", type=Path, default=Path("data/tokens.npy"), help="output: int32 [captions, context] ids")
    ap.add_argument("--caption-image", type=Path, default=Path("data/caption_image.npy"),
                    help="output: each caption's manifest row")
    ap.add_argument("--report", type=Path, default=Path("reports/tokenize.json"), help="output: the stage's summary")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the stage: train the BPE on the train split's captions, then encode every caption (and its views)."""
    args = parse_args(argv)
    params = load_params().tokenize
    manifest = pd.read_parquet(args.manifest, columns=["captions", "split"])
    train_captions = (c for caps in manifest.captions[manifest.split == "train"] for c in caps)
    tok = train_tokenizer(train_captions, params.vocab_size, params.context_length)

    per_image = [with_views(list(caps), params.caption_views, params.caption_view_sep) if split == "train"
                 else list(caps) for caps, split in zip(manifest.captions, manifest.split)]
    captions = [c for caps in per_image for c in caps]
    owner = np.repeat(np.arange(len(manifest), dtype=np.int32), [len(caps) for caps in per_image])
    lengths = np.empty(len(captions), dtype=np.int32)
    truncated, examples = 0, []  # the first few truncated captions, in full: what the context length cuts
    with atomic_path(args.tokens) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32,
                                        shape=(len(captions), params.context_length))
        for start in tqdm(range(0, len(captions), BATCH), desc="tokenize", unit="batch"):
            ids, trunc = encode(tok, captions[start:start + BATCH])
            out[start:start + len(ids)] = ids
            lengths[start:start + len(ids)] = (ids != PAD_ID).sum(1)
            truncated += int(trunc.sum())
            examples += [captions[start + i] for i in np.flatnonzero(trunc)[:TRUNCATED_EXAMPLES - len(examples)]]
        out.flush()
        del out
    with atomic_path(args.caption_image) as tmp:
        np.save(tmp, owner)
    with atomic_path(args.tokenizer) as tmp:
        tok.save(str(tmp))

    pct = {f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)} if len(lengths) else {}
    write_json(args.report, {
        "vocab_size": tok.get_vocab_size(),
        "context_length": params.context_length,
        "captions": len(captions),
        "caption_views": params.caption_views,
        "train_captions_seen": int(manifest.captions[manifest.split == "train"].map(len).sum()),
        "truncated": truncated,
        "truncated_examples": examples,
        "token_length": {**pct, "max": int(lengths.max()) if len(lengths) else 0},
    })
    print(f"tokenize: {len(captions)} captions, vocab {tok.get_vocab_size()}, {truncated} truncated to "
          f"{params.context_length} tokens{f' (examples in {args.report})' if truncated else ''}")


if __name__ == "__main__":
    main()
