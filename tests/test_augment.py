"""Photometric augmentation (clipmodel.data.ColorAugment): what each parameter does to an image, and
that an inactive one leaves the batches, and the random stream behind them, as they were."""
from __future__ import annotations

import pytest
import torch

from clipmodel.data import ColorAugment, apply_color
from pipeline.params import TrainParams


def params(b: float = 1, c: float = 1, s: float = 1, grey: float = 0, sigma: float = 0, n: int = 1) -> torch.Tensor:
    return torch.tensor([[b, c, s, grey, sigma]] * n)


def test_inactive_draws_nothing_and_leaves_the_generator_alone():
    g = torch.Generator().manual_seed(0)
    assert ColorAugment().draw(8, g) is None
    assert ColorAugment(jitter=(0.4, 0.4, 0.4), jitter_p=0.0).draw(8, g) is None
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())


def test_draws_follow_the_probabilities_and_ranges():
    drawn = ColorAugment((0.4, 0.2, 0.0), 0.5, 0.25, 0.75, (0.5, 1.0)).draw(20000, torch.Generator().manual_seed(1))
    jittered = (drawn[:, :2] != 1).any(1).float().mean()
    assert abs(jittered - 0.5) < 0.02 and abs(drawn[:, 3].mean() - 0.25) < 0.02
    assert abs((drawn[:, 4] > 0).float().mean() - 0.75) < 0.02
    assert drawn[:, 0].min() >= 0.6 and drawn[:, 0].max() <= 1.4 and drawn[:, 1].min() >= 0.8
    assert torch.all(drawn[:, 2] == 1)  # saturation strength 0
    blurred = drawn[:, 4][drawn[:, 4] > 0]
    assert blurred.min() >= 0.5 and blurred.max() <= 1.0


def test_each_parameter_acts_on_its_own_image():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 0.5
    out = apply_color(x, torch.cat([params(), params(b=2), params(grey=1), params(sigma=1.0)]))
    assert torch.allclose(out[0], x[0], atol=1e-6)  # identity
    assert torch.allclose(out[1], x[1] * 2, atol=1e-6)  # brightness (no clipping below 0.5 x 2)
    luma = 0.299 * x[2, 0] + 0.587 * x[2, 1] + 0.114 * x[2, 2]
    assert all(torch.allclose(out[2, ch], luma, atol=1e-6) for ch in range(3))  # greyscale, R = G = B
    assert out[3].std() < x[3].std() * 0.8 and abs(out[3].mean() - x[3].mean()) < 0.01  # blur smooths


def test_contrast_and_saturation_move_towards_grey():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    flat = apply_color(x, params(c=0))
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat), atol=1e-6)  # one colour: the mean luma
    grey = apply_color(x, params(s=0))
    assert torch.allclose(grey[0, 0], grey[0, 1], atol=1e-6) and torch.allclose(grey[0, 1], grey[0, 2], atol=1e-6)


def test_blur_keeps_a_flat_image():
    x = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(apply_color(x, params(sigma=1.5, n=2)), x, atol=1e-6)


@pytest.mark.parametrize("bad", [{"color_jitter": (1.5, 0, 0)}, {"grayscale_p": 2.0}, {"blur_sigma": (0, 1)},
                                 {"blur_sigma": (2, 1)}])
def test_out_of_range_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TrainParams(**bad)
