"""Memory and time of the contrastive loss at CLIP's global batches, as one rank of a large run sees it.

With train.local_loss false every rank builds the whole B x B logit matrix of the gathered batch
("gathered"); with it true, only its own B/N rows against all B columns, and the columns' rows of
the text side ("local"; clipmodel.loss.contrastive_loss with `rows`). Both get the same gradients.
This measures, for each global batch and variant, the peak memory the loss's forward and backward
add above its inputs (features [B, 512] in bf16, as autocast leaves them; the logits are fp32) and
its time, on one device: what one rank of an N-rank run holds, without the collectives (their
traffic is in docs/scale.md). Results: reports/benchmarks/loss_memory_<device>.json.

    python benchmarks/loss_memory.py [--device cuda] [--batches 32000 64000] [--world 1000] [--dim 512]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import device_name  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.loss import contrastive_loss  # noqa: E402


def measure(batch: int, rows: slice | None, dim: int, device: torch.device, repeats: int) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).bfloat16().requires_grad_()
    text = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).bfloat16().requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    times = []
    peak = None
    for i in range(repeats + 1):  # the first run warms up
        image.grad = text.grad = scale.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        contrastive_loss(image, text, scale, rows=rows).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        if i:
            times.append(time.perf_counter() - start)
    return {"ms": 1e3 * sorted(times)[len(times) // 2], "peak_mb_above_inputs": peak,
            "inputs_mb": 2 * batch * dim * 2 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[32000, 64000])
    ap.add_argument("--world", type=int, default=1000, help="ranks sharing the global batch (local rows = B / world)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    results = []
    for batch in args.batches:
        local = batch // args.world
        for variant, rows in (("local", slice(0, local)), ("gathered", None)):
            try:
                r = measure(batch, rows, args.dim, device, args.repeats)
            except torch.OutOfMemoryError:
                r = {"oom": True}
            results.append({"global_batch": batch, "variant": variant, "rows": local if rows else batch, **r})
            print(results[-1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write_json(args.out or ROOT / f"reports/benchmarks/loss_memory_{device.type}.json",
               {"results": results, "setup": {"dim": args.dim, "world": args.world, "device": device_name()
                                              if device.type == "cuda" else "cpu", "torch": torch.__version__,
                                              "feature_dtype": "bfloat16", "logits_dtype": "float32"}})


if __name__ == "__main__":
    main()
