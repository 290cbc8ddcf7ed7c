"""Zero-shot classification: class names go into prompts, prompt embeddings are averaged per class.

Ensembling happens in embedding space (normalise each prompt, average, renormalise), so many
templates cost nothing at inference: one text vector per class, exactly as in the paper.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str]) -> torch.Tensor:
    """float32 [C, D] unit vectors: the renormalised mean of each class's normalised prompt embeddings
    (prompt ensembling, Radford et al. 2021 sec. 3.1.4). `encode_text` maps n strings to [n, D]."""
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = F.normalize(encode_text(prompts).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)


def classify(image_features: torch.Tensor, classes: torch.Tensor, logit_scale: float = 100.0,
             k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class indices int64 [N, min(k, C)] and their probabilities float32 [N, min(k, C)], best
    first: softmax(logit_scale * cosine) over all classes (Radford et al. 2021, sec. 3.1.2).

    image_features: [N, D], normalised here; classes: float32 [C, D] unit vectors (`class_embeddings`);
    logit_scale: the exponentiated temperature (e.g. Encoder.logit_scale)."""
    logits = logit_scale * F.normalize(image_features.float(), dim=-1) @ classes.T
    probs = logits.softmax(-1)
    top = probs.topk(min(k, classes.shape[0]), dim=-1)
    return top.indices, top.values
