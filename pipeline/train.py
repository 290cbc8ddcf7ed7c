"""Stage `train`: contrastive CLIP training from the ingest/tokenize outputs, tracked in MLflow.

The loop is `pipeline.loop.fit`; this stage supplies the CLIP objective (the symmetric contrastive
or sigmoid loss over the global batch, split into features and loss so that accumulation is exact
and data-parallel ranks see every negative), validation, and the model files.

With train.nproc > 1 the stage re-launches itself as that many processes on 127.0.0.1
(clipmodel.distributed.relaunch), or is started by torchrun directly, on one or several nodes.
"""
from __future__ import annotations

import resource
import shutil
from pathlib import Path

import numpy as np
import torch

from clipmodel import distributed
from clipmodel.checkpoint import save_safetensors
from clipmodel.data import MEAN, STD, CorpusBatches, Corpus, to_tensor
from clipmodel.io import atomic_path, write_json
from clipmodel.model import CLIP, CLIPConfig
from clipmodel.stream import StreamingBatches
from clipmodel.retrieval import ranks, summarize
from clipmodel.tokenizer import load_tokenizer, trim_padding
from pipeline import tracking
from pipeline.dvcfile import flatten
from pipeline.device import autocast, resolve_precision
from pipeline.loop import Objective, fit, load_checkpoint, median_samples_per_s
from pipeline.objectives import clip_loss, clip_objective, clip_split
from pipeline.params import Params, load_params
from pipeline.plots import plot_training_curves
from pipeline.run import DATA, MODELS, model_config, prepare, run_fingerprint

@torch.no_grad()
def validate(model: CLIP, corpus: Corpus, p: Params, device: torch.device) -> dict[str, float]:
    """Validation loss (in training-size batches) and image->text retrieval R@1 on the val split."""
    precision = resolve_precision(p.train.precision, device)
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
        with autocast(device, precision):
            img, txt, scale = model(batch["images"], batch["tokens"])
            if len(img) > 1:
                losses.append(clip_loss(p, img, txt, scale, model.logit_bias, batch["caption_ids"]).item())
        images.append(img.float().cpu())
        texts.append(txt.float().cpu())
    keys = torch.from_numpy(corpus.caption_ids()[caption].reshape(-1, 1).astype(np.int64))
    r = summarize(ranks(torch.cat(images), torch.cat(texts), keys, keys))
    return {"val_loss": float(np.mean(losses)) if losses else float("nan"), "val_r1": r["r1"]}


def training_batches(p: Params, corpus: Corpus) -> CorpusBatches | StreamingBatches:
    """The train split as random-access batches (npy shards, bit-exact resume) or streamed from the
    WebDataset shards ingest wrote with data.output_format: webdataset (bounded memory, any size)."""
    train = corpus.split("train")
    if len(train) < p.train.batch_size:
        raise SystemExit(f"train: {len(train)} training images is fewer than train.batch_size={p.train.batch_size}; "
                         "lower train.batch_size (or data.val_fraction / test_fraction)")
    if p.data.output_format == "npy":
        return CorpusBatches(corpus, corpus.split("train"), p.train.batch_size, p.train.seed, p.train.crop_scale,
                                  p.train.crop_ratio)
    if not corpus.tars:
        raise SystemExit(f"train: data.output_format is webdataset but {DATA}/images holds no train-*.tar; "
                         "run `dvc repro ingest`")
    return StreamingBatches([str(t) for t in corpus.tars], DATA / "tokenizer.json",
                            batch_size=p.train.batch_size // distributed.world(), image_size=p.data.image_size,
                            seed=p.train.seed, crop_scale=p.train.crop_scale, crop_ratio=p.train.crop_ratio,
                            resample=True, epoch_samples=len(corpus.split("train")))


def main() -> None:
    """Run the stage on this rank; rank 0 alone writes models/, the reports and the MLflow run.
    Raises: SystemExit (one line) when `fit` stops (see there)."""
    p = load_params()
    if p.train.nproc > 1 and not distributed.launched():
        distributed.relaunch(p.train.nproc, "pipeline.train")
    device, corpus = prepare(p)
    gpu = device.type == "cuda"
    distributed.init(device)
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
            tracking.mlflow.log_params(flatten(p.model_dump()))
            tracking.mlflow.log_params({"data_fingerprint": data_fp, "train_images": len(corpus.split("train")),
                                        "precision_used": resolve_precision(p.train.precision, device),
                                        "device_used": torch.cuda.get_device_name(device) if gpu else "cpu",
                                        "total_steps": p.train.epochs * len(data),
                                        "parameters": sum(x.numel() for x in model.parameters())})
    rows = fit(obj, data, p.train, device, p.train.epochs * len(data), fingerprint, state, run_id)
    processes = distributed.world()
    distributed.finish()
    if not main_rank:
        return
    save_model(model, cfg, p, data_fp)
    plot = plot_training_curves(obj.log_csv, Path("reports/plots/train_curves.png"))
    summary = {"steps": int(rows[-1]["step"]), "final_loss": rows[-1]["loss"],
               "samples_per_s": median_samples_per_s(rows), "processes": processes,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               **({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20} if gpu else {})}
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
