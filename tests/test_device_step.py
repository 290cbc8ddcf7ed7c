"""The GPU side of the step, checked on the CPU: batches as uint8 pixels finished on the device, and
the non-finite-loss check kept on the device (fused AdamW's found_inf) instead of read every step."""
from __future__ import annotations

import math

import pytest
import torch

from clipmodel.data import ColorAugment, Corpus, CorpusBatches, finish_batch
from clipmodel.model import CLIP, CLIPConfig
from pipeline import loop
from pipeline.loop import Objective, TrainState, fit, train_step
from pipeline.params import TrainParams

CFG = CLIPConfig(embed_dim=16, image_size=32, vision="vit", vision_width=16, vision_layers=1, vision_heads=2,
                 vision_patch_size=8, context_length=8, vocab_size=64, text_width=16, text_heads=2, text_layers=1)
CPU = torch.device("cpu")


JITTER = ColorAugment((0.4, 0.4, 0.4), 0.8, 0.2, 0.5)


@pytest.mark.parametrize("crop, color, ssl", [(None, ColorAugment(), None), ((0.5, 1.0), ColorAugment(), None),
                                              ((0.5, 1.0), JITTER, None), (None, JITTER, (0.5, 1.0)),
                                              (None, ColorAugment(), (0.2, 1.0))])
def test_raw_pixels_finish_into_the_same_images(tiny_data, crop, color, ssl):
    corpus = Corpus.load(tiny_data / "data")
    data = CorpusBatches(corpus, corpus.split("train"), 16, 0, crop or (1, 1), (3 / 4, 4 / 3) if crop else (1, 1),
                         color, ssl)
    raw = list(data.rank_batches(3, 5, raw_pixels=True))
    assert not data.raw_pixels  # the source itself is left as it was
    for step, batch in zip((3, 4), raw):
        assert batch["pixels"].dtype == torch.uint8 and ("crops" in batch) == bool(crop)
        assert ("color" in batch) == bool(color.grayscale_p)
        assert ("ssl_crops" in batch) == bool(ssl) and ("ssl_color" in batch) == bool(ssl and color.grayscale_p)
        finished, plain = finish_batch(batch), data.batch(step)
        assert finished.keys() == plain.keys() and ("ssl_images" in plain) == bool(ssl)
        for k in plain:
            assert torch.equal(finished[k], plain[k]), k
        if ssl:  # a view of its own: another crop of the same images
            assert not torch.equal(plain["ssl_images"], plain["images"])


def batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(4, 3, 32, 32, generator=g), "tokens": torch.randint(1, 63, (4, 8), generator=g)}


def objective(model: CLIP, poisoned: set[int] = frozenset(), calls: list | None = None) -> Objective:
    calls = [] if calls is None else calls

    def loss(b):
        calls.append(1)
        image, text, scale = model(b["images"], b["tokens"])
        value = (scale * image @ text.T).log_softmax(-1).diagonal().neg().mean()
        return value * math.nan if len(calls) in poisoned else value
    return Objective(model, loss, after_step=model.clamp_logit_scale_)


def test_a_bad_step_is_skipped_on_the_device_as_on_the_host():
    """Good, non-finite, good: the deferred (fused, found_inf) step ends where the host-checked one
    does, up to the fused kernel's rounding."""
    tp = TrainParams(warmup_fraction=0.5, grad_clip=1.0)
    ends = {}
    for deferred in (False, True):
        torch.manual_seed(0)
        model = CLIP(CFG)
        state = TrainState(model, tp, total=6, device=CPU, precision="fp32", deferred=deferred)
        obj = objective(model, poisoned={2})
        train_step(obj, model, state, batch(0), tp, CPU, "fp32")
        before = [p.detach().clone() for p in model.parameters()]
        out = train_step(obj, model, state, batch(1), tp, CPU, "fp32")
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert all(p.grad is None for p in model.parameters()) and state.sched.last_epoch == 2
        assert not torch.isfinite(out) and state.bad_steps() == (1, 1)  # counted alike on both paths
        if deferred:
            assert all(s["step"].item() == 1 for s in state.opt.state.values())  # the skipped step is not counted
        train_step(obj, model, state, batch(2), tp, CPU, "fp32")
        assert state.bad_steps() == (0, 0)
        ends[deferred] = [p.detach().clone() for p in model.parameters()]
    for a, b in zip(ends[False], ends[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class Batches:
    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def rank_batches(self, start, total, workers, pin_memory, raw_pixels=False):
        return (batch(k) for k in range(start, total))


@pytest.mark.parametrize("deferred", [False, True])
def test_fit_stops_after_max_bad_steps_before_the_next_checkpoint(tmp_path, monkeypatch, deferred):
    """Steps 4 and 5 are not finite; max_bad_steps 2. Host-checked, fit stops at once; deferred, at
    the next step that reads the device (the checkpoint at 6), before writing it."""
    monkeypatch.setattr(loop, "checks_on_device", lambda device, precision: deferred)
    torch.manual_seed(0)
    model = CLIP(CFG)
    calls = []
    obj = objective(model, poisoned={4, 5}, calls=calls)
    obj.checkpoint, obj.log_csv = tmp_path / "ckpt.pt", tmp_path / "log.csv"
    tp = TrainParams(checkpoint_every=3, log_every=100, max_bad_steps=2, warmup_fraction=0.1)
    with pytest.raises(SystemExit, match="2 non-finite losses in a row"):
        fit(obj, Batches(100), tp, CPU, 20, "fp", None, None)
    assert torch.load(obj.checkpoint, weights_only=True)["step"] == 3
    assert len(calls) == (6 if deferred else 5)


@pytest.mark.parametrize("deferred", [False, True])
def test_fit_saves_every_checkpoint_every_steps_at_each_epoch_end_and_at_the_end(tmp_path, monkeypatch, deferred):
    """Epochs of 4 steps, checkpoint_every 6, 10 steps: a short run killed mid-way still resumes."""
    monkeypatch.setattr(loop, "checks_on_device", lambda device, precision: deferred)
    saved = []
    monkeypatch.setattr(TrainState, "save", lambda self, path, fingerprint, run_id: saved.append(self.step))
    obj = objective(CLIP(CFG))
    obj.checkpoint, obj.log_csv = tmp_path / "ckpt.pt", tmp_path / "log.csv"
    fit(obj, Batches(4), TrainParams(checkpoint_every=6, log_every=100, warmup_fraction=0.1), CPU, 10, "fp", None, None)
    assert saved == [4, 6, 8, 10]


def test_checkpoints_resume_across_optimiser_implementations(tmp_path):
    """A GPU run's checkpoint (fused AdamW) resumes in a CPU run (foreach) and back."""
    tp = TrainParams(warmup_fraction=0.5)
    torch.manual_seed(0)
    model = CLIP(CFG)
    fused = TrainState(model, tp, total=6, device=CPU, precision="fp32", deferred=True)
    train_step(objective(model), model, fused, batch(0), tp, CPU, "fp32")
    fused.save(tmp_path / "a.pt", "fp", None)
    plain = TrainState(CLIP(CFG), tp, total=6, device=CPU, precision="fp32")
    plain.restore(torch.load(tmp_path / "a.pt", weights_only=True))
    assert not plain.opt.param_groups[0]["fused"]
    assert train_step(objective(plain.model), plain.model, plain, batch(1), tp, CPU, "fp32") is not None
    plain.save(tmp_path / "b.pt", "fp", None)
    again = TrainState(CLIP(CFG), tp, total=6, device=CPU, precision="fp32", deferred=True)
    again.restore(torch.load(tmp_path / "b.pt", weights_only=True))
    assert again.opt.param_groups[0]["fused"]
    train_step(objective(again.model), again.model, again, batch(2), tp, CPU, "fp32")
    assert again.bad_steps() == (0, 0)


def test_fp16_off_cuda_is_refused_for_want_of_loss_scaling():
    from pipeline.device import resolve_precision
    with pytest.raises(SystemExit, match="train.precision: fp16 needs a CUDA device"):
        resolve_precision("fp16", torch.device("cpu"))
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
