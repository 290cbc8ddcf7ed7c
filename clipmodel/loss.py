"""Contrastive objectives over a batch of L2-normalised image and text features.

Both losses accept a `positives` matrix so that pairs which are genuinely interchangeable (two
images with the same normalised caption) are not pushed apart as negatives. The similarity matrix is
computed in fp32 even under autocast: at a logit scale of 100, bf16 logits are off by up to ~0.5,
which is noise in the softmax, while the N x N x D product costs nothing next to the encoders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    with torch.autocast(image_features.device.type, enabled=False):
        return logit_scale.float() * image_features.float() @ text_features.float().T


def positives_from_ids(ids: torch.Tensor) -> torch.Tensor:
    """int [N] caption ids (one per normalised caption text) -> bool [N, N], True where captions match."""
    return ids[:, None] == ids[None, :]


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                     positives: torch.Tensor | None = None, rows: slice | None = None) -> torch.Tensor:
    """CLIP's symmetric cross-entropy (Radford et al. 2021, Figure 3): each image picks its text among
    the batch and vice versa. Returns a float32 scalar, nats averaged over rows and both directions.

    Features are [N, D], L2-normalised (any float dtype; the logits are fp32). logit_scale is a scalar
    tensor, the temperature already exponentiated (what CLIP.forward returns). With `positives`
    (bool [N, N], diagonal True) the target of each row and column is uniform over its positives
    instead of one-hot; with all-distinct positives that is exactly the standard loss.

    `rows` restricts the loss to those images (against all texts) and those texts (against all images),
    averaged over the rows: one rank's share of a data-parallel batch (train.local_loss). The mean of
    the ranks' shares is the full loss, so averaging their gradients gives the full loss's gradient.
    """
    per_image = _logits(image_features[rows or slice(None)], text_features, logit_scale)
    # the whole batch: the text rows are the columns of the same matrix, no second product
    per_text = per_image.T if rows is None else _logits(text_features[rows], image_features, logit_scale)
    rows = rows or slice(0, len(image_features))
    if positives is None:
        labels = torch.arange(len(image_features), device=per_image.device)[rows]
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2
    pos_image, pos_text = positives[rows].float(), positives.T[rows].float()
    return (F.cross_entropy(per_image, pos_image / pos_image.sum(1, keepdim=True))
            + F.cross_entropy(per_text, pos_text / pos_text.sum(1, keepdim=True))) / 2


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, positives: torch.Tensor | None = None,
                 rows: slice | None = None) -> torch.Tensor:
    """SigLIP (Zhai et al. 2023, Algorithm 1): an independent binary decision per pair, label +1 for
    positives and -1 otherwise, summed over all pairs and divided by N as in the paper. Features [N, D]
    L2-normalised, logit_scale (exponentiated) and logit_bias scalar tensors; returns a float32
    scalar, nats per image.

    No softmax couples the batch, so there is no normalisation across it. The paper initialises the
    log-temperature at log(10) and the bias at -10, so that the many negatives start near their
    target and do not swamp the first steps (CLIPConfig.init_logit_scale / init_logit_bias).
    `rows`: only those images' pairs, divided by the number of rows, as in `contrastive_loss`.
    """
    rows = rows or slice(0, len(image_features))
    logits = _logits(image_features[rows], text_features, logit_scale) + logit_bias.float()
    n = len(image_features)
    pos = torch.eye(n, dtype=torch.bool, device=logits.device)[rows] if positives is None else positives[rows]
    labels = 2 * pos.float() - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def nt_xent_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float,
                 rows: slice | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, eq. 1), the image self-supervision SLIP adds to CLIP's loss
    (Mu et al. 2022): two views [N, D] of the same N images (any scale: normalised here, in fp32),
    each of the 2N embeddings picks its other view among the 2N - 1 others at `temperature`.
    Returns a float32 scalar, nats averaged over the anchors.

    `rows`: only those images' two anchors (against all 2N embeddings), one rank's share of a
    data-parallel batch, as in `contrastive_loss`.
    """
    n = len(view_a)
    with torch.autocast(view_a.device.type, enabled=False):
        z = F.normalize(torch.cat([view_a, view_b]).float(), dim=-1)
        index = torch.arange(n, device=z.device)[rows or slice(None)]
        anchors = torch.cat([index, index + n])
        logits = z[anchors] @ z.T / temperature
        logits[torch.arange(len(anchors), device=z.device), anchors] = float("-inf")  # not itself
        return F.cross_entropy(logits, (anchors + n) % (2 * n))
