"""Where a training step's time goes: torch.profiler over warm steps of the train stage's own loop.

Runs `pipeline.loop.fit`, the loop the train stage runs (its batches and transfers, `train_step`,
the finite-loss check, the log points every train.log_every steps), with the CLIP objective on
synthetic data made by the ingest and tokenize stages, for params.yaml's model (`--model default`)
or a preset of benchmarks/presets.py (`vitb32`, `vitb16`: CLIP's ViT-B at 224 px). Steps:
`--warmup` untimed, `--steps` timed by the wall clock (synchronised at both ends, no profiler),
then `--profile-steps` under torch.profiler. The harness changes three things around the loop, none
inside a step: no checkpoint is written, an epoch is longer than the run (no validation pass), and
the data path and the forward passes carry profiler labels.

Writes reports/benchmarks/profile_<device>_<model>.json (or --name):
- step_ms and samples_per_s of the timed window;
- per profiled step: CUDA kernel time (the pure compute), GPU busy time (kernels, copies, memsets),
  GPU idle time (the host-side gaps), kernel launches, host syncs (cudaStreamSynchronize,
  cudaEventSynchronize, blocking cudaMemcpy, aten::item / aten::_local_scalar_dense; the harness's
  own cudaDeviceSynchronize at the window's end is counted apart), host time in the data path and
  bytes copied host to device; the largest idle gaps with what the host was running meanwhile;
- the top ops by self device time (CUDA) or self CPU time (CPU);
- model FLOPs per step (torch.utils.flop_counter: matmuls, convolutions and attention, forward and
  backward, captions padded to the context as the model's nominal size) and the FLOPs the step ran
  on its trimmed captions; MFU = model FLOPs per step / step time / the device's dense bf16 peak
  (benchmarks/machine.py); peak memory.
--trace keeps the Chrome trace beside the JSON (gzip; open in chrome://tracing or Perfetto).

    python benchmarks/profile_step.py [--model default|vitb32|vitb16] [--device auto|cpu|cuda]
        [--batch-size N] [--steps 20] [--warmup 10] [--profile-steps 10] [--images 2048]
        [--workers 0] [--checks auto|step|device] [--compile [MODE]] [--trace] [--data DIR] [--name NAME]
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.flops import count_flops  # noqa: E402
from benchmarks.machine import cpu_name, peak_bf16_tflops  # noqa: E402
from benchmarks.presets import PRESETS, preset_params, vocab_size, workspace  # noqa: E402
from clipmodel.data import Corpus, CorpusBatches  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.model import CLIP  # noqa: E402
from clipmodel.tokenizer import load_tokenizer  # noqa: E402
from pipeline import loop  # noqa: E402
from pipeline.device import autocast, resolve_device, resolve_precision  # noqa: E402
from pipeline.objectives import clip_objective, clip_split  # noqa: E402
from pipeline.params import Params  # noqa: E402
from pipeline.run import model_config  # noqa: E402

LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
            "cudaLaunchCooperativeKernel"}
SYNCS = {"cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpy2D"}
SCALAR_READS = {"aten::item", "aten::_local_scalar_dense"}
DATA_LABEL = "profile_step: data (next batch)"


class LabelledBatches:
    """A BatchSource as fit sees it, with each batch's fetch labelled for the profiler and an epoch
    longer than the run (so that no validation pass lands in the measured steps); the batches are
    the wrapped source's own."""

    def __init__(self, data, steps: int):
        self.data, self.steps = data, steps

    def __len__(self) -> int:
        return max(len(self.data), self.steps + 1)

    def rank_batches(self, start, total, workers, pin_memory, raw_pixels=False):
        batches = iter(self.data.rank_batches(start, total, workers, pin_memory, raw_pixels=raw_pixels))
        while True:
            with record_function(DATA_LABEL):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch


def labelled(name: str, fn):
    def call(*args):
        with record_function(name):
            return fn(*args)
    return call


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def merge_intervals(spans: list[tuple[float, float]]) -> list[list[float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def summarize_trace(trace: dict, steps: int, gap_us: float = 20.0) -> dict:
    """Per-step figures from a Chrome trace of `steps` steps (kineto's JSON: times in microseconds)."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    by_cat: dict[str, list[dict]] = {}
    for e in events:
        by_cat.setdefault(e.get("cat", ""), []).append(e)
    kernels = by_cat.get("kernel", [])
    gpu = kernels + by_cat.get("gpu_memcpy", []) + by_cat.get("gpu_memset", [])
    runtime = by_cat.get("cuda_runtime", []) + by_cat.get("cuda_driver", [])
    cpu_ops = by_cat.get("cpu_op", [])
    host = cpu_ops + by_cat.get("user_annotation", []) + runtime
    start = min(e["ts"] for e in events)
    window = max(e["ts"] + e["dur"] for e in events) - start
    names = Counter(e["name"] for e in runtime)
    ms = 1e-3 / steps  # microseconds in the window -> milliseconds per step
    out = {
        "window_ms_per_step": window * ms,
        "data_path_host_ms_per_step": sum(e["dur"] for e in by_cat.get("user_annotation", [])
                                          if e["name"] == DATA_LABEL) * ms,
        "scalar_reads_per_step": sum(e["name"] in SCALAR_READS for e in cpu_ops) / steps,
        "cpu_ops_per_step": len(cpu_ops) / steps,
    }
    if not kernels:
        return {**out, "kernel_ms_per_step": None}
    busy = merge_intervals([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    busy_us = sum(b - a for a, b in busy)
    gaps = [(b0[1], b1[0]) for b0, b1 in zip(busy, busy[1:]) if b1[0] - b0[1] >= gap_us]
    host_sorted = sorted(host, key=lambda e: e["ts"])
    starts = [e["ts"] for e in host_sorted]

    def running_at(t: float) -> list[str]:
        """The innermost host events (per thread) spanning time t."""
        live = [e for e in host_sorted[:bisect.bisect_right(starts, t)] if e["ts"] + e["dur"] >= t]
        inner: dict[int, dict] = {}
        for e in live:
            if e.get("tid") not in inner or e["ts"] >= inner[e["tid"]]["ts"]:
                inner[e.get("tid")] = e
        return sorted({e["name"] for e in inner.values()})

    h2d = [e for e in by_cat.get("gpu_memcpy", []) if "HtoD" in e["name"]]
    return {
        **out,
        "kernel_ms_per_step": sum(e["dur"] for e in kernels) * ms,
        "gpu_busy_ms_per_step": busy_us * ms,
        "gpu_idle_ms_per_step": (window - busy_us) * ms,
        "kernels_per_step": len(kernels) / steps,
        "launches_per_step": sum(names[n] for n in LAUNCHES) / steps,
        "graph_launches_per_step": names["cudaGraphLaunch"] / steps,
        "host_syncs_per_step": sum(names[n] for n in SYNCS) / steps,
        "host_syncs_by_call": {n: names[n] for n in sorted(SYNCS) if names[n]},
        "harness_device_syncs": names["cudaDeviceSynchronize"],
        "h2d_copies_per_step": len(h2d) / steps,
        "h2d_mb_per_step": sum(e.get("args", {}).get("bytes", 0) for e in h2d) / 2**20 / steps,
        "h2d_pageable_copies": sum("Pageable" in e["name"] for e in h2d),
        "idle_gaps_per_step": len(gaps) / steps,
        f"idle_in_gaps_over_{gap_us:g}us_ms_per_step": sum(b - a for a, b in gaps) * ms,
        "largest_gaps": [{"ms": (b - a) / 1e3, "at_ms": (a - start) / 1e3, "host": running_at((a + b) / 2)}
                         for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:10]],
    }


def top_ops(prof, gpu: bool, steps: int, rows: int = 25) -> list[dict]:
    """The ops with the most self time (device time on a GPU), per profiled step."""
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True)[:rows]
    ms = 1e-3 / steps
    return [{"op": a.key, "calls_per_step": a.count / steps, "self_cpu_ms_per_step": a.self_cpu_time_total * ms,
             **({"self_device_ms_per_step": a.self_device_time_total * ms,
                 "device_ms_per_step": a.device_time_total * ms}
                if gpu else {"cpu_ms_per_step": a.cpu_time_total * ms})} for a in ops]


def step_flops(model: CLIP, p: Params, batch: dict, device: torch.device, precision: str) -> int:
    """FLOPs of one forward (under the run's autocast) and backward of the CLIP loss on `batch`
    (benchmarks/flops.py); grads cleared after."""
    loss = clip_objective(model, p)

    def work() -> None:
        with autocast(device, precision):
            value = loss(batch)
        value.backward()
    flops = count_flops(work)
    model.zero_grad(set_to_none=True)
    return flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="default")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=None,
                    help="default: params.yaml's train.precision")
    ap.add_argument("--batch-size", type=int, default=None, help="default: params.yaml's train.batch_size")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (no profiler)")
    ap.add_argument("--profile-steps", type=int, default=10, help="profiled steps (0: none)")
    ap.add_argument("--images", type=int, default=2048, help="synthetic scenes ingested")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: train.workers)")
    ap.add_argument("--checks", choices=["auto", "step", "device"], default="auto",
                    help="finite-loss check: read every step, kept on the device, or the loop's choice")
    ap.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                    help="torch.compile the model as train.compile does (mode 'default'), or in MODE "
                         "(e.g. reduce-overhead: CUDA graphs)")
    ap.add_argument("--trace", action="store_true", help="keep the Chrome trace (.trace.json.gz)")
    ap.add_argument("--data", default=None, help="workspace folder, reused when it holds the same data")
    ap.add_argument("--name", default=None, help="output name (default profile_<device>_<model>)")
    ap.add_argument("--out-dir", default=str(ROOT / "reports/benchmarks"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    raw = preset_params(args.model, {"train": {
        "device": device.type, "checkpoint_every": 10**9,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
        **({"workers": args.workers} if args.workers is not None else {}),
        **({"precision": args.precision} if args.precision else {})}})
    p = Params.model_validate(raw)
    precision = resolve_precision(p.train.precision, device)
    if args.checks != "auto":
        loop.checks_on_device = lambda device, precision: args.checks == "device"
    loop.TrainState.save = lambda self, path, fingerprint, run_id: None  # the harness keeps no checkpoint

    with tempfile.TemporaryDirectory(prefix="profile-step-") as tmp:
        folder = f"{p.data.image_size}px_ctx{p.tokenize.context_length}_{args.images}"  # shared by vitb32 and vitb16
        data_dir = workspace(Path(args.data or tmp) / folder, raw, args.images)
        corpus = Corpus.load(data_dir)
        tokenizer_vocab = load_tokenizer(data_dir / "tokenizer.json").get_vocab_size()
        cfg = model_config(p, vocab_size(args.model, tokenizer_vocab))
        torch.manual_seed(p.train.seed)
        model = CLIP(cfg).to(device)
        model.set_grad_checkpointing(p.train.grad_checkpointing)
        data = CorpusBatches(corpus, corpus.split("train"), p.train.batch_size, p.train.seed, p.train.crop_scale,
                             p.train.crop_ratio)
        # FLOPs, before any compile: a batch as the step sees it (trimmed captions), and with captions
        # padded to the context (the model's nominal size, the MFU's numerator)
        first = {k: v.to(device) for k, v in data.batch(0).items()}
        executed = step_flops(model, p, first, device, precision)
        pad = cfg.context_length - first["tokens"].shape[1]
        model_flops = step_flops(model, p, dict(first, tokens=torch.nn.functional.pad(first["tokens"], (0, pad))),
                                 device, precision)
        if args.compile:  # what fit does for train.compile (parallel: model.compile()), with the mode
            model.compile(mode=args.compile)
        w, t, a = args.warmup, args.steps, args.profile_steps
        total = w + t + a + 1
        marks: dict[str, float] = {}
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = torch.profiler.profile(activities=activities) if a else None

        def on_step(done: int) -> None:
            if done == w:
                synchronize(device)
                marks["t0"] = time.perf_counter()
            elif done == w + t:
                synchronize(device)
                marks["t1"] = time.perf_counter()
                if prof:
                    prof.start()
            elif prof and done == w + t + a:
                synchronize(device)
                prof.stop()

        features, loss_from_features = clip_split(model, p)
        obj = loop.Objective(model, clip_objective(model, p), after_step=model.clamp_logit_scale_,
                             step_metrics=lambda: {"logit_scale": model.logit_scale.exp().item()}, on_step=on_step,
                             checkpoint=Path(tmp) / "train.pt", log_csv=Path(tmp) / "train_log.csv",
                             features=labelled("profile_step: forward", features),
                             loss_from_features=labelled("profile_step: loss", loss_from_features))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        loop.fit(obj, LabelledBatches(data, total), p.train, device, total, "profile", None, None)
        run_s = time.perf_counter() - start
        peak = ({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda"
                else {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        step_s = (marks["t1"] - marks["t0"]) / t

        summary: dict = {}
        out_dir = Path(args.out_dir)
        name = args.name or f"profile_{device.type}_{args.model}"
        if prof:
            trace_path = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace_path))
            summary = summarize_trace(json.loads(trace_path.read_text()), a)
            summary["top_ops"] = top_ops(prof, device.type == "cuda", a)
            print(prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                            else "self_cpu_time_total", row_limit=25))
            if args.trace:
                out_dir.mkdir(parents=True, exist_ok=True)
                with open(trace_path, "rb") as src, gzip.open(out_dir / f"{name}.trace.json.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)


    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    peak_tflops = peak_bf16_tflops(device_name) if device.type == "cuda" else None
    kernel_ms = summary.get("kernel_ms_per_step")
    result = {
        "step_ms": step_s * 1e3,
        "samples_per_s": p.train.batch_size / step_s,
        "step_over_kernel_time": step_s * 1e3 / kernel_ms if kernel_ms else None,
        "model_flops_per_step": model_flops,
        "executed_flops_per_step": executed,
        "model_tflops_per_s": model_flops / step_s / 1e12,
        "peak_bf16_tflops": peak_tflops,
        "mfu": model_flops / step_s / (peak_tflops * 1e12) if peak_tflops else None,
        **peak,
        "profile": summary,
        "setup": {"model": args.model, "config": cfg.to_dict(),
                  "parameters": sum(x.numel() for x in model.parameters()),
                  "batch_size": p.train.batch_size, "image_size": p.data.image_size,
                  "crop_scale": list(p.train.crop_scale), "precision": precision, "device": device_name,
                  "workers": p.train.workers, "compile": args.compile,
                  "checks_on_device": loop.checks_on_device(device, precision),
                  "raw_pixels": device.type == "cuda", "log_every": p.train.log_every,
                  "warmup_steps": w, "timed_steps": t, "profiled_steps": a, "run_s": run_s,
                  "images": args.images, "cpus": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
                  "cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version()},
    }
    write_json(out_dir / f"{name}.json", result)
    brief = {k: result[k] for k in ("step_ms", "samples_per_s", "step_over_kernel_time", "mfu")}
    brief.update({k: summary.get(k) for k in ("kernel_ms_per_step", "gpu_idle_ms_per_step", "launches_per_step",
                                              "host_syncs_per_step", "data_path_host_ms_per_step")})
    print(f"profile_step: wrote {out_dir / name}.json: {brief}")


if __name__ == "__main__":
    main()
