"""The CLIP objective as `pipeline.loop.Objective` needs it, shared by the train stage, the
efficiency study and the benchmarks: the contrastive (or sigmoid) loss over the global batch, plus
SLIP's image self-supervision where the batches carry a second view (train.ssl_weight)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clipmodel import distributed
from clipmodel.loss import contrastive_loss, nt_xent_loss, positives_from_ids, sigmoid_loss
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


def ssl_loss(p: Params, image: torch.Tensor, view: torch.Tensor, k: int, rows: slice | None = None) -> torch.Tensor:
    """train.ssl_weight x SLIP's image self-supervision (Mu et al. 2022): NT-Xent between two views'
    image features [B, D], each of an ensemble's k members on its own slice, averaged over members."""
    losses = [nt_xent_loss(a, b, p.train.ssl_temperature, rows) for a, b in zip(image.chunk(k, -1), view.chunk(k, -1))]
    return p.train.ssl_weight * sum(losses) / k


def encode_batch(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(image features, the self-supervised view's or None, text features, exp(logit_scale)) of a
    batch; both views go through the image tower in one pass, so BatchNorm sees them together (SimCLR)."""
    images = batch["images"]
    if "ssl_images" in batch:
        images = torch.cat([images, batch["ssl_images"]])
    image, text, scale = net(images, batch["tokens"])
    image, view = image.split(len(text)) if "ssl_images" in batch else (image, None)
    return image, view, text, scale


def clip_objective(model: CLIP | CLIPEnsemble, p: Params) -> Callable[[Batch], torch.Tensor]:
    """The loss of one batch in one process (with SLIP's term where the batch has "ssl_images")."""
    def loss(batch: Batch) -> torch.Tensor:
        image, view, text, scale = encode_batch(model, batch)
        ssl = 0 if view is None else ssl_loss(p, image, view, model.cfg.ensemble)
        return ssl + clip_loss(p, image, text, scale, model.logit_bias, batch["caption_ids"])
    return loss


def clip_split(model: CLIP | CLIPEnsemble, p: Params,
               terms: dict[str, torch.Tensor] | None = None) -> tuple[Callable, Callable]:
    """`clip_objective` as Objective.features and .loss_from_features. The loss sees the global batch:
    every rank's features are gathered with their gradients, so each rank's images meet all texts
    as negatives. With train.local_loss a rank computes only its own rows of the logit matrices
    (against all columns): O(B/N x B) memory instead of O(B x B), the same gradients. `terms`, when
    given, receives the last step's SLIP term ("ssl_loss", weighted, detached) for the step log."""
    k = model.cfg.ensemble

    def features(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        image, view, text, scale = encode_batch(net, batch)
        bias = () if model.logit_bias is None else model.logit_bias.reshape(-1).unbind()
        views = () if view is None else (view,)
        return image, text, *views, *scale.reshape(-1).unbind(), *bias  # shared tensors as 0-dim ones (Objective)

    def loss_from_features(features: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
        image, text, *shared = features
        view = shared.pop(0) if "ssl_images" in batch else None
        n, r = len(image), distributed.rank()
        rows = slice(r * n, (r + 1) * n) if p.train.local_loss else None
        bias = torch.stack(shared[k:]) if shared[k:] else None
        image = distributed.gather(image)
        ssl = 0 if view is None else ssl_loss(p, image, distributed.gather(view), k, rows)
        if terms is not None and view is not None:
            terms["ssl_loss"] = ssl.detach()
        return ssl + clip_loss(p, image, distributed.gather(text), torch.stack(shared[:k]), bias,
                               distributed.gather(batch["caption_ids"]), rows)
    return features, loss_from_features
