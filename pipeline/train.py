"""Stage `train`: contrastive CLIP training from the ingest/tokenize outputs, tracked in MLflow.

The loop is `pipeline.loop.fit`; this stage supplies the CLIP objective (the symmetric contrastive
or sigmoid loss over the global batch, split into features and loss so that accumulation is exact
and data-parallel ranks see every negative), validation, and the model files.

    python -m pipeline.train [--data data] [--model models] [--metrics reports/train.json]
        [--log reports/train_log.csv] [--plot reports/plots/train_curves.png] [--run reports/run.json]

Reads the corpus in --data (ingest's and tokenize's outputs), writes the model folder --model
(clip.safetensors, config.json, tokenizer.json), the summary --metrics, the loss log --log, its plot
--plot and the MLflow run id --run (the defaults; dvc.yaml names them). The resumable checkpoint
stays in checkpoints/train.pt, outside DVC.

With train.nproc > 1 the stage re-launches itself, with the same arguments, as that many processes
on 127.0.0.1 (clipmodel.distributed.relaunch), or is started by torchrun directly, on one or several
nodes.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from clipmodel import distributed
from clipmodel.checkpoint import save_safetensors
from clipmodel.data import MEAN, STD, CorpusBatches, Corpus, to_tensor
from clipmodel.io import atomic_path, write_json
from clipmodel.model import CLIP, CLIPConfig, CLIPEnsemble, build_model
from clipmodel.stream import StreamingBatches
from clipmodel.retrieval import ranks, summarize
from clipmodel.tokenizer import load_tokenizer, trim_padding
from pipeline import tracking
from pipeline.dvcfile import flatten
from pipeline.device import autocast, resolve_precision
from pipeline.loop import Objective, fit, median_samples_per_s, open_checkpoint, run_peaks
from pipeline.objectives import clip_loss, clip_objective, clip_split
from pipeline.params import Params, load_params
from pipeline.plots import plot_training_curves
from pipeline.run import color_augment, model_config, prepare, run_fingerprint

@torch.no_grad()
def validate(model: CLIP | CLIPEnsemble, corpus: Corpus, p: Params, device: torch.device) -> dict[str, float]:
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


def training_batches(p: Params, corpus: Corpus, data_dir: Path) -> CorpusBatches | StreamingBatches:
    """The train split as random-access batches (npy shards, bit-exact resume) or streamed from the
    WebDataset shards ingest wrote with data.output_format: webdataset (bounded memory, any size)."""
    train = corpus.split("train")
    if len(train) < p.train.batch_size:
        raise SystemExit(f"train: {len(train)} training images is fewer than train.batch_size={p.train.batch_size}; "
                         "lower train.batch_size (or data.val_fraction / test_fraction)")
    ssl = p.train.ssl_crop_scale if p.train.ssl_weight else None  # the self-supervised view, when trained on
    if p.data.output_format == "npy":
        return CorpusBatches(corpus, train, p.train.batch_size, p.train.seed, p.train.crop_scale,
                             p.train.crop_ratio, color_augment(p.train), ssl)
    if not corpus.tars:
        raise SystemExit(f"train: data.output_format is webdataset but {data_dir / 'images'} holds no train-*.tar; "
                         "run `dvc repro ingest`")
    return StreamingBatches([str(t) for t in corpus.tars], data_dir / "tokenizer.json",
                            batch_size=p.train.batch_size // distributed.world(), image_size=p.data.image_size,
                            seed=p.train.seed, crop_scale=p.train.crop_scale, crop_ratio=p.train.crop_ratio,
                            color=color_augment(p.train), ssl_crop_scale=ssl, shuffle_buffer=p.train.shuffle_buffer,
                            caption_views=p.tokenize.caption_views, caption_view_sep=p.tokenize.caption_view_sep,
                            epoch_samples=len(train), shard_sizes=np.bincount(
                                corpus.manifest.shard.to_numpy()[train], minlength=len(corpus.tars)).tolist())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths: the defaults are the root pipeline's, which dvc.yaml passes explicitly."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data"), help="input: the corpus folder ingest and tokenize wrote")
    ap.add_argument("--model", type=Path, default=Path("models"), help="output: the model folder")
    ap.add_argument("--metrics", type=Path, default=Path("reports/train.json"), help="output: the run's summary")
    ap.add_argument("--log", type=Path, default=Path("reports/train_log.csv"), help="output: the loss log")
    ap.add_argument("--plot", type=Path, default=Path("reports/plots/train_curves.png"), help="output: its plot")
    ap.add_argument("--run", type=Path, default=Path("reports/run.json"), help="output: the MLflow run id")
    return ap.parse_args(argv)


def check_held_out_sets(p: Params) -> None:
    """A typo in evaluate.datasets, or a class-name mapping that misses a label, would surface only after
    training, in the evaluate stage: evaluate's own check reads them first (`python -m
    pipeline.evaluation_sets`, no image opened), in a process of its own: train must not import it, or
    every change to zero-shot scoring would retrain.

    Raises: SystemExit (the check's line, naming the key) when evaluate could not read a set."""
    if not p.evaluate.datasets:
        return
    check = subprocess.run([sys.executable, "-m", "pipeline.evaluation_sets"], capture_output=True, text=True)
    if check.returncode:
        why = (check.stderr.strip().splitlines() or [f"exit status {check.returncode}"])[-1]
        raise SystemExit(f"train: {why.removeprefix('evaluate: ')} (checked before training: the evaluate stage "
                         "reads it)")


@distributed.reported_once
@tracking.ended_on_error()
def main(argv: list[str] | None = None) -> None:
    """Run the stage on this rank; rank 0 alone writes the model folder, the reports and the MLflow run.
    Raises: SystemExit (one line) when `fit` stops (see there)."""
    args = parse_args(argv)
    p = load_params()
    check_held_out_sets(p)
    if p.train.nproc > 1 and not distributed.launched():
        distributed.relaunch(p.train.nproc, "pipeline.train", sys.argv[1:] if argv is None else argv)
    device, corpus = prepare(p, args.data)
    distributed.init(device)
    tok = load_tokenizer(args.data / "tokenizer.json")
    cfg = model_config(p, tok.get_vocab_size())
    model = build_model(cfg).to(device)
    model.set_grad_checkpointing(p.train.grad_checkpointing)
    data = training_batches(p, corpus, args.data)

    data_fp = tracking.data_fingerprint([args.data / "manifest.parquet", args.data / "tokens.npy"])
    fingerprint = run_fingerprint(p, data_fp, "clip", streamed=isinstance(data, StreamingBatches))
    terms: dict[str, torch.Tensor] = {}  # the loss's parts beside the total, for the step log
    features, loss_from_features = clip_split(model, p, terms)
    obj = Objective(model, clip_objective(model, p), after_step=model.clamp_logit_scale_,
                    step_metrics=lambda: {"logit_scale": model.logit_scale.exp().mean().item(),
                                          **{k: v.item() for k, v in terms.items()}},
                    validate=lambda: validate(model, corpus, p, device), log_csv=args.log,
                    features=features, loss_from_features=loss_from_features)
    main_rank = distributed.is_main()
    state = distributed.from_main(lambda: open_checkpoint(obj.checkpoint, fingerprint, p.train.resume))
    run_id = None
    if main_rank:
        run_id = tracking.start_run(f"clip-{p.data.source}", state and state["run_id"], tracking.pipeline_tags(data_fp),
                                    args.run)
        if state is None or run_id != state["run_id"]:  # a new run, or the checkpoint's is not in the store
            tracking.mlflow.log_params(flatten(p.model_dump()))
            tracking.mlflow.log_params({"data_fingerprint": data_fp, "train_images": len(corpus.split("train")),
                                        "precision_used": resolve_precision(p.train.precision, device),
                                        "device_used": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                        "total_steps": p.train.epochs * len(data),
                                        "parameters": sum(x.numel() for x in model.parameters())})
    rows = fit(obj, data, p.train, device, p.train.epochs * len(data), fingerprint, state, run_id,
               log=tracking.step_logger(run_id) if main_rank else None)
    processes = distributed.world()
    distributed.finish()
    if not main_rank:
        return
    save_model(model, cfg, p, data_fp, args.model, args.data / "tokenizer.json")
    plot = plot_training_curves(obj.log_csv, args.plot)
    summary = {"steps": int(rows[-1]["step"]), "final_loss": rows[-1]["loss"],
               "samples_per_s": median_samples_per_s(rows), "processes": processes, **run_peaks(rows)}
    write_json(args.metrics, summary)
    tracking.mlflow.log_metrics({"train_samples_per_s": summary["samples_per_s"]})
    tracking.mlflow.log_artifact(str(args.model / "config.json"))
    tracking.mlflow.log_artifact(str(plot), "plots")
    tracking.mlflow.end_run()
    print(f"train: wrote {args.model / 'clip.safetensors'}; {summary}")


def save_model(model: CLIP | CLIPEnsemble, cfg: CLIPConfig, p: Params, data_fp: str, folder: Path, tokenizer: Path) -> None:
    """The model folder (models/): weights, tokenizer and a config that rebuilds the model without params.yaml.

    Each file is replaced atomically; the folder itself stays, since export writes models/onnx beside them.
    """
    save_safetensors(model, folder / "clip.safetensors")
    with atomic_path(folder / "tokenizer.json") as tmp:
        shutil.copy(tokenizer, tmp)
    write_json(folder / "config.json", {
        "model": cfg.to_dict(), "tokenizer": "tokenizer.json",
        "preprocess": {"image_size": p.data.image_size, "resize": "shorter_side_bicubic", "crop": "center",
                       "mean": list(MEAN), "std": list(STD), "background": list(p.data.background)},
        "data_fingerprint": data_fp,
    })


if __name__ == "__main__":
    main()
