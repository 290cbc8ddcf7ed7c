"""Training samples/s: this project against open_clip, same architecture, batch and data, one run.

Both sides train the params.yaml architecture on the same synthetic images and captions, with
AdamW, the contrastive loss and one optimiser step per batch, in this process:
- ours: batches from the ingest/tokenize outputs (uint8 memory map, batched GPU/CPU crop), our model;
- open_clip: its usual data path (PNG files decoded per sample with open_clip's train transform, in a
  DataLoader), open_clip's CLIP and ClipLoss.
A second pair of figures ("model_only") feeds both models the same pre-made tensors (captions
padded to the context length), separating the model and loss from the data path. Results: reports/benchmarks/train_throughput.json.
Our step is the stage's (`pipeline.loop.backward`): `--accum-steps K` measures exact accumulation
over K micro-batches, `--nproc N` our side as N gloo processes with DDP, each on its slice of the
global batch (open_clip stays one process: the ratio is then N processes against one).
Both sides run under the same autocast: `--precision` (default: params.yaml's, `auto` is bf16 on
CPUs with AMX or AVX512-BF16, as here).

    python benchmarks/train_throughput.py [--steps 40] [--images 1024] [--nproc 2] [--accum-steps 4]
        [--precision fp32|bf16] [--device cuda] [--out reports/benchmarks/train_throughput_fp32.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from clipmodel.data import MEAN, STD, CorpusBatches, Corpus  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.model import CLIP, CLIPConfig, param_groups  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.device import autocast, resolve_device, resolve_precision  # noqa: E402
from pipeline.loop import Objective, backward  # noqa: E402
from pipeline.objectives import clip_objective, clip_split  # noqa: E402


def make_workspace(root: Path, images: int) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["synthetic"]["num_images"] = images
    params["data"]["val_fraction"] = params["data"]["test_fraction"] = 0.01
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for stage in ("ingest", "tokenize"):
        subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class PngCaptions(torch.utils.data.Dataset):
    """open_clip's CsvDataset in spirit: decode a file and transform it for every sample."""

    def __init__(self, files: list[Path], tokens: np.ndarray, transform):
        self.files, self.tokens, self.transform = files, tokens, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.files[i])), torch.from_numpy(self.tokens[i].astype(np.int64))


def timed(step, batches, warmup: int, device: torch.device) -> float:
    """Samples/s after `warmup` steps; batches are moved to the device inside the timed loop, as in training."""
    n, t0 = 0, None
    for i, batch in enumerate(batches):
        if i == warmup:
            synchronize(device)
            t0, n = time.perf_counter(), 0
        step(*(x.to(device, non_blocking=True) for x in batch))
        n += len(batch[0])
    synchronize(device)
    return n / (time.perf_counter() - t0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fixed_batch(data: CorpusBatches, context_length: int) -> dict[str, torch.Tensor]:
    """Batch 0 with its captions padded back to the context length (our batches trim the common
    padding, a data-path saving; open_clip's text tower takes only full-length rows)."""
    batch = data[0]
    return {**batch, "tokens": torch.nn.functional.pad(batch["tokens"], (0, context_length - batch["tokens"].shape[1]))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer(model, loss_fn, precision: str, device: torch.device, lr: float = 1e-3):
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=lr)

    def step(images, tokens):
        with autocast(device, precision):  # as open_clip's --precision amp_bf16 does
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def our_trainer(model: CLIP, p: Params, net: torch.nn.Module, device: torch.device):
    """The stage's step: `backward` over train.accum_steps micro-batches (through DDP when data-parallel), AdamW."""
    features, loss_from_features = clip_split(model, p)
    obj = Objective(model, clip_objective(model, p), features=features, loss_from_features=loss_from_features)
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def step(images, tokens):
        batch = {"images": images, "tokens": tokens, "caption_ids": torch.arange(len(images), device=device)}
        backward(obj, net, batch, p.train.accum_steps, device, p.train.precision, scaler)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ours(rank: int, nproc: int, port: int, cfg: CLIPConfig, p: Params, data_dir: str, steps: int, warmup: int,
         out: str) -> None:
    """Our samples/s end to end and on one fixed batch, as one of `nproc` ranks (rank 0 writes them to `out`)."""
    device = resolve_device(p.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    if nproc > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // nproc))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=nproc)
    torch.manual_seed(0)
    model = CLIP(cfg).to(device)
    net = model
    if nproc > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
    corpus = Corpus.load(data_dir)
    data = CorpusBatches(corpus, corpus.split("train"), p.train.batch_size, 0, (0.8, 1.0))
    share = slice(rank * p.train.batch_size // nproc, (rank + 1) * p.train.batch_size // nproc)
    e2e = timed(our_trainer(model, p, net, device), ((b["images"][share], b["tokens"][share])
                                                     for b in (data[k % len(data)] for k in range(steps))), warmup, device)
    fixed = fixed_batch(data, cfg.context_length)
    model_only = timed(our_trainer(model, p, net, device), [(fixed["images"][share], fixed["tokens"][share])] * steps,
                       warmup, device)
    if rank == 0:
        Path(out).write_text(json.dumps([e2e * nproc, model_only * nproc]))  # every rank runs the same number of samples
    if nproc > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--accum-steps", type=int, default=1)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                    help="both sides' autocast precision (default: params.yaml train.precision)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks/train_throughput.json"))
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    m, bs, size = params["model"], params["train"]["batch_size"], params["data"]["image_size"]
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision or params["train"]["precision"], device)
    p = Params.model_validate({**params, "train": {**params["train"], "accum_steps": args.accum_steps,
                                                   "nproc": args.nproc, "precision": precision,
                                                   "device": device.type}})
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_workspace(root, args.images)
        corpus = Corpus.load(root / "data")
        train = corpus.split("train")
        vocab = int(np.asarray(corpus.tokens).max()) + 1
        ctx = corpus.tokens.shape[1]
        cfg = CLIPConfig(embed_dim=m["embed_dim"], image_size=size, vision=m["vision"], vision_width=m["vision_width"],
                         vision_layers=m["vision_layers"], vision_heads=m["vision_heads"],
                         vision_patch_size=m["vision_patch_size"], context_length=ctx, vocab_size=vocab,
                         text_width=m["text_width"], text_heads=m["text_heads"], text_layers=m["text_layers"])
        peer = open_clip.model.CLIP(
            embed_dim=cfg.embed_dim,
            vision_cfg=CLIPVisionCfg(layers=cfg.vision_layers, width=cfg.vision_width, patch_size=cfg.vision_patch_size,
                                     head_width=64 if cfg.vision == "resnet" else cfg.vision_width // cfg.vision_heads,
                                     image_size=size),
            text_cfg=CLIPTextCfg(context_length=ctx, vocab_size=vocab, width=cfg.text_width, heads=cfg.text_heads,
                                 layers=cfg.text_layers, pool_type="eos", eos_id=2)).to(device)
        peer_loss = open_clip.ClipLoss()
        steps = args.steps + args.warmup

        result_file = root / "ours.json"
        run = (args.nproc, free_port(), cfg, p, str(root / "data"), steps, args.warmup, str(result_file))
        if args.nproc == 1:
            ours(0, *run)
        else:
            mp.start_processes(ours, args=run, nprocs=args.nproc, start_method="spawn")
        ours_e2e, ours_model = json.loads(result_file.read_text())

        png_dir = root / "png"
        png_dir.mkdir()
        files = []
        for i in train:
            files.append(png_dir / f"{i}.png")
            Image.fromarray(corpus.images(np.array([i]))[0]).save(files[-1])
        transform = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD)
        loader = torch.utils.data.DataLoader(
            PngCaptions(files, np.asarray(corpus.tokens)[corpus.caption_start[train]], transform),
            batch_size=bs, shuffle=True, drop_last=True, num_workers=0)

        def peer_batches():
            while True:
                yield from loader

        batches = peer_batches()
        peer_e2e = timed(trainer(peer, peer_loss, precision, device), (next(batches) for _ in range(steps)),
                         args.warmup, device)

        fixed = fixed_batch(CorpusBatches(corpus, train, bs, 0, (0.8, 1.0)), ctx)
        peer_model = timed(trainer(peer, peer_loss, precision, device), [(fixed["images"], fixed["tokens"])] * steps,
                           args.warmup, device)

    result = {
        "ours_samples_per_s": ours_e2e, "open_clip_samples_per_s": peer_e2e, "ratio": ours_e2e / peer_e2e,
        "model_only": {"ours_samples_per_s": ours_model, "open_clip_samples_per_s": peer_model,
                       "ratio": ours_model / peer_model},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}),
        "setup": {"batch_size": bs, "image_size": size, "model": m, "steps": args.steps, "warmup": args.warmup,
                  "ours_processes": args.nproc, "accum_steps": args.accum_steps, "precision": precision,
                  "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "threads": torch.get_num_threads(), "cpu": cpu_name(),
                  "torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "setup"})


if __name__ == "__main__":
    main()
