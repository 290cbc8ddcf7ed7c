"""Ingest throughput, in images per second: decoding files (a CSV of PNGs) and rendering synthetic scenes.

The PNGs are synthetic scenes rendered larger than the stored size, so the timing includes a real
decode and a real downscale. Everything runs in a temporary folder; only the numbers are kept, in
reports/benchmarks/ingest.json.

    python benchmarks/ingest_throughput.py [--images 2000] [--source-size 256] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from clipmodel import synthetic
from clipmodel.io import write_json
from pipeline.ingest import run
from pipeline.params import DataParams

OUT = Path("reports/benchmarks/ingest.json")


def write_pngs(folder: Path, n: int, size: int) -> Path:
    """n rendered scenes as PNG files, listed in an open_clip-style TSV; returns the TSV."""
    (folder / "img").mkdir(parents=True)
    lines = ["filepath\ttitle"]
    for i in range(n):
        scene, (caption,) = synthetic.sample(0, i, 3)
        Image.fromarray(synthetic.render(scene, size)).save(folder / "img" / f"{i:06d}.png")
        lines.append(f"img/{i:06d}.png\t{caption}")
    (folder / "captions.tsv").write_text("\n".join(lines) + "\n")
    return folder / "captions.tsv"


def timed(data: DataParams, root: Path) -> dict:
    start = time.perf_counter()
    report = run(data, root)
    seconds = time.perf_counter() - start
    return {"images": report["accepted"], "seconds": round(seconds, 2),
            "images_per_s": round(report["accepted"] / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--source-size", type=int, default=256, help="side of the PNGs before ingest resizes them")
    ap.add_argument("--image-size", type=int, default=64, help="stored side (data.image_size)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    def params(**source) -> DataParams:
        return DataParams(image_size=args.image_size, workers=args.workers, **source)

    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        tmp = Path(tmp)
        csv = write_pngs(tmp / "src", args.images, args.source_size)
        results = {
            "csv_png": timed(params(source="csv", csv={"path": str(csv)}), tmp / "csv"),
            "synthetic": timed(params(source="synthetic", synthetic={"num_images": args.images}), tmp / "synthetic"),
        }
    write_json(OUT, {"workers": args.workers, "cpus": os.cpu_count(), "source_size": args.source_size,
                     "image_size": args.image_size, **results})
    for name, r in results.items():
        print(f"{name}: {r['images']} images in {r['seconds']} s, {r['images_per_s']} images/s")


if __name__ == "__main__":
    main()
