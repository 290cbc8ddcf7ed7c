"""CPU latency of the exported encoders under onnxruntime against torch eager, in one run.

Uses models/ when the train stage has written it, otherwise a randomly initialised model of the size
params.yaml describes (latency does not depend on the weights). Each case is timed as the median of
repeated calls after warm-up. Besides the session options clip-onnx ships (`runtime.session_options`),
a few alternatives are timed so the choice stays justified on the machine at hand. Writes
reports/benchmarks/onnx.json.

    python benchmarks/onnx_latency.py [--seconds 1.0] [--random]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `benchmarks` is not an installed package
from benchmarks.machine import cpu_name  # noqa: E402
from clipmodel import runtime, synthetic  # noqa: E402
from clipmodel.checkpoint import save_safetensors  # noqa: E402
from clipmodel.data import MEAN, STD  # noqa: E402
from clipmodel.export import IMAGE_ONNX, TEXT_ONNX, export_onnx, load_model, quantize_int8  # noqa: E402
from clipmodel.io import write_json  # noqa: E402
from clipmodel.model import CLIP, CLIPConfig  # noqa: E402
from clipmodel.tokenizer import encode, load_tokenizer, train_tokenizer, trim_padding  # noqa: E402
import onnxruntime as ort  # noqa: E402  (after clipmodel, which turns its telemetry off)

OUT = Path("reports/benchmarks/onnx.json")
CASES = {"image_b1": ("image", 1), "image_b32": ("image", 32), "text_b1": ("text", 1), "text_b256": ("text", 256)}


def random_model_folder(folder: Path) -> Path:
    """A model folder like the train stage's, sized by params.yaml, with random weights."""
    p = yaml.safe_load(Path("params.yaml").read_text())
    m, ctx = p["model"], p["tokenize"]["context_length"]
    captions = [synthetic.sample(0, i, 3)[1][0] for i in range(2000)]
    tok = train_tokenizer(captions, p["tokenize"]["vocab_size"], ctx)
    cfg = CLIPConfig(embed_dim=m["embed_dim"], image_size=p["data"]["image_size"], vision=m["vision"],
                     vision_width=m["vision_width"], vision_layers=m["vision_layers"],
                     vision_heads=m["vision_heads"], vision_patch_size=m["vision_patch_size"], context_length=ctx,
                     vocab_size=tok.get_vocab_size(), text_width=m["text_width"], text_heads=m["text_heads"],
                     text_layers=m["text_layers"])
    folder.mkdir(parents=True)
    save_safetensors(CLIP(cfg), folder / "clip.safetensors")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({
        "model": cfg.to_dict(), "tokenizer": "tokenizer.json",
        "preprocess": {"image_size": cfg.image_size, "resize": "shorter_side_bicubic", "crop": "center",
                       "mean": list(MEAN), "std": list(STD), "background": p["data"]["background"]},
        "data_fingerprint": "random-weights"}))
    return folder


def median_ms(fns: dict[str, Callable[[], object]], seconds: float, blocks: int = 3) -> dict[str, float]:
    """Median wall time of one call of each function, in ms.

    Each function runs in `blocks` stretches (two warm-up calls, then 3 to 100 timed calls within
    `seconds / blocks`), the functions taking turns, so drifting load from other processes falls on all
    of them alike. A pause before each stretch lets the previous one's threads stop spinning (OpenMP's
    and onnxruntime's pools busy-wait after a call) instead of competing with the next.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            time.sleep(0.3)
            fn()
            fn()
            deadline = time.perf_counter() + seconds / blocks
            for i in range(100):
                if i >= 3 and time.perf_counter() > deadline:
                    break
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: round(1000 * statistics.median(t), 3) for name, t in times.items()}


def variants(threads: int) -> dict[str, ort.SessionOptions]:
    """The shipped options and single changes to them."""
    def opts(**changes) -> ort.SessionOptions:
        o = runtime.session_options(changes.pop("threads", threads))
        for key, value in changes.items():
            if key == "spinning":
                o.add_session_config_entry("session.intra_op.allow_spinning", "1")
            else:
                setattr(o, key, value)
        return o

    return {
        "ort_defaults": ort.SessionOptions(),
        "shipped": opts(),
        "spinning": opts(spinning=True),
        "parallel": opts(execution_mode=ort.ExecutionMode.ORT_PARALLEL, inter_op_num_threads=threads),
        "basic_opt": opts(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
        "extended_opt": opts(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
        "one_thread": opts(threads=1),
    }


def describe(o: ort.SessionOptions) -> dict[str, object]:
    return {"graph_optimization_level": str(o.graph_optimization_level), "execution_mode": str(o.execution_mode),
            "intra_op_num_threads": o.intra_op_num_threads, "inter_op_num_threads": o.inter_op_num_threads,
            "allow_spinning": o.get_session_config_entry("session.intra_op.allow_spinning")}


def session(path: Path, options: ort.SessionOptions) -> tuple[ort.InferenceSession, float]:
    start = time.perf_counter()
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess, round(time.perf_counter() - start, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="timing budget per case and variant")
    ap.add_argument("--random", action="store_true", help="random weights at params.yaml sizes even if models/ exists")
    args = ap.parse_args()
    threads = runtime.default_threads()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]  # other processes on the cores skew every number: record them
    with tempfile.TemporaryDirectory(prefix="onnx-bench-") as tmp:
        tmp = Path(tmp)
        trained = Path("models/config.json").is_file() and not args.random
        folder = Path("models") if trained else random_model_folder(tmp / "models")
        onnx_dir = export_onnx(folder, tmp / "onnx")
        int8_sizes = quantize_int8(onnx_dir, tmp / "int8")
        # Opset 23 has native Attention and Gelu ops; export_onnx defaults to 18 so older runtimes load it.
        other_dirs = {"int8": tmp / "int8", "opset23": export_onnx(folder, tmp / "onnx23", opset=23)}
        model, _ = load_model(folder)
        pre = runtime.Preprocess.read(onnx_dir / "preprocess.json")
        rng = np.random.default_rng(0)
        captions = [synthetic.sample(1, i, 3)[1][0] for i in range(256)]
        tokens = encode(load_tokenizer(onnx_dir / "tokenizer.json"), captions)[0].astype(np.int64)
        # Both sides get the batch without its pad columns, as `Encoder.texts` and `ClipRuntime.embed_tokens`
        # pass it (exact for the causal text tower); the int8 copy's graph keeps the sequence axis symbolic.
        inputs = {name: (pre.normalise(rng.integers(0, 256, (n, pre.image_size, pre.image_size, 3), dtype=np.uint8))
                         if tower == "image" else np.ascontiguousarray(trim_padding(tokens[:n])))
                  for name, (tower, n) in CASES.items()}

        sessions: dict[str, dict[str, ort.InferenceSession]] = {}
        load_s: dict[str, float] = {}
        shipped_options = {label: runtime.session_options(threads) for label in other_dirs}
        for label, options in {**variants(threads), **shipped_options}.items():
            model_dir = other_dirs.get(label, onnx_dir)
            sessions[label] = {}
            for tower, file in (("image", IMAGE_ONNX), ("text", TEXT_ONNX)):
                sessions[label][tower], load_s[f"{label}_{tower}"] = session(model_dir / file, options)
        # A model saved after full optimisation loads without re-optimising: time its load and its runs.
        saved = runtime.session_options(threads)
        saved.optimized_model_filepath = str(tmp / "image_optimised.onnx")
        session(onnx_dir / IMAGE_ONNX, saved)
        plain = runtime.session_options(threads)
        plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        preoptimised, load_s["preoptimised_image"] = session(tmp / "image_optimised.onnx", plain)

        results: dict[str, dict[str, float]] = {}
        with torch.inference_mode():
            for name, (tower, _) in CASES.items():
                x = inputs[name]
                feed = {"pixels" if tower == "image" else "tokens": x}
                encode_fn = model.encode_image if tower == "image" else model.encode_text
                xt = torch.from_numpy(x)
                fns = {"torch": lambda: F.normalize(encode_fn(xt), dim=-1)}
                fns.update({label: (lambda sess=by_tower[tower]: sess.run(None, feed))
                            for label, by_tower in sessions.items()})
                if tower == "image":
                    fns["preoptimised"] = lambda: preoptimised.run(None, feed)
                results[name] = median_ms(fns, args.seconds)
    torch_ms = {name: r["torch"] for name, r in results.items()}
    ort_ms = {label: {name: r[label] for name, r in results.items() if label in r}
              for label in results["image_b1"] if label != "torch"}

    shipped = ort_ms["shipped"]
    report = {
        "model": {"source": "models/" if trained else "random weights, params.yaml sizes", **model.cfg.to_dict()},
        "machine": {"cpus": os.cpu_count(), "physical_cores_used": threads, "processor": cpu_name(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "onnxruntime": ort.__version__, "python": platform.python_version(),
                    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}},
        "session_options": describe(runtime.session_options(threads)),
        "torch_ms": torch_ms,
        "ort_ms": shipped,
        "ratio_ort_over_torch": {name: round(shipped[name] / torch_ms[name], 3) for name in CASES},
        "variants_ms": ort_ms,
        "variant_ratios": {label: {name: round(ms / torch_ms[name], 3) for name, ms in times.items()}
                           for label, times in ort_ms.items()},
        "session_load_s": load_s,
        "int8_sizes_bytes": int8_sizes,
    }
    write_json(OUT, report)
    print(f"{'case':<10} {'torch ms':>9} {'ort ms':>9} {'ratio':>6}")
    for name in CASES:
        print(f"{name:<10} {torch_ms[name]:>9.3f} {shipped[name]:>9.3f} {report['ratio_ort_over_torch'][name]:>6.3f}")
    print(f"variants (ms): {json.dumps(ort_ms)}")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
