"""Data-parallel training, exact gradient accumulation and activation checkpointing.

Each compares gradients (or final weights) against one process training on the whole batch: two
gloo processes on this CPU, k micro-batches, recomputed activations must all give the same numbers.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.numpy import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipmodel import distributed
from clipmodel.model import CLIP, CLIPConfig, CLIPEnsemble, build_model, vision_tower
from conftest import ROOT, TINY, kill_at_step, merge, run_stage, stage_env, write_params
from pipeline.device import cpu_has_native_bf16
from pipeline.loop import Objective, backward
from pipeline.objectives import clip_objective, clip_split
from pipeline.params import Params

CFG = CLIPConfig(embed_dim=16, image_size=32, vision="vit", vision_width=32, vision_layers=2, vision_heads=2,
                 vision_patch_size=8, context_length=16, vocab_size=300, text_width=32, text_heads=2, text_layers=2)
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)
CPU = torch.device("cpu")


def params(**train) -> Params:
    return Params.model_validate(merge(TINY, {"train": train}))


def make_batch(n: int, seed: int = 0, ssl: bool = False) -> dict[str, torch.Tensor]:
    """Random images and captions; `ssl`: with a second view of each image (SLIP's, train.ssl_weight)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 16, (n,), generator=g)
    tokens = torch.randint(3, 300, (n, 16), generator=g)
    tokens[torch.arange(16) >= lengths[:, None]] = 0
    images = torch.randn(n, 3, 32, 32, generator=g)
    views = {"ssl_images": images.flip(-1) + 0.1 * torch.randn(images.shape, generator=g)} if ssl else {}
    return {"images": images, "tokens": tokens, **views,
            "caption_ids": torch.randint(0, n // 2, (n,), generator=g), "image_index": torch.arange(n)}


def clip_model(p: Params, ensemble: int = 1) -> CLIP | CLIPEnsemble:
    torch.manual_seed(0)
    return build_model(CLIPConfig(**{**CFG.to_dict(), "ensemble": ensemble,
                                     "init_logit_bias": -10.0 if p.train.loss == "sigmoid" else None}))


def clip_grads(p: Params, batch, accum: int = 1, net: nn.Module | None = None,
               model: CLIP | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    model = model or clip_model(p)
    features, loss_from_features = clip_split(model, p)
    obj = Objective(model, clip_objective(model, p), features=features, loss_from_features=loss_from_features)
    loss = backward(obj, net or model, batch, accum, CPU, "fp32", NO_SCALER)
    return loss.item(), {n: q.grad.clone() for n, q in model.named_parameters()}


def assert_grads_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("train,ensemble", [({}, 1), ({"loss": "sigmoid", "multi_positive": True}, 1), ({}, 2),
                                           ({"loss": "sigmoid"}, 2), ({"ssl_weight": 0.5}, 1), ({"ssl_weight": 1.0}, 2)])
def test_accumulation_is_exact_for_the_contrastive_loss(train, ensemble):
    p, batch = params(**train), make_batch(16, ssl="ssl_weight" in train)
    loss1, full = clip_grads(p, batch, model=clip_model(p, ensemble))
    loss4, accumulated = clip_grads(p, batch, accum=4, model=clip_model(p, ensemble))
    assert loss4 == pytest.approx(loss1, abs=1e-6)
    scales = [g for n, g in full.items() if n.endswith("logit_scale")]
    assert len(scales) == ensemble and all(g.abs() > 1e-4 for g in scales)  # temperatures are compared too
    assert_grads_close(accumulated, full)


@pytest.mark.parametrize("train", [{}, {"loss": "sigmoid"}, {"ssl_weight": 1.0}])
def test_an_ensemble_trains_each_member_as_it_would_alone(train):
    p, batch = params(**train), make_batch(16, ssl="ssl_weight" in train)
    ensemble = clip_model(p, 3)
    loss, grads = clip_grads(p, batch, model=ensemble)
    ensemble.zero_grad(set_to_none=True)
    alone = [clip_grads(p, batch, model=member) for member in ensemble.members]
    assert loss == pytest.approx(sum(a[0] for a in alone) / 3, abs=1e-5)
    for i, (_, member_grads) in enumerate(alone):  # the mean of the losses: each member's gradient / 3
        assert_grads_close({n: g / 3 for n, g in member_grads.items()},
                           {n.split(".", 2)[2]: g for n, g in grads.items() if n.startswith(f"members.{i}.")})


def test_accumulation_is_exact_for_a_per_sample_loss():
    torch.manual_seed(0)
    model = nn.Sequential(vision_tower(CFG), nn.Linear(CFG.embed_dim, 5))
    labels = torch.randint(0, 5, (16,))
    batch = make_batch(16)
    obj = Objective(model, lambda b: F.cross_entropy(model(b["images"]), labels[b["image_index"]]))
    grads = []
    for accum in (1, 4):
        model.zero_grad()
        backward(obj, model, batch, accum, CPU, "fp32", NO_SCALER)
        grads.append({n: q.grad.clone() for n, q in model.named_parameters()})
    assert_grads_close(grads[1], grads[0])


def saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """Bytes autograd keeps for backward while `fn` runs: the activations checkpointing trades away."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("tower", ["image", "text"])
def test_grad_checkpointing_saves_activations_with_the_same_gradients(tower):
    model = clip_model(params())
    batch = make_batch(8)
    run = (lambda: model.encode_image(batch["images"])) if tower == "image" else (
        lambda: model.encode_text(batch["tokens"]))
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        out, size = saved_bytes(run)
        out.square().sum().backward()
        results.append((size, {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}))
    (plain, grads), (checkpointed, grads_ckpt) = results
    assert checkpointed < plain / 2, (checkpointed, plain)
    assert_grads_close(grads_ckpt, grads, atol=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [({}, 1), ({"local_loss": True}, 1), ({}, 2), ({"local_loss": True, "loss": "sigmoid", "multi_positive": True}, 2),
         ({"ssl_weight": 1.0}, 1), ({"ssl_weight": 1.0, "local_loss": True}, 2)]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    share = slice(rank * 8, (rank + 1) * 8)
    results = []
    for train, accum in CASES:
        p, batch = params(**train), make_batch(16, ssl="ssl_weight" in train)
        model = clip_model(p)
        loss, grads = clip_grads(p, {k: v[share] for k, v in batch.items()}, accum, DistributedDataParallel(model),
                                 model)
        results.append((loss, grads))
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_loss_and_gradients(tmp_path):
    out = tmp_path / "ranks.pt"
    mp.spawn(_rank, args=(2, free_port(), str(out)), nprocs=2)
    for (train, accum), (loss, grads) in zip(CASES, torch.load(out, weights_only=True)):
        p = params(**train)
        expected_loss, expected = clip_grads(p, make_batch(16, ssl="ssl_weight" in train))
        assert loss == pytest.approx(expected_loss, abs=1e-5), (train, accum)
        assert_grads_close(grads, expected)


def test_batch_must_divide_into_processes_and_micro_batches():
    with pytest.raises(ValueError, match="batch_size=30 must be divisible by nproc x accum_steps = 4"):
        params(batch_size=30, nproc=2, accum_steps=2)


def weights(workdir):
    return load_file(workdir / "models" / "clip.safetensors")


def max_diff(a, b) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def clone(workspace, dest):
    shutil.copytree(workspace / "data", dest / "data")
    shutil.copy(workspace / "params.yaml", dest / "params.yaml")
    return dest


def test_stage_resumed_on_two_processes_matches_one_process(workspace, tmp_path_factory):
    """A one-process run killed mid-way and resumed with train.nproc: 2 (`python -m pipeline.train`
    re-launches itself as N processes) ends with the weights of an uninterrupted one-process run.
    In fp32: bf16 rounds each rank's half-batch activations differently from the whole batch's."""
    fp32 = merge(TINY, {"train": {"precision": "fp32"}})
    write_params(workspace, fp32)
    one = clone(workspace, tmp_path_factory.mktemp("one"))
    run_stage(one, "train")

    kill_at_step(workspace, 4)

    write_params(workspace, merge(fp32, {"train": {"nproc": 2}}))
    out = run_stage(workspace, "train")
    assert "resuming at step" in out.stdout and "'processes': 2" in out.stdout
    assert "unwaited collective" not in out.stderr and "is deprecated" not in out.stderr  # gathers waited, current API
    diff = max_diff(one, workspace)
    print(f"max |w_2proc - w_1proc| = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: precision auto would be fp32")
def test_two_process_stage_trains_in_the_default_precision(workspace):
    """precision: auto (bf16 on CPUs with AMX or AVX512-BF16): gloo gathers the bf16 features."""
    write_params(workspace, merge(TINY, {"train": {"nproc": 2, "epochs": 1}}))
    out = run_stage(workspace, "train")
    assert "'processes': 2" in out.stdout
    assert all(np.isfinite(w).all() for w in weights(workspace).values())


def test_relaunched_ranks_get_the_stage_arguments(workspace):
    """train.nproc > 1 relaunches `python -m pipeline.train` with the paths dvc.yaml passed, not the defaults."""
    write_params(workspace, merge(TINY, {"train": {"nproc": 2, "epochs": 1, "precision": "fp32"}}))
    args = ["--model", "elsewhere", "--metrics", "out/train.json", "--log", "out/log.csv", "--plot", "out/curves.png",
            "--run", "out/run.json"]
    proc = subprocess.run([sys.executable, "-m", "pipeline.train", *args], cwd=workspace, env=stage_env(workspace),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'processes': 2" in proc.stdout
    assert (workspace / "elsewhere/clip.safetensors").exists() and not (workspace / "models").exists()
    assert {f.name for f in (workspace / "out").iterdir()} == {"train.json", "log.csv", "curves.png", "run.json"}
    assert not (workspace / "reports").exists()


PROBE = """
import json, os, sys
import psutil, torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.ones(1)
dist.all_reduce(total)
if dist.get_rank() == 0:
    parent = psutil.Process(os.getppid())
    pids = {parent.pid} | {p.pid for p in parent.children(recursive=True)}
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids]
    json.dump({"sum": total.item(), "listening": listening}, open("probe.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def test_single_machine_ranks_listen_on_loopback_only(tmp_path):
    """train.nproc > 1 relaunches the stage as ranks on this machine: the rendezvous store and gloo
    listen on 127.0.0.1 only, never on every interface (torchrun --standalone's store does)."""
    (tmp_path / "probe_ranks.py").write_text(PROBE)
    proc = subprocess.run([sys.executable, "-c", "from clipmodel.distributed import relaunch; relaunch(2, 'probe_ranks')"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert probe["sum"] == 2 and probe["listening"] and set(probe["listening"]) == {"127.0.0.1"}


@pytest.mark.parametrize("sigterm", ["SIG_DFL", "SIG_IGN"])
def test_a_failing_rank_stops_the_others_and_sets_the_exit_status(tmp_path, sigterm):
    """The others first get time to leave on their own (rank 0 ending its MLflow run after Ctrl-C reached
    a faster rank first): a SIGTERM at once left that run RUNNING. One that stays is stopped: SIGTERM,
    then SIGKILL for one that does not act on it (stuck in a collective, its handler never runs)."""
    (tmp_path / "fail_rank.py").write_text("import os, signal, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\n"
                                           f"signal.signal(signal.SIGTERM, signal.{sigterm})\n"
                                           "time.sleep(2)\nopen('cleaned-up', 'w').close()\ntime.sleep(60)\n")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", "from clipmodel.distributed import relaunch; relaunch(2, 'fail_rank')"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=90)
    grace = distributed.LEAVE_GRACE_S * (1 if sigterm == "SIG_DFL" else 2)
    assert proc.returncode == 3 and (tmp_path / "cleaned-up").exists() and grace <= time.time() - start < grace + 20


PEER_LEAVES = """
import sys, torch, torch.distributed as dist
from clipmodel import distributed

@distributed.reported_once
def main():
    distributed.init(torch.device("cpu"))
    if distributed.rank() == 0:
        raise SystemExit(sys.argv[1] if sys.argv[1] != "130" else 130)
    dist.all_reduce(torch.ones(1))  # waits for rank 0, which has left
main()
"""


PEER_CTRL_C = """
import sys, torch, torch.distributed as dist
from pathlib import Path
from types import SimpleNamespace
from clipmodel import distributed
from pipeline import tracking
from pipeline.stopping import stopped_by_signal

@distributed.reported_once
@tracking.ended_on_error()  # as on the train stage's main: Ctrl-C leaves as SystemExit(130)
def main():
    distributed.init(torch.device("cpu"))
    if distributed.rank() == 1:
        raise KeyboardInterrupt  # Ctrl-C reached this rank first
    with stopped_by_signal("train", SimpleNamespace(step=7, saved=5), True, Path("ckpt.pt"), 10, True):
        try:
            dist.all_reduce(torch.ones(1))  # fails: rank 1 has left
        except KeyboardInterrupt:  # this rank's own Ctrl-C, had it come first: not this test's case
            sys.exit(99)
main()
"""


def test_a_collective_that_fails_because_a_peer_left_on_ctrl_c_counts_as_ctrl_c(tmp_path):
    """Ctrl-C reaches every rank; rank 0, inside a collective when the faster rank 1 left, sees the
    collective fail first. It still says where the run stopped, and leaves as Ctrl-C does (status 130;
    the KeyboardInterrupt it raises ends the MLflow run KILLED), not FAILED and silent."""
    (tmp_path / "peer_ctrl_c.py").write_text(PEER_CTRL_C)
    proc = subprocess.run([sys.executable, "-c", "from clipmodel.distributed import relaunch; relaunch(2, 'peer_ctrl_c')"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130 and proc.stderr.splitlines() == [
        "train: stopped at step 7/10; ckpt.pt holds step 5: rerun the stage to resume there"], proc.stderr


@pytest.mark.parametrize("why, status, stderr", [
    ("rank 0: bad input", 1, ["rank 0: bad input", "rank 1: stopped: rank 0 left (its message says why)"]),
    ("130", 130, []),  # Ctrl-C: rank 0 has said where it stopped
])
def test_a_rank_that_loses_its_peer_says_so_in_one_line(tmp_path, why, status, stderr):
    """One failure, one report: the rank whose collective fails because its peer left prints one line,
    not a gloo traceback ("Connection closed by peer")."""
    (tmp_path / "peer_leaves.py").write_text(PEER_LEAVES)
    proc = subprocess.run([sys.executable, "-c", f"from clipmodel.distributed import relaunch; relaunch(2, 'peer_leaves', ['{why}'])"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status and sorted(proc.stderr.splitlines()) == stderr, proc.stderr
