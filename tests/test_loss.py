"""Losses against open_clip's ClipLoss and against direct per-pair loops."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipmodel.loss import contrastive_loss, nt_xent_loss, positives_from_ids, sigmoid_loss

open_clip_loss = pytest.importorskip("open_clip.loss")


def features(n: int = 8, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_(),
            F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_())


def test_contrastive_equals_open_clip():
    image, text = features()
    scale = torch.tensor(1 / 0.07)
    expected = open_clip_loss.ClipLoss()(image, text, scale)
    torch.testing.assert_close(contrastive_loss(image, text, scale), expected, rtol=0, atol=1e-6)


def test_all_distinct_ids_give_standard_loss():
    image, text = features()
    scale = torch.tensor(20.0)
    positives = positives_from_ids(torch.arange(8) * 7)
    assert torch.equal(positives, torch.eye(8, dtype=torch.bool))
    torch.testing.assert_close(contrastive_loss(image, text, scale, positives), contrastive_loss(image, text, scale),
                               rtol=0, atol=1e-6)


def test_positives_from_ids():
    assert positives_from_ids(torch.tensor([5, 3, 5])).tolist() == [[True, False, True], [False, True, False],
                                                                     [True, False, True]]


def test_multi_positive_hand_checked():
    """Pairs 0 and 2 share a caption: each row/column's target is uniform over its positives."""
    image, text = features(3, 4, seed=1)
    scale = torch.tensor(5.0)
    positives = positives_from_ids(torch.tensor([5, 3, 5]))
    logits = (scale * image @ text.T).detach()
    rows = []
    for lg in (logits, logits.T):
        for i in range(3):
            logp = lg[i] - torch.logsumexp(lg[i], 0)
            pos = [j for j in range(3) if positives[i, j]]
            rows.append(-sum(logp[j] for j in pos) / len(pos))
    expected = (sum(rows[:3]) / 3 + sum(rows[3:]) / 3) / 2
    torch.testing.assert_close(contrastive_loss(image, text, scale, positives), expected, rtol=0, atol=1e-6)


def sigmoid_loop(image, text, scale, bias, positives):
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if positives[i, j] else -1.0
            logit = scale * float(image[i] @ text[j]) + bias
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    return total / n


@pytest.mark.parametrize("ids", [None, [0, 1, 0, 2, 1]])
def test_sigmoid_equals_loop(ids):
    image, text = features(5, 8, seed=2)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    positives = None if ids is None else positives_from_ids(torch.tensor(ids))
    expected = sigmoid_loop(image.detach().double(), text.detach().double(), 10.0, -10.0,
                            torch.eye(5, dtype=torch.bool) if positives is None else positives)
    assert sigmoid_loss(image, text, scale, bias, positives).item() == pytest.approx(expected, rel=1e-5)


def test_sigmoid_equals_open_clip():
    image, text = features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    expected = open_clip_loss.SigLipLoss()(image, text, scale, bias)
    torch.testing.assert_close(sigmoid_loss(image, text, scale, bias), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loss", ["contrastive", "contrastive-multi", "sigmoid", "sigmoid-multi"])
def test_gradients_finite_and_fp32_under_autocast(loss):
    image, text = features()
    scale = torch.tensor(100.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    positives = positives_from_ids(torch.tensor([0, 1, 0, 2, 3, 3, 4, 5])) if loss.endswith("multi") else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if loss.startswith("sigmoid"):
            value = sigmoid_loss(image.bfloat16(), text.bfloat16(), scale, bias, positives)
        else:
            value = contrastive_loss(image.bfloat16(), text.bfloat16(), scale, positives)
    assert value.dtype == torch.float32
    value.backward()
    for t in (image, text, scale) + ((bias,) if loss.startswith("sigmoid") else ()):
        assert t.grad is not None and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("loss", ["contrastive", "contrastive-multi", "sigmoid", "sigmoid-multi"])
def test_row_shares_average_to_the_full_loss_and_gradient(loss):
    """train.local_loss: each of 4 ranks takes 2 rows; the mean of their losses (and gradients) is the full one."""
    image, text = features()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-5.0, requires_grad=True)
    positives = positives_from_ids(torch.tensor([0, 1, 0, 2, 3, 3, 4, 5])) if loss.endswith("multi") else None

    def value(rows=None):
        if loss.startswith("sigmoid"):
            return sigmoid_loss(image, text, scale, bias, positives, rows)
        return contrastive_loss(image, text, scale, positives, rows)

    def grads(v):
        return torch.autograd.grad(v, (image, text, scale, bias), allow_unused=True, materialize_grads=True)
    full = value()
    shares = torch.stack([value(slice(2 * r, 2 * r + 2)) for r in range(4)]).mean()
    torch.testing.assert_close(shares, full, rtol=0, atol=1e-6)
    for a, b in zip(grads(shares), grads(full)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.allclose(value(slice(0, 2)), full)  # a share alone is not the full loss


def test_nt_xent_against_a_loop_over_anchors():
    """SimCLR's eq. 1: each of the 2N embeddings against its other view, among all 2N but itself."""
    a, b = features(6, 8, seed=3)
    z = F.normalize(torch.cat([a, b]) * 3.0, dim=-1)  # any scale goes in; the loss normalises
    t, n, losses = 0.1, 6, []
    for i in range(2 * n):
        sims = torch.stack([z[i] @ z[j] / t for j in range(2 * n) if j != i])
        positive = z[i] @ z[(i + n) % (2 * n)] / t
        losses.append(torch.logsumexp(sims, 0) - positive)
    torch.testing.assert_close(nt_xent_loss(a * 3.0, b * 3.0, t), torch.stack(losses).mean(), rtol=0, atol=1e-5)


def test_nt_xent_rows_average_to_the_full_loss_and_matching_views_score_lower():
    a, b = features(8, 16, seed=4)
    full = nt_xent_loss(a, b, 0.1)
    shares = [nt_xent_loss(a, b, 0.1, rows=slice(r * 4, (r + 1) * 4)) for r in range(2)]
    torch.testing.assert_close(sum(shares) / 2, full, rtol=0, atol=1e-6)
    assert nt_xent_loss(a, a + 0.01 * b, 0.1) < full / 10  # views that agree are nearly free
