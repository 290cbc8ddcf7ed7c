"""Stage `tokenize`: train BPE on the train captions only, then encode every caption.

Outputs: data/tokenizer.json, data/tokens.npy (int32 [captions, context]), data/caption_image.npy
(int32 [captions], the manifest row of each caption) and reports/tokenize.json.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm import tqdm

from clipmodel.io import atomic_path, write_json
from clipmodel.tokenizer import PAD_ID, encode, train_tokenizer
from pipeline.params import load_params

MANIFEST = "data/manifest.parquet"
BATCH = 8192


def main() -> None:
    params = load_params().tokenize
    manifest = pd.read_parquet(MANIFEST, columns=["captions", "split"])
    train_captions = (c for caps in manifest.captions[manifest.split == "train"] for c in caps)
    tok = train_tokenizer(train_captions, params.vocab_size, params.context_length)

    captions = [c for caps in manifest.captions for c in caps]
    owner = np.repeat(np.arange(len(manifest), dtype=np.int32), manifest.captions.map(len).to_numpy())
    lengths = np.empty(len(captions), dtype=np.int32)
    truncated = 0
    with atomic_path("data/tokens.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32,
                                        shape=(len(captions), params.context_length))
        for start in tqdm(range(0, len(captions), BATCH), desc="tokenize", unit="batch"):
            ids, trunc = encode(tok, captions[start:start + BATCH])
            out[start:start + len(ids)] = ids
            lengths[start:start + len(ids)] = (ids != PAD_ID).sum(1)
            truncated += int(trunc.sum())
        out.flush()
        del out
    with atomic_path("data/caption_image.npy") as tmp:
        np.save(tmp, owner)
    with atomic_path("data/tokenizer.json") as tmp:
        tok.save(str(tmp))

    pct = {f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)} if len(lengths) else {}
    write_json("reports/tokenize.json", {
        "vocab_size": tok.get_vocab_size(),
        "context_length": params.context_length,
        "captions": len(captions),
        "train_captions_seen": int(manifest.captions[manifest.split == "train"].map(len).sum()),
        "truncated": truncated,
        "token_length": {**pct, "max": int(lengths.max()) if len(lengths) else 0},
    })
    print(f"tokenize: {len(captions)} captions, vocab {tok.get_vocab_size()}, {truncated} truncated")


if __name__ == "__main__":
    main()
