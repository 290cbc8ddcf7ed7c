"""Training samples/s: this project against open_clip, same architecture, batch and data, one run.

Both sides train the params.yaml architecture (or `--model`, a preset of benchmarks/presets.py:
CLIP's ViT-B/32 or ViT-B/16 at 224 px) on the same synthetic images and captions, with AdamW, the
contrastive loss and one optimiser step per batch, in this process:
- ours: batches from the ingest/tokenize outputs as the train stage reads them (`rank_batches`:
  uint8 memory map, batched crop; on a GPU uint8 pixels, normalised and cropped there), our model;
- open_clip: its usual data path (PNG files decoded per sample with open_clip's train transform, in a
  DataLoader), open_clip's CLIP and ClipLoss.
`--workers N` gives both sides' DataLoaders N processes (with pinned memory on a GPU), as
open_clip_train's --workers (default 4) and our train.workers do.
A second pair of figures ("model_only") feeds both models the same pre-made tensors (captions
padded to the context length), separating the model and loss from the data path. Results: reports/benchmarks/train_throughput.json.
Our step is the stage's (`pipeline.loop.backward`, and AdamW as `TrainState` picks it: fused on a
GPU): `--accum-steps K` measures exact accumulation over K micro-batches, `--nproc N` our side as N
gloo (NCCL) processes with DDP, each on its slice of the global batch (open_clip stays one process:
the ratio is then N processes against one).
Both sides run under the same autocast: `--precision` (default: params.yaml's, `auto` is bf16 on
CPUs with AMX or AVX512-BF16, as here, and on GPUs with bf16).
Model FLOPs per sample (benchmarks/flops.py, captions padded to the context: the nominal model, the
same for both sides) give each side's MFU against the GPU's dense bf16 peak (benchmarks/machine.py);
peak GPU memory is each side's own.

    python benchmarks/train_throughput.py [--steps 40] [--images 1024] [--nproc 2] [--accum-steps 4]
        [--precision fp32|bf16] [--device cuda] [--model vitb32] [--batch-size 256] [--workers 8]
        [--out reports/benchmarks/train_throughput_fp32.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.flops import count_flops  # noqa: E402
from benchmarks.machine import cpu_name, peak_bf16_tflops  # noqa: E402
from benchmarks.presets import PRESETS, make_workspace, preset_params, vocab_size  # noqa: E402
from clipmodel.data import MEAN, STD, CorpusBatches, Corpus, finish_batch  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.model import CLIP, CLIPConfig, param_groups  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.device import autocast, resolve_device, resolve_precision  # noqa: E402
from pipeline.loop import Objective, backward, checks_on_device  # noqa: E402
from pipeline.objectives import clip_objective, clip_split  # noqa: E402


class PngCaptions(torch.utils.data.Dataset):
    """open_clip's CsvDataset in spirit: decode a file and transform it for every sample."""

    def __init__(self, files: list[Path], tokens: np.ndarray, transform):
        self.files, self.tokens, self.transform = files, tokens, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.files[i])), torch.from_numpy(self.tokens[i].astype(np.int64))


def timed(step, batches, warmup: int, device: torch.device) -> float:
    """Samples/s after `warmup` steps; batches (dicts) are moved to the device and finished there
    inside the timed loop, as in training."""
    n, t0 = 0, None
    for i, batch in enumerate(batches):
        if i == warmup:
            synchronize(device)
            t0, n = time.perf_counter(), 0
        batch = finish_batch({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        step(batch["images"], batch["tokens"])
        n += len(batch["tokens"])
    synchronize(device)
    return n / (time.perf_counter() - t0)


def peak_gpu_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=lr)  # torch's default implementation, as open_clip_train

    def step(images, tokens):
        with autocast(device, precision):  # as open_clip's --precision amp_bf16 does
            loss = loss_fn(*model(images, tokens))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def our_trainer(model: CLIP, p: Params, net: torch.nn.Module, device: torch.device):
    """The stage's step: `backward` over train.accum_steps micro-batches (through DDP when data-parallel),
    AdamW as the stage's TrainState makes it (fused where the step keeps its checks on the device)."""
    features, loss_from_features = clip_split(model, p)
    obj = Objective(model, clip_objective(model, p), features=features, loss_from_features=loss_from_features)
    fused = {"fused": True} if checks_on_device(device, p.train.precision) else {}
    opt = torch.optim.AdamW(param_groups(model, 0.2), lr=1e-3, **fused)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def step(images, tokens):
        batch = {"images": images, "tokens": tokens, "caption_ids": torch.arange(len(images), device=device)}
        backward(obj, net, batch, p.train.accum_steps, device, p.train.precision, scaler)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ours(rank: int, nproc: int, port: int, cfg: CLIPConfig, p: Params, data_dir: str, steps: int, warmup: int,
         out: str) -> None:
    """Our samples/s end to end and on one fixed batch, and peak GPU memory, as one of `nproc` ranks
    (rank 0 writes them to `out`)."""
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
    gpu = device.type == "cuda"
    reset_peak(device)
    e2e = timed(our_trainer(model, p, net, device),
                data.rank_batches(0, steps, p.train.workers, pin_memory=gpu, raw_pixels=gpu), warmup, device)
    fixed = fixed_batch(data, cfg.context_length)
    model_only = timed(our_trainer(model, p, net, device),
                       [{"images": fixed["images"][share], "tokens": fixed["tokens"][share]}] * steps, warmup, device)
    if rank == 0:  # every rank runs the same number of samples
        Path(out).write_text(json.dumps({"e2e": e2e * nproc, "model_only": model_only * nproc,
                                         "peak_gpu_mb": peak_gpu_mb(device)}))
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
    ap.add_argument("--model", choices=sorted(PRESETS), default="default",
                    help="params.yaml's model, or a preset of benchmarks/presets.py (ViT-B at 224 px)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: params.yaml's train.batch_size")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader processes, both sides")
    ap.add_argument("--out", default=str(ROOT / "reports/benchmarks/train_throughput.json"))
    args = ap.parse_args()
    params = preset_params(args.model, {"train": {"batch_size": args.batch_size}} if args.batch_size else None)
    m, bs, size = params["model"], params["train"]["batch_size"], params["data"]["image_size"]
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision or params["train"]["precision"], device)
    p = Params.model_validate({**params, "train": {**params["train"], "accum_steps": args.accum_steps,
                                                   "nproc": args.nproc, "precision": precision,
                                                   "device": device.type, "workers": args.workers}})
    gpu = device.type == "cuda"
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_workspace(root, params, args.images)
        corpus = Corpus.load(root / "data")
        train = corpus.split("train")
        vocab = vocab_size(args.model, int(np.asarray(corpus.tokens).max()) + 1)
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
        our_result = json.loads(result_file.read_text())
        ours_e2e, ours_model = our_result["e2e"], our_result["model_only"]

        png_dir = root / "png"
        png_dir.mkdir()
        files = [png_dir / f"{i}.png" for i in train]
        with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # PIL encodes outside the GIL
            list(pool.map(lambda k: Image.fromarray(corpus.images(train[k:k + 1])[0]).save(files[k]), range(len(train))))
        transform = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD)
        loader = torch.utils.data.DataLoader(
            PngCaptions(files, np.asarray(corpus.tokens)[corpus.caption_start[train]], transform),
            batch_size=bs, shuffle=True, drop_last=True, num_workers=args.workers, pin_memory=gpu,
            persistent_workers=args.workers > 0)

        def peer_batches():
            while True:
                for images, tokens in loader:
                    yield {"images": images, "tokens": tokens}

        batches = peer_batches()
        reset_peak(device)
        peer_e2e = timed(trainer(peer, peer_loss, precision, device), (next(batches) for _ in range(steps)),
                         args.warmup, device)

        fixed = fixed_batch(CorpusBatches(corpus, train, bs, 0, (0.8, 1.0)), ctx)
        fixed = {"images": fixed["images"], "tokens": fixed["tokens"]}
        peer_model = timed(trainer(peer, peer_loss, precision, device), [fixed] * steps, args.warmup, device)
        peer_peak = peak_gpu_mb(device)

        # FLOPs per sample of one step on the fixed batch (captions padded: the nominal model), each side
        on_device = {k: v.to(device) for k, v in fixed.items()}
        torch.manual_seed(0)
        fresh = CLIP(cfg).to(device)
        flops_ours = count_flops(lambda: our_trainer(fresh, p, fresh, device)(**on_device)) / bs
        flops_peer = count_flops(lambda: trainer(peer, peer_loss, precision, device)(**on_device)) / bs

    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if gpu else None

    def mfu(samples_per_s: float) -> float | None:
        return flops_ours * samples_per_s / (peak * 1e12) if peak else None

    result = {
        "ours_samples_per_s": ours_e2e, "open_clip_samples_per_s": peer_e2e, "ratio": ours_e2e / peer_e2e,
        "model_only": {"ours_samples_per_s": ours_model, "open_clip_samples_per_s": peer_model,
                       "ratio": ours_model / peer_model},
        "model_flops_per_sample": flops_ours, "open_clip_counted_flops_per_sample": flops_peer,
        "peak_bf16_tflops": peak,
        "mfu": {"ours": mfu(ours_e2e), "open_clip": mfu(peer_e2e), "model_only_ours": mfu(ours_model),
                "model_only_open_clip": mfu(peer_model)},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"peak_gpu_mb": max(our_result["peak_gpu_mb"], peer_peak),
            "peak_gpu_mb_by_side": {"ours": our_result["peak_gpu_mb"], "open_clip": peer_peak}} if gpu else {}),
        "setup": {"model_preset": args.model, "batch_size": bs, "image_size": size, "model": m,
                  "context_length": ctx, "vocab_size": vocab, "steps": args.steps, "warmup": args.warmup,
                  "images": args.images, "workers": args.workers,
                  "ours_processes": args.nproc, "accum_steps": args.accum_steps, "precision": precision,
                  "device": torch.cuda.get_device_name(device) if gpu else "cpu",
                  "threads": torch.get_num_threads(), "cpu": cpu_name(),
                  "torch": torch.__version__, "open_clip": open_clip.__version__},
    }
    write_json(args.out, result)
    print({k: v for k, v in result.items() if k != "setup"})


if __name__ == "__main__":
    main()
