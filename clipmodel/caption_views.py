"""Caption views: shorter captions built from a caption's parts, trained on as extra captions of its image.

Captions of the form `name (tag, tag)` hold the bare name that zero-shot labels are; a view is that
name alone, or with some of the tags (docs/real-data.md: unseen top-1 0.063 -> 0.085). Both training
routes use these functions, so that a recipe trains on the same captions whichever format ingest
wrote: the tokenize stage encodes the views as extra caption rows (npy shards), and the streaming
loader builds them from each sample's captions (WebDataset shards).
"""
from __future__ import annotations

import re
import zlib

import numpy as np


def caption_views(caption: str, k: int, sep: str | re.Pattern[str]) -> list[str]:
    """Up to `k` shorter variants of `caption` from its parts, split on the regex `sep`.

    The first non-empty part is the head (for `grinning face (happy, smile)` with sep `[(),;]`:
    `grinning face`). The variants are the head alone, then the head followed by a random non-empty
    subset of the other parts, in their original order, joined with ", ". A caption with one part
    has no variants. Deterministic: the draw is seeded by the caption's own text.
    """
    if k < 1:
        return []
    parts = [p.strip() for p in re.split(sep, caption)]
    parts = [p for p in parts if p]
    if len(parts) < 2:
        return []
    head, rest = parts[0], parts[1:]
    rng = np.random.default_rng(zlib.crc32(caption.encode()))
    views = [head]
    for _ in range(k - 1):
        keep = np.flatnonzero(rng.random(len(rest)) < 0.5)
        if len(keep) == 0:
            keep = rng.integers(len(rest), size=1)
        views.append(", ".join([head, *(rest[i] for i in keep)]))
    return views


def with_views(captions: list[str], k: int, sep: str | re.Pattern[str]) -> list[str]:
    """The captions followed by the `caption_views` of each (an image's caption rows stay contiguous)."""
    if k < 1:  # the default: called for every streamed sample, so no split at all
        return list(captions)
    pattern = re.compile(sep)
    return [*captions, *(v for c in captions for v in caption_views(c, k, pattern))]
