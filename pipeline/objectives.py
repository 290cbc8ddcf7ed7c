"""The CLIP objective as `pipeline.loop.Objective` needs it, shared by the train stage, the
efficiency study and the benchmarks: the contrastive (or sigmoid) loss over the global batch."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clipmodel import distributed
from clipmodel.loss import contrastive_loss, positives_from_ids, sigmoid_loss
from clipmodel.model import CLIP
from pipeline.loop import Batch
from pipeline.params import Params


def clip_loss(p: Params, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              caption_ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """train.loss on (B, D) image and text features; captions with equal ids are positives of each
    other under train.multi_positive. A 0-dim float32 tensor."""
    positives = positives_from_ids(caption_ids) if p.train.multi_positive else None
    if p.train.loss == "sigmoid":
        return sigmoid_loss(image, text, scale, bias, positives, rows)
    return contrastive_loss(image, text, scale, positives, rows)


def clip_objective(model: CLIP, p: Params) -> Callable[[Batch], torch.Tensor]:
    """The loss of one batch in one process."""
    def loss(batch: Batch) -> torch.Tensor:
        image, text, scale = model(batch["images"], batch["tokens"])
        return clip_loss(p, image, text, scale, model.logit_bias, batch["caption_ids"])
    return loss


def clip_split(model: CLIP, p: Params) -> tuple[Callable, Callable]:
    """`clip_objective` as Objective.features and .loss_from_features. The loss sees the global batch:
    every rank's features are gathered with their gradients, so each rank's images meet all texts
    as negatives. With train.local_loss a rank computes only its own rows of the logit matrices
    (against all columns): O(B/N x B) memory instead of O(B x B), the same gradients."""
    def features(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        image, text, scale = net(batch["images"], batch["tokens"])
        return (image, text, scale) if model.logit_bias is None else (image, text, scale, model.logit_bias)

    def loss_from_features(features: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
        image, text, scale, *bias = features
        n, r = len(image), distributed.rank()
        rows = slice(r * n, (r + 1) * n) if p.train.local_loss else None
        return clip_loss(p, distributed.gather(image), distributed.gather(text), scale, bias[0] if bias else None,
                         distributed.gather(batch["caption_ids"]), rows)
    return features, loss_from_features
