"""Stage `train`: contrastive CLIP training from the ingest/tokenize outputs, tracked in MLflow.

`fit` is the one training loop; what it trains and how the loss is computed is an `Objective`
(CLIP's contrastive loss here, cross-entropy for the supervised baseline). Resumable mid-epoch: a
checkpoint holds the model, optimiser, scheduler, scaler, RNG states and the global step, and
every batch is a function of (seed, step), so a run killed at any point and resumed ends with the
same weights as one that never stopped.

Data-parallel: with train.nproc > 1 the stage re-launches itself through torchrun (or is started by
torchrun directly, on one or several nodes). Batch k is still the global batch k; each rank trains
on its contiguous slice, features are gathered across ranks for the contrastive loss, and DDP
averages the gradients. Checkpoints hold no per-rank state, so a run resumes on any number of ranks.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from clipmodel import distributed
from clipmodel.checkpoint import save_safetensors
from clipmodel.data import MEAN, STD, ContrastiveBatches, Corpus, to_tensor
from clipmodel.io import atomic_path, write_json
from clipmodel.loss import contrastive_loss, positives_from_ids, sigmoid_loss
from clipmodel.model import CLIP, CLIPConfig, param_groups
from clipmodel.stream import StreamingBatches
from clipmodel.retrieval import ranks, summarize
from clipmodel.tokenizer import load_tokenizer, trim_padding
from pipeline import tracking
from pipeline.params import Params, TrainParams, load_params
from pipeline.plots import plot_training_curves

DATA = Path("data")
MODELS = Path("models")
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


def model_config(p: Params, vocab_size: int) -> CLIPConfig:
    m = p.model
    return CLIPConfig(
        embed_dim=m.embed_dim, image_size=p.data.image_size, vision=m.vision,
        vision_width=m.vision_width, vision_layers=m.vision_layers, vision_heads=m.vision_heads,
        vision_patch_size=m.vision_patch_size, context_length=p.tokenize.context_length,
        vocab_size=vocab_size, text_width=m.text_width, text_heads=m.text_heads,
        text_layers=m.text_layers,
        init_logit_bias=-10.0 if p.train.loss == "sigmoid" else None,
    )


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def run_fingerprint(p: Params, data_fp: str, kind: str) -> str:
    """What a checkpoint must match to be resumed: every setting that changes the weights."""
    train = p.train.model_dump(exclude={"resume", "log_every", "checkpoint_every", "workers", "device", "nproc",
                                        "local_loss", "grad_checkpointing", "compile"})
    blob = json.dumps([kind, p.model.model_dump(), train, p.tokenize.model_dump(), p.data.image_size, data_fp],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))
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
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["step", "loss"])
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
    opt = torch.optim.AdamW(param_groups(model, tp.weight_decay), lr=tp.lr, betas=tp.betas, eps=tp.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tp.warmup_steps, total))
    scaler = torch.amp.GradScaler(device.type, enabled=tp.precision == "fp16" and device.type == "cuda")
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
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
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
    rows = _read_log(obj.log_csv, start) if main else []
    bad, t_last, n_last = 0, time.perf_counter(), 0
    model.train()
    bar = tqdm(zip(range(start, total), loader), total=total, initial=start, desc="train", unit="step",
               dynamic_ncols=True, disable=not main,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # logs (DVC, Prefect) get a line every 30 s
    for step, batch in bar:
        n_last += tp.batch_size
        batch = {k: v[share].to(device, non_blocking=True) for k, v in batch.items()}
        loss = backward(obj, net, batch, tp.accum_steps, device, tp.precision, scaler)
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
            metrics = {"loss": loss.item(), "lr": sched.get_last_lr()[0], **obj.step_metrics(),
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


def clip_loss(p: Params, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              caption_ids: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    positives = positives_from_ids(caption_ids) if p.train.multi_positive else None
    if p.train.loss == "sigmoid":
        return sigmoid_loss(image, text, scale, bias, positives, rows)
    return contrastive_loss(image, text, scale, positives, rows)


def clip_objective(model: CLIP, p: Params) -> Callable[[Batch], torch.Tensor]:
    """The loss of one batch in one process."""
    def loss(batch: Batch) -> torch.Tensor:
        image, text, scale = model(batch["images"], batch["tokens"])
        return clip_loss(p, image, text, scale, model.logit_bias, batch["caption_ids"])
    return loss


def clip_split(model: CLIP, p: Params) -> tuple[Callable, Callable]:
    """`clip_objective` as Objective.features and .loss_from_features. The loss sees the global batch:
    every rank's features are gathered with their gradients, so each rank's images meet all texts
    as negatives. With train.local_loss a rank computes only its own rows of the logit matrices
    (against all columns): O(B/N x B) memory instead of O(B x B), the same gradients."""
    def features(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, ...]:
        image, text, scale = net(batch["images"], batch["tokens"])
        return (image, text, scale) if model.logit_bias is None else (image, text, scale, model.logit_bias)

    def loss_from_features(features: tuple[torch.Tensor, ...], batch: Batch) -> torch.Tensor:
        image, text, scale, *bias = features
        n, r = len(image), distributed.rank()
        rows = slice(r * n, (r + 1) * n) if p.train.local_loss else None
        return clip_loss(p, distributed.gather(image), distributed.gather(text), scale, bias[0] if bias else None,
                         distributed.gather(batch["caption_ids"]), rows)
    return features, loss_from_features


@torch.no_grad()
def validate(model: CLIP, corpus: Corpus, p: Params, device: torch.device) -> dict[str, float]:
    """Validation loss (in training-size batches) and image->text retrieval R@1 on the val split."""
    index = corpus.split("val")
    if len(index) == 0:
        return {}
    caption = corpus.caption_start[index]  # each image's first caption
    images, texts, losses = [], [], []
    bs = p.train.batch_size
    for s in range(0, len(index), bs):
        batch = {"images": to_tensor(corpus.images(index[s:s + bs])).to(device),
                 "tokens": torch.from_numpy(trim_padding(corpus.tokens[caption[s:s + bs]]).astype(np.int64)).to(device),
                 "caption_ids": torch.from_numpy(corpus.caption_ids()[caption[s:s + bs]]).to(device)}
        with autocast(device, p.train.precision):
            img, txt, scale = model(batch["images"], batch["tokens"])
            if len(img) > 1:
                losses.append(clip_loss(p, img, txt, scale, model.logit_bias, batch["caption_ids"]).item())
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
    keys = torch.from_numpy(corpus.caption_ids()[caption].reshape(-1, 1).astype(np.int64))
    r = summarize(ranks(torch.cat(images), torch.cat(texts), keys, keys))
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "val_r1": r["r1"]}


def training_batches(p: Params, corpus: Corpus) -> ContrastiveBatches | StreamingBatches:
    """The train split as random-access batches (npy shards, bit-exact resume) or streamed from the
    WebDataset shards ingest wrote with data.output_format: webdataset (bounded memory, any size)."""
    if p.data.output_format == "npy":
        return ContrastiveBatches(corpus, corpus.split("train"), p.train.batch_size, p.train.seed, p.train.crop_scale)
    if not corpus.tars:
        raise SystemExit(f"train: data.output_format is webdataset but {DATA}/images holds no train-*.tar; "
                         "run `dvc repro ingest`")
    return StreamingBatches([str(t) for t in corpus.tars], DATA / "tokenizer.json",
                            batch_size=p.train.batch_size // distributed.world(), image_size=p.data.image_size,
                            seed=p.train.seed, crop_scale=p.train.crop_scale, resample=True,
                            epoch_samples=len(corpus.split("train")))


def main() -> None:
    p = load_params()
    if p.train.nproc > 1 and not distributed.launched():
        distributed.relaunch(p.train.nproc, "pipeline.train")
    torch.manual_seed(p.train.seed)
    device = resolve_device(p.train.device)
    distributed.init(device)
    corpus = Corpus.load(DATA)
    tok = load_tokenizer(DATA / "tokenizer.json")
    cfg = model_config(p, tok.get_vocab_size())
    model = CLIP(cfg).to(device)
    model.set_grad_checkpointing(p.train.grad_checkpointing)
    data = training_batches(p, corpus)

    data_fp = tracking.data_fingerprint([DATA / "manifest.parquet", DATA / "tokens.npy"])
    fingerprint = run_fingerprint(p, data_fp, "clip")
    features, loss_from_features = clip_split(model, p)
    obj = Objective(model, clip_objective(model, p), after_step=model.clamp_logit_scale_,
                    step_metrics=lambda: {"logit_scale": model.logit_scale.exp().item()},
                    validate=lambda: validate(model, corpus, p, device),
                    features=features, loss_from_features=loss_from_features)
    main_rank = distributed.is_main()
    state = distributed.broadcast(load_checkpoint(obj.checkpoint, fingerprint) if p.train.resume and main_rank else None)
    run_id = None
    if main_rank:
        run_id = tracking.start_run(f"clip-{p.data.source}", state and state["run_id"], tracking.pipeline_tags(data_fp))
        if state is None:
            tracking.mlflow.log_params(tracking.flatten(p.model_dump()))
            tracking.mlflow.log_params({"data_fingerprint": data_fp, "train_images": len(corpus.split("train")),
                                        "precision_used": resolve_precision(p.train.precision, device),
                                        "total_steps": p.train.epochs * len(data),
                                        "parameters": sum(x.numel() for x in model.parameters())})
    rows = fit(obj, data, p.train, device, p.train.epochs * len(data), fingerprint, state, run_id)
    processes = distributed.world()
    distributed.finish()
    if not main_rank:
        return
    save_model(model, cfg, p, data_fp)
    plot = plot_training_curves(obj.log_csv, Path("reports/plots/train_curves.png"))
    speeds = [r["samples_per_s"] for r in rows[1:]] or [float("nan")]
    summary = {"steps": int(rows[-1]["step"]), "final_loss": rows[-1]["loss"],
               "samples_per_s": float(np.median(speeds)), "processes": processes,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    write_json("reports/train.json", summary)
    tracking.mlflow.log_metrics({"train_samples_per_s": summary["samples_per_s"], "peak_rss_mb": summary["peak_rss_mb"]})
    tracking.mlflow.log_artifact(str(MODELS / "config.json"))
    tracking.mlflow.log_artifact(str(plot), "plots")
    tracking.mlflow.end_run()
    print(f"train: wrote {MODELS}/clip.safetensors; {summary}")


def save_model(model: CLIP, cfg: CLIPConfig, p: Params, data_fp: str) -> None:
    """models/: weights, tokenizer and a config that rebuilds the model without params.yaml.

    Each file is replaced atomically; the folder itself stays, since export writes models/onnx beside them.
    """
    save_safetensors(model, MODELS / "clip.safetensors")
    with atomic_path(MODELS / "tokenizer.json") as tmp:
        shutil.copy(DATA / "tokenizer.json", tmp)
    write_json(MODELS / "config.json", {
        "model": cfg.to_dict(), "tokenizer": "tokenizer.json",
        "preprocess": {"image_size": p.data.image_size, "resize": "shorter_side_bicubic", "crop": "center",
                       "mean": list(MEAN), "std": list(STD), "background": list(p.data.background)},
        "data_fingerprint": data_fp,
    })


if __name__ == "__main__":
    main()
