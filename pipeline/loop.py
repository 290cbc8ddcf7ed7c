"""The training loop every objective shares (CLIP, the supervised baseline, the efficiency study).

`fit` trains an `Objective`: the model, its loss on a batch and hooks around the step. Resumable
mid-epoch: a checkpoint holds the model, optimiser, scheduler, scaler, RNG states and the global
step, and every batch is a function of (seed, step), so a run killed at any point and resumed ends
with the same weights as one that never stopped.

Data-parallel: every rank calls `fit` with the same arguments. Batch k is still the global batch k;
each rank trains on its contiguous slice, the objective gathers features across ranks where its
loss couples the batch, and DDP averages the gradients. Checkpoints hold no per-rank state, so a
run resumes on any number of ranks.

On a GPU the step never waits for the device: the non-finite-loss check stays there (the fused AdamW
skips a bad step itself) and is read back only where the loop needs a value anyway (log, validation
and checkpoint steps), and batches travel as uint8 pixels, normalised and cropped on the GPU. On the
CPU, where nothing is asynchronous, the step is the plain one (the check at every step).
"""
from __future__ import annotations

import csv
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from clipmodel import distributed
from clipmodel.data import finish_batch
from clipmodel.io import Claimed, atomic_path, claim
from clipmodel.model import param_groups
from pipeline.device import autocast, resolve_precision
from pipeline.params import TrainParams
from pipeline.stopping import stopped_by_signal

Batch = dict[str, torch.Tensor]


class BatchSource(Protocol):
    """What `fit` trains on (clipmodel.data.CorpusBatches, clipmodel.stream.StreamingBatches):
    len() is the steps per epoch; rank_batches yields this rank's share of global batches (with
    raw_pixels, uint8 pixels that clipmodel.data.finish_batch turns into images on the device)."""

    def __len__(self) -> int: ...

    def rank_batches(self, start: int, total: int, workers: int, pin_memory: bool,
                     raw_pixels: bool = False) -> Iterable[Batch]: ...


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
    name: str = "train"  # the stage, in the progress bar and in fit's messages
    log_csv: Path = Path("reports/train_log.csv")
    features: Callable[[nn.Module, Batch], tuple[torch.Tensor, ...]] | None = None
    loss_from_features: Callable[[tuple[torch.Tensor, ...], Batch], torch.Tensor] | None = None


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LambdaLR's multiplier at a step: linear from 1/warmup to 1 over `warmup` steps, then a half
    cosine to 0 at `total` (Loshchilov & Hutter 2017, SGDR, without restarts)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def open_checkpoint(path: Path, fingerprint: str, resume: bool) -> dict | None:
    """Claim `path` for this process (clipmodel.io.claim), then return its snapshot when `resume` and it
    was written for `fingerprint` (the same params and data); None: start fresh (and say why when a
    snapshot was set aside). Without the claim a stage rerun while an earlier one still trains (stopping
    only the `dvc` process leaves its stage running) would interleave two runs' snapshots.
    Raises: SystemExit (one line) naming the other process when it holds the claim."""
    try:
        claim(path)
    except Claimed as e:
        raise SystemExit(f"{path} is being written by another training, pid {e.pid} (a stage goes on when only its "
                         f"dvc process is stopped): wait for it to end or stop it as Ctrl-C does (kill -INT {e.pid}), "
                         "then rerun") from None
    if not resume or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        print(f"train: {path} is from other params or data; starting fresh")
        return None
    return state


def micro_batches(batch: Batch, n: int) -> list[Batch]:
    """`batch` cut into `n` equal consecutive slices along the batch axis (check_layout made it divide)."""
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


def checks_on_device(device: torch.device, precision: str) -> bool:
    """Whether the step keeps its non-finite-loss check on the device (CUDA, except fp16, whose grad
    scaler has a check of its own): see `train_step`."""
    return device.type == "cuda" and precision != "fp16"


class TrainState:
    """What a checkpoint holds: the model, AdamW, the warmup-cosine schedule, the grad scaler, the
    RNG states, the global step and the logged curve. Saved and restored here and nowhere else.

    `deferred` (default: `checks_on_device`): AdamW is the fused one, which skips a step on the device
    when told so (`found_inf`), and the counts of non-finite losses live on the device until
    `bad_steps` reads them."""

    def __init__(self, model: nn.Module, tp: TrainParams, total: int, device: torch.device, precision: str,
                 deferred: bool | None = None):
        self.model, self.step, self.rows = model, 0, []
        self.saved = 0  # the step the checkpoint on disk holds (0: none yet)
        self.deferred = checks_on_device(device, precision) if deferred is None else deferred
        self.opt = torch.optim.AdamW(param_groups(model, tp.weight_decay, tp.vision_lr), lr=tp.lr, betas=tp.betas,
                                     eps=tp.eps, **({"fused": True} if self.deferred else {}))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(round(tp.warmup_fraction * total), total))
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
        self._bad_run: torch.Tensor | None = None    # non-finite losses in a row, on the device (deferred)
        self._bad_worst: torch.Tensor | None = None  # the longest such run since bad_steps last read it

    def restore(self, snapshot: dict) -> None:
        self.model.load_state_dict(snapshot["model"])
        # the implementation (fused on a GPU, torch's for-loop one on the CPU) is this run's, whichever saved it
        saved = snapshot["optimizer"]
        impl = {k: self.opt.param_groups[0][k] for k in ("fused", "foreach")}
        self.opt.load_state_dict({**saved, "param_groups": [{**g, **impl} for g in saved["param_groups"]]})
        self.sched.load_state_dict(snapshot["scheduler"])
        self.scaler.load_state_dict(snapshot["scaler"])
        torch.set_rng_state(snapshot["torch_rng"])
        if snapshot["cuda_rng"]:
            torch.cuda.set_rng_state_all(snapshot["cuda_rng"])
        self.step = self.saved = snapshot["step"]
        self.rows = snapshot.get("log") or []

    def save(self, path: Path, fingerprint: str, run_id: str | None) -> None:
        snapshot = {"step": self.step, "fingerprint": fingerprint, "run_id": run_id, "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "scaler": self.scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "log": self.rows}  # the curve so far: outputs deleted since (dvc repro -f) are rebuilt on resume
        with atomic_path(path) as tmp:
            torch.save(snapshot, tmp)
        self.saved = self.step

    def count_bad(self, finite: torch.Tensor) -> None:
        """Count a step's 0-dim bool `finite` on its device, without reading it back."""
        if self._bad_run is None:
            self._bad_run = self._bad_worst = torch.zeros((), dtype=torch.int64, device=finite.device)
        self._bad_run = torch.where(finite, 0, self._bad_run + 1)
        self._bad_worst = torch.maximum(self._bad_worst, self._bad_run)

    def bad_steps(self) -> tuple[int, int]:
        """(non-finite losses in a row up to the last step, the longest such run in the steps since the
        previous call, counting from its start before that call): one read-back from the device."""
        if self._bad_run is None:
            return 0, 0
        run, worst = torch.stack([self._bad_run, self._bad_worst]).tolist()
        self._bad_worst = torch.zeros_like(self._bad_run)
        return run, worst


def train_step(obj: Objective, net: nn.Module, state: TrainState, batch: Batch, tp: TrainParams,
               device: torch.device, precision: str) -> torch.Tensor:
    """One optimiser step on this rank's share of a batch: forward and backward in tp.accum_steps
    micro-batches (`backward`), clipping, the update and the schedule. Returns the 0-dim loss. When it
    is not finite the update is skipped, the schedule (and the data) move on, and `TrainState.bad_steps`
    counts it.

    With state.deferred (on a GPU) the same happens without the host waiting for the loss: the fused
    AdamW is handed the non-finite flag as `found_inf` and leaves weights, moments and its step count
    alone where it is set."""
    loss = backward(obj, net, batch, tp.accum_steps, device, precision, state.scaler)
    finite = torch.isfinite(loss)
    state.count_bad(finite)
    if state.deferred:
        state.opt.found_inf = (~finite).float()
    elif not finite:
        state.opt.zero_grad(set_to_none=True)
        state.sched.step()
        return loss
    if tp.grad_clip > 0:
        state.scaler.unscale_(state.opt)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), tp.grad_clip)
    state.scaler.step(state.opt)
    state.scaler.update()
    state.opt.zero_grad(set_to_none=True)
    state.sched.step()
    obj.after_step()  # deferred and skipped: the clamp of unchanged weights changes nothing
    return loss


class CsvLog:
    """The curve as reports/<stage>_log.csv: rows kept in memory, the file rewritten at checkpoints."""

    def __init__(self, path: Path, rows: list[dict], start: int):
        self.path, self.rows = path, rows
        if start and not rows and path.exists():  # older checkpoints hold no curve: read it back from the CSV
            with open(path) as f:
                rows += [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f) if float(row["step"]) <= start]
        if start:
            self.write()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append({"step": step, **metrics})

    def write(self) -> None:
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            # a run resumed from an older checkpoint may log more columns than its first rows have
            fields = list(dict.fromkeys(k for row in self.rows for k in row)) or ["step", "loss"]
            writer = csv.DictWriter(f, fieldnames=fields, restval="nan")
            writer.writeheader()
            writer.writerows(self.rows)


def check_layout(obj: Objective, tp: TrainParams, world: int) -> None:
    """Raises SystemExit (one line) when the batch does not split into ranks x micro-batches, or the
    objective cannot train data-parallel."""
    if tp.batch_size % (world * tp.accum_steps):
        raise SystemExit(f"{obj.name}: train.batch_size={tp.batch_size} must be divisible by {world} process(es) "
                         f"x train.accum_steps={tp.accum_steps}")
    if world > 1 and obj.features is None:
        raise SystemExit(f"{obj.name}: data-parallel training needs an Objective with features and loss_from_features")


class Throughput:
    """Samples per second since the previous call (every step counts, skipped ones too)."""

    def __init__(self, step: int, batch_size: int):
        self.clock, self.step, self.batch_size = time.perf_counter(), step, batch_size

    def __call__(self, step: int) -> float:
        now = time.perf_counter()
        rate = (step - self.step) * self.batch_size / (now - self.clock)
        self.clock, self.step = now, step
        return rate


Log = Callable[[int, dict[str, float]], None]  # (step, metrics): a sink for the curve (CSV, MLflow, tqdm)


def fit(obj: Objective, data: BatchSource, tp: TrainParams, device: torch.device, total: int,
        fingerprint: str, snapshot: dict | None, run_id: str | None, log: Log | None = None) -> list[dict]:
    """The training loop shared by every objective: `total` steps of `data` (epochs wrap around),
    resumed from `snapshot` (a checkpoint matching `fingerprint`) when given. `log` receives every
    logged row and validation result besides the CSV and the progress bar (the stages pass MLflow's).

    Every rank calls it with the same arguments; rank 0 alone logs, validates and writes files.
    Returns the logged rows (step, loss, lr, ...). Raises SystemExit (one line) when the batch does
    not divide into ranks x micro-batches, or after tp.max_bad_steps non-finite losses in a row."""
    world, main, gpu = distributed.world(), distributed.is_main(), device.type == "cuda"
    log = log if main else None
    check_layout(obj, tp, world)
    precision = resolve_precision(tp.precision, device)
    state = TrainState(obj.model, tp, total, device, precision)
    if snapshot is not None:
        state.restore(snapshot)
        if main:
            print(f"{obj.name}: resuming at step {state.step}/{total}")
    net = parallel(obj.model, world, device, tp.compile)
    csv_log, speed = CsvLog(obj.log_csv, state.rows, state.step) if main else None, Throughput(state.step, tp.batch_size)
    batches = data.rank_batches(state.step, total, tp.workers, pin_memory=gpu, raw_pixels=gpu)
    obj.model.train()
    # logs (DVC, Prefect) get a line every 30 s; the bar closes before an error's message is printed
    with stopped_by_signal(obj.name, state, tp.resume, obj.checkpoint, total, main) as stop_asked, \
            tqdm(total=total, initial=state.step, desc=obj.name, unit="step", dynamic_ncols=True, disable=not main,
                 mininterval=0.5 if sys.stderr.isatty() else 30) as bar:

        def postfix(step: int, row: dict[str, float]) -> None:  # shown at the bar's next refresh: one per row
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items()}, refresh=False)  # would defeat mininterval
        sinks = [s for s in (csv_log, log, postfix) if s]
        stop = False  # Ctrl-C or SIGTERM came during the previous step: that step was saved, the run stops here
        for step, batch in zip(range(state.step, total), batches):
            if stop:
                raise stop_asked()
            batch = finish_batch({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            loss = train_step(obj, net, state, batch, tp, device, precision)
            state.step = done = step + 1
            bar.update()
            epoch_end, last, stop = done % len(data) == 0, done == total, stop_asked() is not None
            log_now = done % tp.log_every == 0 or last
            save_now = done % tp.checkpoint_every == 0 or epoch_end or last or stop  # a short run saves at epoch ends too
            if state.deferred and not (log_now or save_now):  # nothing below reads the device
                if main:
                    obj.on_step(done)
                continue
            bad = skipped(obj, state, tp, step, log)
            if not main:
                continue
            obj.on_step(done)  # after a skipped step too, as on the device path above
            if bad:
                continue
            if log_now:
                row = step_metrics(obj, state, tp, loss, speed(done)) | peak_memory(device)
                for sink in sinks:
                    sink(done, row)
            if epoch_end:
                validate(obj, done // len(data), done, bar, log)
            if save_now:
                csv_log.write()
                state.save(obj.checkpoint, fingerprint, run_id)
    return state.rows


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory so far (MiB; Linux's ru_maxrss is in KiB) and, on a GPU, the
    peak that torch allocated there. Logged in every row, so that the peaks survive a resume: a process
    that resumes a finished run trains nothing, and its own peak says nothing of the training."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return peaks | ({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {})


def run_peaks(rows: list[dict]) -> dict[str, float]:
    """The run's peak memory from its logged rows (`peak_memory`), whichever processes logged them;
    a key that no row holds (all logged by code from before the columns) is left out, not guessed."""
    return {k: max(r[k] for r in rows if k in r) for k in ("peak_rss_mb", "peak_gpu_mb") if any(k in r for r in rows)}


def median_samples_per_s(rows: list[dict]) -> float:
    """The run's throughput from its logged rows: the median, without the first row (compilation,
    allocation and caches warm up there) unless it is the only one."""
    return float(np.median([r["samples_per_s"] for r in rows[1:] or rows]))


def parallel(model: nn.Module, world: int, device: torch.device, compile: bool) -> nn.Module:
    """The module the step runs through: DDP-wrapped when data-parallel (with SyncBatchNorm on CUDA,
    so batch statistics cover the global batch as on one GPU; gloo has none), compiled if asked."""
    net = model
    if world > 1:
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
    if compile:
        model.compile()
    return net


def skipped(obj: Objective, state: TrainState, tp: TrainParams, step: int, log: Log | None) -> bool:
    """Whether the last step's update was skipped for a non-finite loss (one read-back from the device;
    the count goes to `log`). Raises SystemExit (one line) after tp.max_bad_steps of them in a row."""
    bad, worst = state.bad_steps()
    if bad and log:
        log(step, {"skipped_steps": bad})
    if worst >= tp.max_bad_steps:
        raise SystemExit(f"{obj.name}: {worst} non-finite losses in a row by step {step}; stopped, "
                         f"last good checkpoint kept at {obj.checkpoint}")
    return bad > 0


def step_metrics(obj: Objective, state: TrainState, tp: TrainParams, loss: torch.Tensor,
                 samples_per_s: float) -> dict[str, float]:
    """One row of the curve: loss, learning rates, the objective's own metrics and throughput."""
    lrs = state.sched.get_last_lr()  # param_groups puts the image tower's groups last
    return {"loss": loss.item(), "lr": lrs[0], **({"vision_lr": lrs[-1]} if tp.vision_lr else {}),
            **obj.step_metrics(), "samples_per_s": samples_per_s}


def validate(obj: Objective, epoch: int, step: int, bar: tqdm, log: Log | None) -> None:
    """obj.validate at an epoch's end, in eval mode; its metrics go to `log` and the console."""
    obj.model.eval()
    val = obj.validate()
    obj.model.train()
    if val:  # nothing to say without a val split
        if log:
            log(step, {**val, "epoch": epoch})
        bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
