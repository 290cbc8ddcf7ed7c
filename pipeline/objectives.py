"""The CLIP objective as `pipeline.loop.Objective` needs it, shared by the train stage, the
efficiency study and the benchmarks: the contrastive (or sigmoid) loss over the global batch."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clipmodel import distributed
from clipmodel.loss import contrastive_loss, positives_from_ids, sigmoid_loss
from clipmodel.model import CLIP, CLIPEnsemble
from pipeline.loop import Batch
from pipeline.params import Params


def clip_loss(p: Params, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              caption_ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """train.loss on (B, D) image and text features; captions with equal ids are positives of each
    other under train.multi_positive. A 0-dim float32 tensor.

    An ensemble's k members (`scale` and `bias` of shape [k]; CLIPEnsemble) each get the loss on their
    own slice of the features, rescaled to unit length, and the k losses are averaged."""
    positives = positives_from_ids(caption_ids) if p.train.multi_positive else None
    scales = scale.reshape(-1)
    k = len(scales)
    biases = [None] * k if bias is None else bias.reshape(-1)
    losses = []
    for i, t, s, b in zip(image.chunk(k, -1), text.chunk(k, -1), scales, biases):
        if k > 1:
            i, t = i * k ** 0.5, t * k ** 0.5
        losses.append(sigmoid_loss(i, t, s, b, positives, rows) if p.train.loss == "sigmoid"
                      else contrastive_loss(i, t, s, positives, rows))
    return sum(losses) / k


def clip_objective(model: CLIP | CLIPEnsemble, p: Params) -> Callable[[Batch], torch.Tensor]:
    """The loss of one batch in one process."""
    def loss(batch: Batch) -> torch.Tensor:
        image, text, scale = model(batch["images"], batch["tokens"])
        return clip_loss(p, image, text, scale, model.logit_bias, batch["caption_ids"])
    return loss


def clip_split(model: CLIP | CLIPEnsemble, p: Params) -> tuple[Callable, Callable]:
    """`clip_objective` as Objective.features and .loss_from_features. The loss sees the global batch:
    every rank's features are gathered with their gradients, so each rank's images meet all texts
    as negatives. With train.local_loss a rank computes only its own rows of the logit matrices
    (against all columns): O(B/N x B) memory instead of O(B x B), the same gradients."""
    k = model.cfg.ensemble

    def features(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        image, text, scale = net(batch["images"], batch["tokens"])
        bias = () if model.logit_bias is None else model.logit_bias.reshape(-1).unbind()
        return image, text, *scale.reshape(-1).unbind(), *bias  # shared tensors as 0-dim ones (Objective)

    def loss_from_features(features: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
        image, text, *shared = features
        n, r = len(image), distributed.rank()
        rows = slice(r * n, (r + 1) * n) if p.train.local_loss else None
        bias = torch.stack(shared[k:]) if shared[k:] else None
        return clip_loss(p, distributed.gather(image), distributed.gather(text), torch.stack(shared[:k]), bias,
                         distributed.gather(batch["caption_ids"]), rows)
    return features, loss_from_features
