"""The parts of pipeline.loop.fit: the schedule, the state a checkpoint holds, its claim, and one step."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from clipmodel.model import CLIP, CLIPConfig
from conftest import ROOT
from pipeline.loop import Objective, TrainState, open_checkpoint, train_step, warmup_cosine
from pipeline.params import TrainParams

CFG = CLIPConfig(embed_dim=16, image_size=32, vision="resnet", vision_width=8, vision_layers=(1, 1, 1, 1),
                 vision_heads=2, context_length=8, vocab_size=64, text_width=16, text_heads=2, text_layers=1)
CPU = torch.device("cpu")


def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    f = warmup_cosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(8) == pytest.approx(0.5) and f(12) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 20)) and f(20) == pytest.approx(0.0)  # flat past the end
    assert warmup_cosine(0, 10)(0) == 1.0  # no warmup: the peak at once


def test_schedule_scales_both_towers_by_the_same_factor():
    tp = TrainParams(lr=1e-3, vision_lr=5e-3, warmup_fraction=0.25)
    state = TrainState(CLIP(CFG), tp, total=8, device=CPU, precision="fp32")
    for step in range(8):
        lrs = state.sched.get_last_lr()  # param_groups puts the image tower's groups last
        factor = warmup_cosine(2, 8)(step)
        assert lrs[0] == pytest.approx(1e-3 * factor) and lrs[-1] == pytest.approx(5e-3 * factor)
        state.opt.step()
        state.sched.step()


def batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 32, 32, generator=g), "tokens": torch.randint(1, 63, (n, 8), generator=g)}


def objective(model: CLIP, poison: bool = False) -> Objective:
    def loss(b):
        image, text, scale = model(b["images"], b["tokens"])
        value = (scale * image @ text.T).log_softmax(-1).diagonal().neg().mean()
        return value * math.nan if poison else value
    return Objective(model, loss, after_step=model.clamp_logit_scale_)


def test_save_and_restore_give_back_the_same_state(tmp_path):
    torch.manual_seed(0)
    tp = TrainParams(warmup_fraction=0.5)
    model = CLIP(CFG)
    state = TrainState(model, tp, total=6, device=CPU, precision="fp32")
    for k in range(3):
        train_step(objective(model), model, state, batch(seed=k), tp, CPU, "fp32")
    state.step, state.rows = 3, [{"step": 3, "loss": 1.0}]
    state.save(tmp_path / "ckpt.pt", "fp", "run")
    expected_rng = torch.get_rng_state()

    torch.manual_seed(1)
    other = TrainState(CLIP(CFG), tp, total=6, device=CPU, precision="fp32")
    snapshot = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (snapshot["fingerprint"], snapshot["run_id"]) == ("fp", "run")
    other.restore(snapshot)
    assert other.step == 3 and other.rows == [{"step": 3, "loss": 1.0}]
    assert torch.equal(torch.get_rng_state(), expected_rng)
    assert other.sched.last_epoch == state.sched.last_epoch
    for a, b in zip(model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)
    # the next step from the restored state is the step the original takes
    train_step(objective(model), model, state, batch(seed=9), tp, CPU, "fp32")
    train_step(objective(other.model), other.model, other, batch(seed=9), tp, CPU, "fp32")
    for a, b in zip(model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)


def test_a_non_finite_loss_skips_the_update_but_not_the_schedule():
    torch.manual_seed(0)
    tp = TrainParams(warmup_fraction=0.5)
    model = CLIP(CFG)
    state = TrainState(model, tp, total=10, device=CPU, precision="fp32")
    before = [p.detach().clone() for p in model.parameters()]
    bad = train_step(objective(model, poison=True), model, state, batch(), tp, CPU, "fp32")
    assert not torch.isfinite(bad) and state.bad_steps() == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert state.sched.last_epoch == 1
    loss = train_step(objective(model), model, state, batch(), tp, CPU, "fp32")
    assert loss.ndim == 0 and torch.isfinite(loss) and state.bad_steps() == (0, 0)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_checkpoint_claim_ends_with_its_process_not_with_its_forked_workers(tmp_path):
    """A second trainer of one checkpoint stops at once, naming the first; once the first dies the claim
    is free, even while a process it forked (a DataLoader worker) lives on for a moment."""
    ckpt = tmp_path / "train.pt"
    code = (f"import os, time; from pathlib import Path; from pipeline.loop import open_checkpoint\n"
            f"open_checkpoint(Path({str(ckpt)!r}), '', resume=False)\n"
            "if os.fork() == 0:\n    time.sleep(20); os._exit(0)\n"
            "print('claimed', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(SystemExit, match=f"being written by another training, pid {holder.pid} "):
            open_checkpoint(ckpt, "", resume=False)
    finally:
        holder.kill()
        holder.wait()
    assert open_checkpoint(ckpt, "", resume=False) is None  # its forked child is still asleep


