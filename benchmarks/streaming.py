"""Streaming a WebDataset larger than what the process holds: throughput and peak memory.

A child process runs the real ingest stage code (`data.output_format: webdataset`, every image in
the train split) on a pool of --pool synthetic scenes, copies its shards with the same writer
until there are --images samples, each with a key of its own (rendering 200k scenes would take
most of the time on two cores), and trains a tokenizer on the captions. This process then streams
--samples through StreamingBatches (training's shard order, "epochs") and DataLoader workers,
twice: over the pool's shards only, then over all of them, sampling the memory of its whole
process tree (itself and the workers) as it goes: RSS summed (shared pages counted once per
process: an upper bound) and PSS summed (shared pages split between processes). The claim: the
same peak for ten times the data, flat over time. The shards live in a temporary folder, deleted
at the end; the numbers go to reports/benchmarks/streaming.json.

glibc's allocator raises its mmap threshold after the first freed batch-sized buffer and from then
on keeps freed batches in a fragmented heap: about 0.4 GB more per DataLoader worker, the same for
any dataset size. MALLOC_MMAP_THRESHOLD_=131072 avoids it at a cost in speed (docs/performance.md);
the report records it when set:

    python benchmarks/streaming.py [--images 200000] [--pool 20000] [--size 64]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

from clipmodel.io import write_json
from clipmodel.stream import StreamingBatches
from clipmodel.tokenizer import train_tokenizer
from clipmodel.shards import sample_key, write_sample
from pipeline.ingest import run
from pipeline.params import DataParams

OUT = Path("reports/benchmarks/streaming.json")
MiB = 2**20


class TreeMemory:
    """Samples the summed RSS and PSS of a process and its descendants in a background thread."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.root, self.every = psutil.Process(pid), every
        self.peak_rss = self.peak_pss = 0
        self.trace: list[tuple[float, int, int]] = []  # (seconds, rss, pss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> tuple[int, int]:
        rss = pss = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # a worker that just exited
                continue
            rss, pss = rss + info.rss, pss + info.pss
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.trace.append((time.perf_counter() - self._start, rss, pss))
            self._stop.wait(self.every)


def prepare(data: DataParams, root: Path, copies: int) -> None:
    """In the child: the ingest stage's code path on the pool, `copies` copies of its shards with
    distinct keys, then a tokenizer as the tokenize stage would train it."""
    report = run(data, root)
    print(f"ingest: {report['accepted']} images, {report['tar_shards']} shards, {report['images_per_s']} img/s")
    pool = sorted((root / "data/images").glob("train-*.tar"))
    n, out = report["accepted"], root / "stream"
    out.mkdir()
    for copy in range(copies):
        for shard in pool:
            with tarfile.open(shard) as src, tarfile.open(out / f"{copy:03d}-{shard.name}", "w") as dst:
                members = iter(src)
                for png, meta in zip(members, members):
                    index = int(png.name.partition(".")[0]) + copy * n
                    write_sample(dst, sample_key(index), {"png": src.extractfile(png).read(),
                                                          "json": src.extractfile(meta).read()})
    captions = pd.read_parquet(root / "data/manifest.parquet", columns=["captions"]).captions
    train_tokenizer((c for caps in captions for c in caps), 1024, 32).save(str(root / "tokenizer.json"))


def stream(shards: list[Path], samples: int, tokenizer: Path, args: argparse.Namespace) -> dict:
    """Streams args.samples of a dataset of `samples` as training does; throughput and the tree's memory."""
    ds = StreamingBatches([str(p) for p in shards], tokenizer, args.batch_size, args.size, seed=0,
                          crop_scale=(0.8, 1.0), shuffle_buffer=args.shuffle_buffer, epoch_samples=samples)
    steps = -(-args.samples // args.batch_size)
    loader = ds.rank_batches(0, steps, workers=args.workers)
    with TreeMemory(psutil.Process().pid) as memory:
        baseline_rss, baseline_pss = memory.sample()
        seen: set[int] = set()
        it = iter(loader)
        next(it)  # workers started, buffers filled: the steady state starts here
        t0 = time.perf_counter()
        for _, batch in zip(range(steps - 1), it):
            seen.update(batch["image_index"].tolist())
        seconds = time.perf_counter() - t0
        del it
    streamed = (steps - 1) * args.batch_size
    first, second = np.array_split(np.array([pss for *_, pss in memory.trace]), 2)
    return {"shards": len(shards), "dataset_samples": samples,
            "dataset_mib": round(sum(p.stat().st_size for p in shards) / MiB, 1),
            "samples_streamed": streamed, "distinct_images_seen": len(seen), "seconds": round(seconds, 1),
            "samples_per_s": round(streamed / seconds, 1),
            "baseline_pss_mib": round(baseline_pss / MiB, 1), "baseline_rss_mib": round(baseline_rss / MiB, 1),
            "peak_pss_mib": round(memory.peak_pss / MiB, 1), "peak_rss_sum_mib": round(memory.peak_rss / MiB, 1),
            "peak_pss_first_half_mib": round(first.max() / MiB, 1),
            "peak_pss_second_half_mib": round(second.max() / MiB, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200_000, help="rounded down to a multiple of --pool")
    ap.add_argument("--pool", type=int, default=20_000, help="distinct scenes rendered by ingest")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--shard-images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--samples", type=int, default=25_600, help="samples to stream, per measurement")
    ap.add_argument("--workers", type=int, default=2, help="ingest processes and DataLoader workers")
    ap.add_argument("--shuffle-buffer", type=int, default=2048)
    args = ap.parse_args()
    copies = max(1, args.images // args.pool)
    data = DataParams(image_size=args.size, val_fraction=0.0, test_fraction=0.0, workers=args.workers,
                      shard_images=args.shard_images, output_format="webdataset",
                      synthetic={"num_images": args.pool})

    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=prepare, args=(data, root, copies))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"ingest failed with exit code {child.exitcode}")
        prepare_seconds = time.perf_counter() - start
        shards = sorted((root / "stream").glob("*.tar"))
        # the same reader on a tenth of the data, then on all of it: bounded memory is the same peak
        pool = [p for p in shards if p.name.startswith("000-")]  # the first copy: the ingest output itself
        runs = {"pool": stream(pool, args.pool, root / "tokenizer.json", args),
                "full": stream(shards, copies * args.pool, root / "tokenizer.json", args)}
    full = runs["full"]
    write_json(OUT, {
        "images": full["dataset_samples"], "distinct_scenes": args.pool, "image_size": args.size,
        "shards": full["shards"], "dataset_mib": full["dataset_mib"], "prepare_seconds": round(prepare_seconds, 1),
        "workers": args.workers, "batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer,
        "cpus": psutil.cpu_count(), "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"), **runs,
        "peak_pss_over_dataset": round(full["peak_pss_mib"] / full["dataset_mib"], 3),
    })
    for name, r in runs.items():
        print(f"{name}: {r['dataset_samples']} samples in {r['shards']} shards, {r['dataset_mib']} MiB; streamed "
              f"{r['samples_streamed']} at {r['samples_per_s']}/s; peak PSS {r['peak_pss_mib']} MiB "
              f"(RSS sum {r['peak_rss_sum_mib']}) from a baseline of {r['baseline_pss_mib']} MiB")


if __name__ == "__main__":
    main()
