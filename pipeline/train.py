"""Stage `train`: contrastive CLIP training from the ingest/tokenize outputs, tracked in MLflow.

Resumable mid-epoch: a checkpoint holds the model, optimiser, scheduler, scaler, RNG states and
the global step, and every batch is a function of (seed, step), so a run killed at any point and
resumed ends with the same weights as one that never stopped.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipmodel.data import MEAN, STD, ContrastiveBatches, Corpus, to_tensor
from clipmodel.io import atomic_path, write_json
from clipmodel.loss import contrastive_loss, positives_from_ids, sigmoid_loss
from clipmodel.model import CLIP, CLIPConfig
from clipmodel.checkpoint import save_safetensors
from clipmodel.retrieval import ranks, summarize
from clipmodel.tokenizer import load_tokenizer
from pipeline import tracking
from pipeline.params import Params, load_params
from pipeline.plots import plot_training_curves

DATA = Path("data")
MODELS = Path("models")
CHECKPOINT = Path("checkpoints/train.pt")
TRAIN_LOG = Path("reports/train_log.csv")


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


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def run_fingerprint(p: Params, data_fp: str) -> str:
    """What a checkpoint must match to be resumed: every setting that changes the weights."""
    train = p.train.model_dump(exclude={"resume", "log_every", "checkpoint_every", "workers", "device"})
    blob = json.dumps([p.model.model_dump(), train, p.tokenize.model_dump(), p.data.image_size, data_fp],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def compute_loss(model: CLIP, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                 caption_ids: torch.Tensor, p: Params) -> torch.Tensor:
    positives = positives_from_ids(caption_ids) if p.train.multi_positive else None
    if p.train.loss == "sigmoid":
        return sigmoid_loss(image, text, scale, model.logit_bias, positives)
    return contrastive_loss(image, text, scale, positives)


@torch.no_grad()
def validate(model: CLIP, corpus: Corpus, data: ContrastiveBatches, p: Params,
             device: torch.device) -> dict[str, float]:
    """Validation loss (in training-size batches) and image->text retrieval on the val split."""
    index = corpus.split("val")
    if len(index) == 0:
        return {}
    model.eval()
    caption = corpus.caption_start[index]  # each image's first caption
    images, texts, losses = [], [], []
    bs = p.train.batch_size
    for s in range(0, len(index), bs):
        batch = {"images": to_tensor(corpus.images(index[s:s + bs])).to(device),
                 "tokens": torch.from_numpy(corpus.tokens[caption[s:s + bs]].astype(np.int64)).to(device),
                 "caption_ids": torch.from_numpy(data.caption_id[caption[s:s + bs]].reshape(-1)).to(device)}
        with autocast(device, p.train.precision):
            img, txt, scale = model(batch["images"], batch["tokens"])
            if len(img) > 1:
                losses.append(compute_loss(model, img, txt, scale, batch["caption_ids"], p).item())
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
    keys = torch.from_numpy(data.caption_id[caption].reshape(-1, 1).astype(np.int64))
    r = summarize(ranks(torch.cat(images), torch.cat(texts), keys, keys))
    model.train()
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "val_r1": r["r1"]}


def save_checkpoint(step: int, model, opt, sched, scaler, fingerprint: str, run_id: str) -> None:
    state = {"step": step, "fingerprint": fingerprint, "run_id": run_id,
             "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    with atomic_path(CHECKPOINT) as tmp:
        torch.save(state, tmp)


def load_checkpoint(fingerprint: str) -> dict | None:
    if not CHECKPOINT.exists():
        return None
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    if state["fingerprint"] != fingerprint:
        print(f"train: {CHECKPOINT} is from other params or data; starting fresh")
        return None
    return state


def main() -> None:
    p = load_params()
    torch.manual_seed(p.train.seed)
    device = resolve_device(p.train.device)
    corpus = Corpus.load(DATA)
    tok = load_tokenizer(DATA / "tokenizer.json")
    cfg = model_config(p, tok.get_vocab_size())
    model = CLIP(cfg).to(device)
    data = ContrastiveBatches(corpus, corpus.split("train"), p.train.batch_size, p.train.seed, p.train.crop_scale)
    total = p.train.epochs * len(data)

    opt = torch.optim.AdamW(model.param_groups(p.train.weight_decay), lr=p.train.lr,
                            betas=p.train.betas, eps=p.train.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(p.train.warmup_steps, total))
    scaler = torch.amp.GradScaler(device.type, enabled=p.train.precision == "fp16" and device.type == "cuda")

    data_fp = tracking.data_fingerprint([DATA / "manifest.parquet", DATA / "tokens.npy"])
    fingerprint = run_fingerprint(p, data_fp)
    state = load_checkpoint(fingerprint) if p.train.resume else None
    start, run_id = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        start, run_id = state["step"], state["run_id"]
        print(f"train: resuming at step {start}/{total}")

    run_id = tracking.start_run(f"clip-{p.data.source}", run_id, tracking.pipeline_tags(data_fp))
    if start == 0:
        tracking.mlflow.log_params(tracking.flatten(p.model_dump()))
        tracking.mlflow.log_params({"data_fingerprint": data_fp, "train_images": len(data.index),
                                    "total_steps": total, "parameters": sum(x.numel() for x in model.parameters())})

    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(start, total),
                                         num_workers=p.train.workers, pin_memory=device.type == "cuda")
    log_rows = _read_log(start)
    bad, t_last, n_last = 0, time.perf_counter(), 0
    model.train()
    bar = tqdm(loader, total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    for step, batch in enumerate(bar, start=start):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, p.train.precision):
            loss = compute_loss(model, *model(batch["images"], batch["tokens"]), batch["caption_ids"], p)
        if not torch.isfinite(loss):
            bad += 1
            opt.zero_grad(set_to_none=True)
            sched.step()
            tracking.mlflow.log_metric("skipped_steps", bad, step=step)
            if bad >= p.train.max_bad_steps:
                raise SystemExit(f"train: {bad} non-finite losses in a row at step {step}; "
                                 f"stopped, last good checkpoint kept at {CHECKPOINT}")
            continue
        bad = 0
        scaler.scale(loss).backward()
        if p.train.grad_clip > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), p.train.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        model.clamp_logit_scale_()

        n_last += len(batch["tokens"])
        if (step + 1) % p.train.log_every == 0 or step + 1 == total:
            now = time.perf_counter()
            metrics = {"loss": loss.item(), "lr": sched.get_last_lr()[0],
                       "logit_scale": model.logit_scale.exp().item(), "samples_per_s": n_last / (now - t_last)}
            t_last, n_last = now, 0
            tracking.mlflow.log_metrics(metrics, step=step + 1)
            log_rows.append({"step": step + 1, **metrics})
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.1e}",
                            scale=f"{metrics['logit_scale']:.1f}", sps=f"{metrics['samples_per_s']:.0f}")
        if (step + 1) % len(data) == 0:
            val = validate(model, corpus, data, p, device)
            tracking.mlflow.log_metrics({**val, "epoch": (step + 1) // len(data)}, step=step + 1)
            bar.write(f"epoch {(step + 1) // len(data)}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if (step + 1) % p.train.checkpoint_every == 0 or step + 1 == total:
            _write_log(log_rows)
            save_checkpoint(step + 1, model, opt, sched, scaler, fingerprint, run_id)
    bar.close()
    _finish(model, cfg, p, log_rows, data_fp)


def _read_log(upto: int) -> list[dict]:
    if upto == 0 or not TRAIN_LOG.exists():
        return []
    with open(TRAIN_LOG) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f) if int(float(row["step"])) <= upto]


def _write_log(rows: list[dict]) -> None:
    with atomic_path(TRAIN_LOG) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "logit_scale", "samples_per_s"])
        writer.writeheader()
        writer.writerows(rows)


def _finish(model: CLIP, cfg: CLIPConfig, p: Params, log_rows: list[dict], data_fp: str) -> None:
    with atomic_path(MODELS) as tmp:
        tmp.mkdir()
        save_safetensors(model, tmp / "clip.safetensors")
        shutil.copy(DATA / "tokenizer.json", tmp / "tokenizer.json")
        (tmp / "config.json").write_text(json.dumps({
            "model": cfg.to_dict(), "tokenizer": "tokenizer.json",
            "preprocess": {"image_size": p.data.image_size, "resize": "shorter_side_bicubic",
                           "crop": "center", "mean": list(MEAN), "std": list(STD), "background": list(p.data.background)},
            "data_fingerprint": data_fp,
        }, indent=2) + "\n")
    plot = plot_training_curves(TRAIN_LOG, Path("reports/plots/train_curves.png"))
    samples = [r["samples_per_s"] for r in log_rows[1:]] or [float("nan")]
    summary = {"steps": int(log_rows[-1]["step"]) if log_rows else 0, "final_loss": log_rows[-1]["loss"] if log_rows else None,
               "samples_per_s": float(np.median(samples)),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    write_json("reports/train.json", summary)
    tracking.mlflow.log_metrics({"train_samples_per_s": summary["samples_per_s"], "peak_rss_mb": summary["peak_rss_mb"]})
    tracking.mlflow.log_artifact(str(MODELS / "config.json"))
    tracking.mlflow.log_artifact(str(plot), "plots")
    tracking.mlflow.end_run()
    print(f"train: wrote {MODELS}/clip.safetensors; {summary}")


if __name__ == "__main__":
    main()
