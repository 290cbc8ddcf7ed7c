"""Peak memory and speed of one training step under the memory options: activation checkpointing
(train.grad_checkpointing), exact accumulation (train.accum_steps) and torch.compile (train.compile).

Every variant runs in a fresh process (peak RSS is a high-water mark), with the params.yaml model
and batch size plus the ViT in VIT (the ResNet tower has no checkpointing: its
BatchNorm would update running statistics twice). The step is the stage's own: `pipeline.loop.backward`
on the contrastive Objective, then AdamW. "activation_mb" is peak RSS minus the RSS before the first step.

    python benchmarks/train_memory.py [--steps 4] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.model import CLIP, param_groups  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.loop import Objective, backward  # noqa: E402
from pipeline.objectives import clip_objective, clip_split  # noqa: E402
from pipeline.run import model_config  # noqa: E402

# The ViT the project defaulted to before the ResNet recipe: 4 layers of width 128, patch 8.
VIT = {"vision": "vit", "embed_dim": 128, "vision_width": 128, "vision_layers": 4, "vision_heads": 4,
       "vision_patch_size": 8, "text_width": 128, "text_layers": 3, "text_heads": 4}
VARIANTS = {"plain": {}, "grad_checkpointing": {"grad_checkpointing": True}, "accum_4": {"accum_steps": 4},
            "grad_checkpointing+accum_4": {"grad_checkpointing": True, "accum_steps": 4}}


def measure(model_params: dict, train: dict, steps: int) -> dict:
    """One variant, in this process: steps/s after a first (warm-up, compiling) step, and memory."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    p = Params.model_validate({**raw, "model": model_params, "train": {**raw["train"], **train}})
    torch.manual_seed(0)
    bs, size, ctx = p.train.batch_size, p.data.image_size, p.tokenize.context_length
    model = CLIP(model_config(p, p.tokenize.vocab_size))
    model.set_grad_checkpointing(p.train.grad_checkpointing)
    if p.train.compile:
        model.compile()
    features, loss_from_features = clip_split(model, p)
    obj = Objective(model, clip_objective(model, p), features=features, loss_from_features=loss_from_features)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batch = {"images": torch.randn(bs, 3, size, size), "tokens": torch.randint(3, p.tokenize.vocab_size, (bs, ctx)),
             "caption_ids": torch.arange(bs), "image_index": torch.arange(bs)}
    before_mb = psutil.Process().memory_info().rss / 2**20
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        backward(obj, model, batch, p.train.accum_steps, torch.device("cpu"), "fp32", scaler)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_rss_mb": peak_mb, "activation_mb": peak_mb - before_mb, "steps_per_s": steps / sum(times[1:]),
            "first_step_s": times[0]}


def run(model_params: dict, train: dict, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps([model_params, train]), "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks/train_memory.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one), args.steps)))
        return
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    models = {f"configured_{raw['model']['vision']}": raw["model"], "vit_default": VIT}
    result: dict = {}
    for name, model_params in models.items():
        result[name] = {v: run(model_params, train, args.steps) for v, train in VARIANTS.items()}
        print(name, json.dumps(result[name]), flush=True)
    if not args.no_compile:
        name = next(iter(models))
        result[name]["compile"] = run(models[name], {"compile": True}, args.steps)
        print(name, "compile", json.dumps(result[name]["compile"]), flush=True)
    result["setup"] = {"batch_size": raw["train"]["batch_size"], "image_size": raw["data"]["image_size"],
                       "steps": args.steps, "device": "cpu", "threads": torch.get_num_threads(),
                       "cpu": cpu_name(), "torch": torch.__version__}
    write_json(args.out, result)


if __name__ == "__main__":
    main()
