"""The training loop every objective shares (CLIP, the supervised baseline, the efficiency study).

`fit` trains an `Objective`: the model, its loss on a batch and hooks around the step. Resumable
mid-epoch: a checkpoint holds the model, optimiser, scheduler, scaler, RNG states and the global
step, and every batch is a function of (seed, step), so a run killed at any point and resumed ends
with the same weights as one that never stopped.

Data-parallel: every rank calls `fit` with the same arguments. Batch k is still the global batch k;
each rank trains on its contiguous slice, the objective gathers features across ranks where its
loss couples the batch, and DDP averages the gradients. Checkpoints hold no per-rank state, so a
run resumes on any number of ranks.
"""
from __future__ import annotations

import csv
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from clipmodel import distributed
from clipmodel.data import ContrastiveBatches
from clipmodel.io import atomic_path
from clipmodel.model import param_groups
from clipmodel.stream import StreamingBatches
from pipeline import tracking
from pipeline.params import TrainParams

Batch = dict[str, torch.Tensor]


@dataclass
class Objective:
    """What `fit` trains: the model, its loss on a batch, and hooks around the step.

    `loss` alone must be a mean over samples: accumulation then averages micro-batch losses, which is
    exact. A loss that couples the batch (contrastive) also gives its two halves, `features(net, batch)`
    (the forward pass through `net`, the module fit hands over: the DDP wrapper when data-parallel),
    returning per-sample tensors [B, ...] and shared 0-dim tensors (the temperature), and
    `loss_from_features(features, batch)`. Then accumulation caches the features (GradCache) and the
    objective can train data-parallel.
    """
    model: nn.Module
    loss: Callable[[Batch], torch.Tensor]
    after_step: Callable[[], None] = lambda: None
    step_metrics: Callable[[], dict[str, float]] = dict    # logged with the loss, e.g. the logit scale
    validate: Callable[[], dict[str, float]] = dict        # run at every epoch end
    on_step: Callable[[int], None] = lambda step: None     # after each optimiser step, with the steps done
    checkpoint: Path = Path("checkpoints/train.pt")
    log_csv: Path = Path("reports/train_log.csv")
    features: Callable[[nn.Module, Batch], tuple[torch.Tensor, ...]] | None = None
    loss_from_features: Callable[[tuple[torch.Tensor, ...], Batch], torch.Tensor] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train: params.yaml train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' is bf16 autocast where bf16 matmuls run natively (CUDA with bf16, CPUs with AMX or
    AVX512-BF16: 1.4x the fp32 step on this CPU, same accuracy) and fp32 elsewhere, where emulated
    bf16 is slower than fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast for a resolved precision (fp32, bf16, fp16): resolve 'auto' once, outside the step."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        print(f"train: {path} is from other params or data; starting fresh")
        return None
    return state


def _read_log(path: Path, upto: int) -> list[dict]:
    if upto == 0 or not path.exists():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f) if float(row["step"]) <= upto]


def _write_log(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        # a run resumed from an older checkpoint may log more columns than its first rows have
        fields = list(dict.fromkeys(k for row in rows for k in row)) or ["step", "loss"]
        writer = csv.DictWriter(f, fieldnames=fields, restval="nan")
        writer.writeheader()
        writer.writerows(rows)


def micro_batches(batch: Batch, n: int) -> list[Batch]:
    size = len(batch["images"]) // n
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(n)]


def backward(obj: Objective, net: nn.Module, batch: Batch, accum: int, device: torch.device, precision: str,
             scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Forward and backward of this rank's share of a batch in `accum` micro-batches, leaving the
    batch's gradients in .grad. Returns the loss, averaged over ranks so that all agree on it."""
    if obj.features is None:
        total = torch.zeros((), device=device)
        for part in micro_batches(batch, accum):
            with autocast(device, precision):
                loss = obj.loss(part) / accum
            scaler.scale(loss).backward()
            total += loss.detach()
        return total
    if accum == 1:
        with autocast(device, precision):
            loss = obj.loss_from_features(obj.features(net, batch), batch)
        scaler.scale(loss).backward()
        return distributed.mean(loss.detach())
    return grad_cache(obj, net, batch, accum, device, precision, scaler)


def grad_cache(obj: Objective, net: nn.Module, batch: Batch, accum: int, device: torch.device, precision: str,
               scaler: torch.amp.GradScaler) -> torch.Tensor:
    """Exact accumulation for a loss that couples the whole batch (GradCache, Gao et al. 2021).

    Micro-batch features are computed without a graph, the loss and its gradient w.r.t. those
    features on the full batch, then each micro-batch is re-run with a graph and back-propagates its
    slice of that gradient: the same parameter gradient as one big batch, with one micro-batch's
    activations in memory. The shared scalars' gradient (the temperature's) goes back once, in the
    last re-run, which is also the only one DDP synchronises. The model is dropout-free and the
    re-run sees the same tensors, so it reproduces the cached features; BatchNorm normalises with each
    micro-batch's statistics, which is the one way this differs from a big batch.
    """
    parts = micro_batches(batch, accum)
    buffers = [b.clone() for b in obj.model.buffers()]
    with torch.no_grad(), autocast(device, precision):
        cached = [obj.features(net, part) for part in parts]
    for b, saved in zip(obj.model.buffers(), buffers):  # running statistics: updated once, by the re-run
        b.copy_(saved)
    leaves = tuple((torch.cat(f) if f[0].ndim else f[0]).detach().requires_grad_() for f in zip(*cached))
    with autocast(device, precision):
        loss = obj.loss_from_features(leaves, batch)
    scaler.scale(loss).backward()
    size = len(parts[0]["images"])
    for i, part in enumerate(parts):
        last = i == accum - 1
        sync = nullcontext() if last or not isinstance(net, DistributedDataParallel) else net.no_sync()
        with sync, autocast(device, precision):
            grads = [leaf.grad[i * size:(i + 1) * size] if leaf.ndim else leaf.grad * last for leaf in leaves]
            surrogate = sum((f.float() * g.float()).sum() for f, g in zip(obj.features(net, part), grads))
        surrogate.backward()
    return distributed.mean(loss.detach())


def fit(obj: Objective, data: ContrastiveBatches | StreamingBatches, tp: TrainParams, device: torch.device, total: int,
        fingerprint: str, state: dict | None, run_id: str | None) -> list[dict]:
    """The training loop shared by every objective: `total` steps of `data` (epochs wrap around).

    Every rank calls it with the same arguments; rank 0 alone logs, validates and writes files.
    Returns the logged rows (step, loss, lr, ...)."""
    model = obj.model
    world, rank, main = distributed.world(), distributed.rank(), distributed.is_main()
    if tp.batch_size % (world * tp.accum_steps):
        raise SystemExit(f"train: train.batch_size={tp.batch_size} must be divisible by {world} process(es) "
                         f"x train.accum_steps={tp.accum_steps}")
    if world > 1 and obj.features is None:
        raise SystemExit("train: data-parallel training needs an Objective with features and loss_from_features")
    opt = torch.optim.AdamW(param_groups(model, tp.weight_decay, tp.vision_lr), lr=tp.lr, betas=tp.betas, eps=tp.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(round(tp.warmup_fraction * total), total))
    precision = resolve_precision(tp.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start = state["step"]
        if main:
            print(f"train: resuming at step {start}/{total}")
    net = model
    if world > 1:
        if device.type == "cuda":  # batch statistics over the global batch, as on one GPU (gloo has no SyncBatchNorm)
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    if tp.compile:
        model.compile()

    def save(step: int) -> None:
        snapshot = {"step": step, "fingerprint": fingerprint, "run_id": run_id, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "log": rows}  # the curve so far: outputs deleted since (dvc repro -f) are rebuilt on resume
        with atomic_path(obj.checkpoint) as tmp:
            torch.save(snapshot, tmp)

    log = tracking.mlflow.active_run() is not None
    pin = device.type == "cuda"
    if isinstance(data, StreamingBatches):  # each rank streams its own share; a resumed run draws a fresh stream
        data.start_step = start
        loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=tp.workers, pin_memory=pin)
        share = slice(None)
    else:  # batch k is the global batch k: each rank takes its contiguous rows
        loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, total),
                                             num_workers=tp.workers, pin_memory=pin)
        share = slice(rank * tp.batch_size // world, (rank + 1) * tp.batch_size // world)
    rows: list[dict] = []
    if main and state is not None:  # older checkpoints hold no curve: read it back from the CSV
        rows = state.get("log") or _read_log(obj.log_csv, start)
        _write_log(obj.log_csv, rows)
    bad, t_last, n_last = 0, time.perf_counter(), 0
    model.train()
    bar = tqdm(zip(range(start, total), loader), total=total, initial=start, desc="train", unit="step",
               dynamic_ncols=True, disable=not main,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # logs (DVC, Prefect) get a line every 30 s
    for step, batch in bar:
        n_last += tp.batch_size
        batch = {k: v[share].to(device, non_blocking=True) for k, v in batch.items()}
        loss = backward(obj, net, batch, tp.accum_steps, device, precision, scaler)
        if not torch.isfinite(loss):
            bad += 1
            opt.zero_grad(set_to_none=True)
            sched.step()  # the data position moves on; the skipped batch is not retried
            if log:
                tracking.mlflow.log_metric("skipped_steps", bad, step=step)
            if bad >= tp.max_bad_steps:
                raise SystemExit(f"train: {bad} non-finite losses in a row at step {step}; "
                                 f"stopped, last good checkpoint kept at {obj.checkpoint}")
            continue
        bad = 0
        if tp.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        obj.after_step()
        if not main:
            continue
        obj.on_step(step + 1)
        if (step + 1) % tp.log_every == 0 or step + 1 == total:
            now = time.perf_counter()
            lrs = sched.get_last_lr()  # param_groups puts the image tower's groups last
            metrics = {"loss": loss.item(), "lr": lrs[0], **({"vision_lr": lrs[-1]} if tp.vision_lr else {}),
                       **obj.step_metrics(),
                       "samples_per_s": n_last / (now - t_last)}
            t_last, n_last = now, 0
            rows.append({"step": step + 1, **metrics})
            if log:
                tracking.mlflow.log_metrics(metrics, step=step + 1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items()})
        if (step + 1) % len(data) == 0:
            model.eval()
            val = obj.validate()
            model.train()
            if log and val:
                tracking.mlflow.log_metrics({**val, "epoch": (step + 1) // len(data)}, step=step + 1)
            bar.write(f"epoch {(step + 1) // len(data)}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if (step + 1) % tp.checkpoint_every == 0 or step + 1 == total:
            _write_log(obj.log_csv, rows)
            save(step + 1)
    bar.close()
    return rows
