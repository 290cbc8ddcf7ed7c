"""Stage `train`: contrastive CLIP training from the ingest/tokenize outputs, tracked in MLflow.

`fit` is the one training loop; what it trains and how the loss is computed is an `Objective`
(CLIP's contrastive loss here, cross-entropy for the supervised baseline). Resumable mid-epoch: a
checkpoint holds the model, optimiser, scheduler, scaler, RNG states and the global step, and
every batch is a function of (seed, step), so a run killed at any point and resumed ends with the
same weights as one that never stopped.
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from clipmodel.checkpoint import save_safetensors
from clipmodel.data import MEAN, STD, ContrastiveBatches, Corpus, to_tensor
from clipmodel.io import atomic_path, write_json
from clipmodel.loss import contrastive_loss, positives_from_ids, sigmoid_loss
from clipmodel.model import CLIP, CLIPConfig, param_groups
from clipmodel.retrieval import ranks, summarize
from clipmodel.tokenizer import load_tokenizer
from pipeline import tracking
from pipeline.params import Params, TrainParams, load_params
from pipeline.plots import plot_training_curves

DATA = Path("data")
MODELS = Path("models")
Batch = dict[str, torch.Tensor]


@dataclass
class Objective:
    """What `fit` trains: the model, its loss on a batch, and hooks around the step."""
    model: nn.Module
    loss: Callable[[Batch], torch.Tensor]
    after_step: Callable[[], None] = lambda: None
    step_metrics: Callable[[], dict[str, float]] = dict    # logged with the loss, e.g. the logit scale
    validate: Callable[[], dict[str, float]] = dict        # run at every epoch end
    on_step: Callable[[int], None] = lambda step: None     # after each optimiser step, with the steps done
    checkpoint: Path = Path("checkpoints/train.pt")
    log_csv: Path = Path("reports/train_log.csv")


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
    train = p.train.model_dump(exclude={"resume", "log_every", "checkpoint_every", "workers", "device"})
    blob = json.dumps([kind, p.model.model_dump(), train, p.tokenize.model_dump(), p.data.image_size, data_fp],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def autocast(device: torch.device, precision: str):
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
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["step", "loss"])
        writer.writeheader()
        writer.writerows(rows)


def fit(obj: Objective, data: ContrastiveBatches, tp: TrainParams, device: torch.device, total: int,
        fingerprint: str, state: dict | None, run_id: str | None) -> list[dict]:
    """The training loop shared by every objective: `total` steps of `data` (epochs wrap around).

    Returns the logged rows (step, loss, lr, ...)."""
    model = obj.model
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
        print(f"train: resuming at step {start}/{total}")

    def save(step: int) -> None:
        snapshot = {"step": step, "fingerprint": fingerprint, "run_id": run_id, "model": model.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        with atomic_path(obj.checkpoint) as tmp:
            torch.save(snapshot, tmp)

    log = tracking.mlflow.active_run() is not None
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, total),
                                         num_workers=tp.workers, pin_memory=device.type == "cuda")
    rows = _read_log(obj.log_csv, start)
    bad, t_last, n_last = 0, time.perf_counter(), 0
    model.train()
    bar = tqdm(loader, total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # logs (DVC, Prefect) get a line every 30 s
    for step, batch in enumerate(bar, start=start):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, tp.precision):
            loss = obj.loss(batch)
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
        scaler.scale(loss).backward()
        if tp.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tp.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        obj.after_step()
        obj.on_step(step + 1)

        n_last += len(batch["images"])
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


def clip_objective(model: CLIP, p: Params) -> Callable[[Batch], torch.Tensor]:
    def loss(batch: Batch) -> torch.Tensor:
        image, text, scale = model(batch["images"], batch["tokens"])
        positives = positives_from_ids(batch["caption_ids"]) if p.train.multi_positive else None
        if p.train.loss == "sigmoid":
            return sigmoid_loss(image, text, scale, model.logit_bias, positives)
        return contrastive_loss(image, text, scale, positives)
    return loss


@torch.no_grad()
def validate(model: CLIP, corpus: Corpus, data: ContrastiveBatches, p: Params,
             device: torch.device) -> dict[str, float]:
    """Validation loss (in training-size batches) and image->text retrieval R@1 on the val split."""
    index = corpus.split("val")
    if len(index) == 0:
        return {}
    loss_fn = clip_objective(model, p)
    caption = corpus.caption_start[index]  # each image's first caption
    images, texts, losses = [], [], []
    bs = p.train.batch_size
    for s in range(0, len(index), bs):
        batch = {"images": to_tensor(corpus.images(index[s:s + bs])).to(device),
                 "tokens": torch.from_numpy(corpus.tokens[caption[s:s + bs]].astype(np.int64)).to(device),
                 "caption_ids": torch.from_numpy(data.caption_id[caption[s:s + bs]].reshape(-1)).to(device)}
        with autocast(device, p.train.precision):
            img, txt, _ = model(batch["images"], batch["tokens"])
            if len(img) > 1:
                losses.append(loss_fn(batch).item())
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
    keys = torch.from_numpy(data.caption_id[caption].reshape(-1, 1).astype(np.int64))
    r = summarize(ranks(torch.cat(images), torch.cat(texts), keys, keys))
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "val_r1": r["r1"]}


def main() -> None:
    p = load_params()
    torch.manual_seed(p.train.seed)
    device = resolve_device(p.train.device)
    corpus = Corpus.load(DATA)
    tok = load_tokenizer(DATA / "tokenizer.json")
    cfg = model_config(p, tok.get_vocab_size())
    model = CLIP(cfg).to(device)
    data = ContrastiveBatches(corpus, corpus.split("train"), p.train.batch_size, p.train.seed, p.train.crop_scale)

    data_fp = tracking.data_fingerprint([DATA / "manifest.parquet", DATA / "tokens.npy"])
    fingerprint = run_fingerprint(p, data_fp, "clip")
    obj = Objective(model, clip_objective(model, p), after_step=model.clamp_logit_scale_,
                    step_metrics=lambda: {"logit_scale": model.logit_scale.exp().item()},
                    validate=lambda: validate(model, corpus, data, p, device))
    state = load_checkpoint(obj.checkpoint, fingerprint) if p.train.resume else None
    run_id = tracking.start_run(f"clip-{p.data.source}", state and state["run_id"], tracking.pipeline_tags(data_fp))
    if state is None:
        tracking.mlflow.log_params(tracking.flatten(p.model_dump()))
        tracking.mlflow.log_params({"data_fingerprint": data_fp, "train_images": len(data.index),
                                    "total_steps": p.train.epochs * len(data),
                                    "parameters": sum(x.numel() for x in model.parameters())})
    rows = fit(obj, data, p.train, device, p.train.epochs * len(data), fingerprint, state, run_id)
    save_model(model, cfg, p, data_fp)
    plot = plot_training_curves(obj.log_csv, Path("reports/plots/train_curves.png"))
    speeds = [r["samples_per_s"] for r in rows[1:]] or [float("nan")]
    summary = {"steps": int(rows[-1]["step"]), "final_loss": rows[-1]["loss"],
               "samples_per_s": float(np.median(speeds)),
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
