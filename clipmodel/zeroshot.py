"""Zero-shot classification maths, in numpy so that the torch encoder, onnxruntime and a peer's model
all go through the same lines: class names go into prompts, prompt embeddings are averaged per class,
images go to the nearest class vector.

Ensembling happens in embedding space (normalise each prompt, average, renormalise), so many
templates cost nothing at inference: one text vector per class, exactly as in the paper.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np


def as_list(items: Iterable, what: str) -> list:
    """`items` as a list, refusing one bare item: a string, path or bytes is iterable itself, so
    `images("photo.png")` would read each character as a path, and a label as its letters.

    Raises: TypeError naming `what` (images, texts, labels, templates) and the item given alone.
    """
    if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, Iterable):
        shown = repr(items)[:60] if isinstance(items, (str, bytes, os.PathLike)) else type(items).__name__
        raise TypeError(f"{what}: a list is needed, got one item ({shown}); pass [item]")
    return list(items)


def unit(x: np.ndarray) -> np.ndarray:
    """float [..., D] -> same shape and dtype, each row L2-normalised (the epsilon of torch's F.normalize)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_vectors(embed_texts: Callable[[list[str]], np.ndarray], classnames: Sequence[str],
                  templates: Sequence[str], batch_prompts: int = 4096) -> np.ndarray:
    """float32 [C, D] unit vectors: each prompt normalised, averaged per class, renormalised (the
    paper's prompt ensembling, Radford et al. 2021 sec. 3.1.4), a few classes per text batch.

    `embed_texts` maps n strings to [n, D]; `batch_prompts` caps the prompts per call (memory).

    Raises: TypeError when `classnames` or `templates` is one string rather than a list (`as_list`).
    """
    classnames, templates = as_list(classnames, "labels"), as_list(templates, "templates")
    per_batch = max(1, batch_prompts // len(templates))
    out = []
    for start in range(0, len(classnames), per_batch):
        names = classnames[start:start + per_batch]
        emb = unit(np.asarray(embed_texts([t.format(c) for c in names for t in templates]), dtype=np.float32))
        out.append(unit(emb.reshape(len(names), len(templates), -1).mean(1)))
    return np.concatenate(out)


def top_k(image_features: np.ndarray, classes: np.ndarray, k: int = 5, chunk: int = 1024) -> np.ndarray:
    """int64 [N, min(k, C)]: the classes nearest each image by cosine, best first, `chunk` images at a
    time (memory: chunk x C floats of scratch, whatever N).

    image_features: [N, D], normalised here; classes: float32 [C, D] (`class_vectors`, or with a
    support term added: clipmodel.support)."""
    k = min(k, len(classes))
    out = np.empty((len(image_features), k), dtype=np.int64)
    for s in range(0, len(image_features), chunk):
        sims = unit(image_features[s:s + chunk].astype(np.float32)) @ classes.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        out[s:s + chunk] = np.take_along_axis(part, order, 1)
    return out


def classify(image_features: np.ndarray, classes: np.ndarray, logit_scale: float,
             k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Top-k class indices int64 [N, min(k, C)] and their probabilities [N, min(k, C)] (float32 for
    float32 inputs), best first: softmax(logit_scale * cosine) over all classes (Radford et al. 2021,
    sec. 3.1.2).

    image_features: [N, D], normalised here; classes: [C, D] (`class_vectors`, or with a support term
    added); logit_scale: the exponentiated temperature (at most 100)."""
    logits = logit_scale * unit(image_features) @ classes.T
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(-1, keepdims=True)
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return index, np.take_along_axis(probs, index, -1)
