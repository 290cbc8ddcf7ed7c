"""The figures docs/scale.md builds on that a CPU can measure: model sizes and FLOPs, the checkpoint's
size and write time, image decode costs and the WebDataset stream's throughput per core at 224 px.

- models: parameters and FLOPs per sample of CLIP's ViT-B/16 and ViT-B/32 (benchmarks/presets.py),
  counted by benchmarks/flops.py: each tower's forward, and a training step's forward and backward
  (captions padded to the context of 77);
- checkpoint: `TrainState.save` of the ViT-B/16 after one step (weights, AdamW's two moments, the
  schedule, RNG states), its bytes and the seconds to write and read it on this machine's disk;
- decode: bytes and single-core decode time at 224 px of a synthetic scene as ingest stores it
  (PNG), and of a stand-in for a photograph (1/f noise, whose spectrum falls off as natural images'
  do) as PNG and as JPEG at quality 90 (what LAION-style shards hold);
- stream: samples/s of clipmodel.stream.StreamingBatches in one process (one core) over tar shards
  that the ingest stage wrote at 224 px, as the CPU stage makes batches (normalised, cropped) and
  as a GPU run takes them (raw uint8 pixels), and the mean size and decode time of those shards' PNGs
  (the synthetic scenes compress far better than photographs: compare `decode`).
Results: reports/benchmarks/scale_inputs.json.

    python benchmarks/scale_inputs.py
"""
from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.flops import count_flops  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.presets import CLIP_VOCAB, preset_params  # noqa: E402
from clipmodel import synthetic  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.shards import BadSample, read_samples  # noqa: E402
from clipmodel.model import CLIP, CLIPConfig  # noqa: E402
from clipmodel.stream import StreamingBatches  # noqa: E402
from clipmodel.tokenizer import train_tokenizer  # noqa: E402
from pipeline.ingest import run  # noqa: E402
from pipeline.loop import Objective, TrainState, train_step  # noqa: E402
from pipeline.objectives import clip_objective  # noqa: E402
from pipeline.params import DataParams, Params  # noqa: E402
from pipeline.run import model_config  # noqa: E402

CPU = torch.device("cpu")


def preset(name: str) -> tuple[Params, CLIPConfig]:
    p = Params.model_validate(preset_params(name, {"train": {"device": "cpu", "precision": "fp32"}}))
    return p, model_config(p, CLIP_VOCAB)


def model_figures(name: str) -> dict:
    p, cfg = preset(name)
    torch.manual_seed(0)
    model = CLIP(cfg)
    b = 2
    images = torch.randn(b, 3, cfg.image_size, cfg.image_size)
    tokens = torch.randint(3, 1000, (b, cfg.context_length))
    with torch.no_grad():
        image_fwd = count_flops(lambda: model.encode_image(images)) / b
        text_fwd = count_flops(lambda: model.encode_text(tokens)) / b
    loss = clip_objective(model, p)
    batch = {"images": images, "tokens": tokens, "caption_ids": torch.arange(b)}
    train = count_flops(lambda: loss(batch).backward()) / b
    params = sum(x.numel() for x in model.parameters())
    visual = sum(x.numel() for x in model.visual.parameters())
    return {"parameters": params, "image_tower_parameters": visual, "text_and_shared_parameters": params - visual,
            "image_forward_flops_per_sample": image_fwd, "text_forward_flops_per_sample": text_fwd,
            "train_flops_per_sample": train, "train_over_forward": train / (image_fwd + text_fwd),
            "config": cfg.to_dict()}


def checkpoint_figures(folder: Path) -> dict:
    p, cfg = preset("vitb16")
    torch.manual_seed(0)
    model = CLIP(cfg)
    state = TrainState(model, p.train, total=10, device=CPU, precision="fp32")
    obj = Objective(model, clip_objective(model, p))
    batch = {"images": torch.randn(2, 3, 224, 224), "tokens": torch.randint(3, 1000, (2, 77)),
             "caption_ids": torch.arange(2)}
    train_step(obj, model, state, batch, p.train, CPU, "fp32")  # AdamW's moments exist from the first step
    path = folder / "train.pt"
    start = time.perf_counter()
    state.save(path, "fingerprint", None)
    write_s = time.perf_counter() - start
    size = path.stat().st_size
    os.sync()
    start = time.perf_counter()
    torch.load(path, map_location="cpu", weights_only=True)
    read_s = time.perf_counter() - start
    weights = sum(x.numel() * x.element_size() for x in model.state_dict().values())
    path.unlink()
    return {"model": "vitb16", "bytes": size, "weights_bytes": weights, "write_s": write_s,
            "read_s_page_cache": read_s, "write_mb_per_s": size / write_s / 2**20}


def photo_standin(size: int, seed: int = 0) -> np.ndarray:
    """uint8 [size, size, 3] noise with a 1/f amplitude spectrum, as natural images have (Field 1987)."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    amplitude = 1 / np.maximum(np.hypot(fx, fy), 1 / size)
    out = []
    for _ in range(3):
        phase = np.exp(2j * np.pi * rng.random((size, size)))
        channel = np.fft.ifft2(amplitude * phase).real
        out.append((channel - channel.min()) / np.ptp(channel))
    return (np.stack(out, -1) * 255).round().astype(np.uint8)


def decode_ms(data: bytes, repeats: int = 200) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def encoded(pixels: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def decode_figures() -> dict:
    scene = synthetic.render(synthetic.sample(0, 0, 3)[0], 224)
    photo = photo_standin(224)
    out = {}
    for name, data in (("synthetic_png", encoded(scene, "PNG")), ("photo_standin_png", encoded(photo, "PNG")),
                       ("photo_standin_jpeg_q90", encoded(photo, "JPEG", quality=90))):
        out[name] = {"bytes": len(data), "decode_ms": decode_ms(data)}
    return out


def stream_figures(folder: Path, images: int = 600, samples: int = 1024, batch: int = 64) -> dict:
    data = DataParams(source="synthetic", image_size=224, output_format="webdataset", shard_images=256,
                      workers=len(os.sched_getaffinity(0)), val_fraction=0.01, test_fraction=0.01,
                      synthetic={"num_images": images})
    run(data, folder)
    shards = sorted((folder / "data/images").glob("train-*.tar"))
    captions = pd.read_parquet(folder / "data/manifest.parquet", columns=["captions"]).captions
    train_tokenizer((c for caps in captions for c in caps), 1024, 77).save(str(folder / "tokenizer.json"))
    pngs = [item.files["png"] for item in read_samples(shards[0]) if not isinstance(item, BadSample)]
    torch.set_num_threads(1)
    out = {"shards": len(shards), "shard_mib": sum(s.stat().st_size for s in shards) / 2**20,
           "samples_in_shards": images, "batch_size": batch, "threads": 1,
           "shard_png_bytes_mean": statistics.mean(map(len, pngs)),
           "shard_png_decode_ms_mean": statistics.mean(decode_ms(png, repeats=3) for png in pngs)}
    for raw in (False, True):
        ds = StreamingBatches([str(s) for s in shards], folder / "tokenizer.json", batch, 224, seed=0,
                              crop_scale=(0.9, 1.0), shuffle_buffer=256)
        it = iter(ds.rank_batches(0, 10**6, workers=0, raw_pixels=raw))
        next(it)  # the shuffle buffer filled
        start = time.perf_counter()
        for _ in range(samples // batch):
            next(it)
        out["raw_pixels" if raw else "normalised_and_cropped"] = {
            "samples_per_s_per_core": samples // batch * batch / (time.perf_counter() - start)}
    return out


def main() -> None:
    result = {"models": {name: model_figures(name) for name in ("vitb16", "vitb32")}}
    print({k: {kk: vv for kk, vv in v.items() if kk != "config"} for k, v in result["models"].items()}, flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-inputs-") as tmp:
        result["checkpoint"] = checkpoint_figures(Path(tmp))
        print(result["checkpoint"], flush=True)
        result["decode"] = decode_figures()
        print(result["decode"], flush=True)
        result["stream"] = stream_figures(Path(tmp))
        print(result["stream"], flush=True)
    result["setup"] = {"cpu": cpu_name(), "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                       "pillow": Image.__version__, "disk": "this VM's root disk (/tmp)"}
    write_json(ROOT / "reports/benchmarks/scale_inputs.json", result)


if __name__ == "__main__":
    main()
