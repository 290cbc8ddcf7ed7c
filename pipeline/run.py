"""What the training stages (train, supervised, efficiency) share: the model config built from
params, the seed, device and corpus, and the fingerprint a checkpoint must match. Where the data
lies is each stage's --data (dvc.yaml names it)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import BaseModel

from clipmodel.data import ColorAugment, Corpus
from clipmodel.model import CLIPConfig
from pipeline.device import resolve_device
from pipeline.params import Params, TrainParams

def model_config(p: Params, vocab_size: int) -> CLIPConfig:
    """The CLIP architecture of params' model section, at data.image_size and tokenize.context_length."""
    m = p.model
    return CLIPConfig(
        embed_dim=m.embed_dim, image_size=p.data.image_size, vision=m.vision,
        vision_width=m.vision_width, vision_layers=m.vision_layers, vision_heads=m.vision_heads,
        vision_patch_size=m.vision_patch_size, context_length=p.tokenize.context_length,
        vocab_size=vocab_size, text_width=m.text_width, text_heads=m.text_heads,
        text_layers=m.text_layers, ensemble=m.ensemble,
        init_logit_bias=-10.0 if p.train.loss == "sigmoid" else None,
    )


def color_augment(tp: TrainParams) -> ColorAugment:
    """The photometric augmentation train.color_jitter, color_jitter_p, grayscale_p, blur_p and
    blur_sigma ask for (all zero: none)."""
    return ColorAugment(tp.color_jitter, tp.color_jitter_p, tp.grayscale_p, tp.blur_p, tp.blur_sigma)


def prepare(p: Params, data: str | Path = "data") -> tuple[torch.device, Corpus]:
    """Seed torch with train.seed, resolve train.device and open the corpus ingest and tokenize wrote in `data`."""
    torch.manual_seed(p.train.seed)
    return resolve_device(p.train.device), Corpus.load(data)


def run_fingerprint(p: Params, data_fp: str, kind: str, own: BaseModel | None = None, streamed: bool = False) -> str:
    """What a checkpoint must match to be resumed: every setting that changes the weights, with the
    params section (`own`) of a stage that has one beside train's. `streamed`: the batches come from
    the tar stream, whose shuffle buffer orders them. 16 hex digits of a SHA-256."""
    unused = set() if p.train.ssl_weight else {"ssl_weight", "ssl_temperature", "ssl_crop_scale"}
    if not streamed:
        unused.add("shuffle_buffer")
    train = p.train.model_dump(exclude={"resume", "log_every", "checkpoint_every", "workers", "device", "nproc",
                                        "local_loss", "grad_checkpointing", "compile", *unused})
    blob = json.dumps([kind, own and own.model_dump(), p.model.model_dump(), train, p.tokenize.model_dump(),
                       p.data.image_size, data_fp],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
