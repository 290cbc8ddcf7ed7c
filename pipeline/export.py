"""Stage `export`: ONNX encoders for downstream apps, checked against torch, registered in MLflow.

Parity is enforced, not just reported: the stage fails when onnxruntime's embeddings drift past
the tolerance or when any zero-shot task's top-1 differs from torch's. The int8 variant is
published (models/onnx/int8) only when it loses at most `export.int8_max_drop` top-1 on every task.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from clipmodel.checkpoint import load_model
from clipmodel.data import Corpus, to_tensor
from clipmodel.export import export_onnx, parity, quantize_int8
from clipmodel.io import write_json
from clipmodel.runtime import ClipRuntime
from clipmodel.tokenizer import load_tokenizer
from pipeline import registry, tracking
from pipeline.evaluate import embed_images, tasks_for, text_encoder, zero_shot
from pipeline.params import load_params

ONNX_DIR = Path("models/onnx")
INT8_DIR = ONNX_DIR / "int8"  # inside the stage output, so DVC tracks it when published


def onnx_top1(rt: ClipRuntime, tasks, pixels: np.ndarray, templates: dict) -> dict[str, float]:
    feats = torch.from_numpy(rt.embed_pixels(pixels))
    encode = lambda texts: torch.from_numpy(rt.encode_texts(texts))  # noqa: E731
    return {t.name: zero_shot(t, feats, encode, templates[t.templates])["top1"] for t in tasks}


def median_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = load_params()
    ex = p.export
    export_onnx("models", ONNX_DIR, opset=ex.opset)
    corpus = Corpus.load("data")
    test = corpus.split("test")
    pixels = corpus.images(test)
    tokens = np.asarray(corpus.tokens[corpus.caption_start[test]])
    check = parity("models", ONNX_DIR, pixels, tokens)

    model, _ = load_model("models")
    templates = yaml.safe_load(Path(p.evaluate.templates).read_text())
    tasks = tasks_for(p, corpus, test)
    feats = embed_images(model, corpus, test, p.evaluate.batch_size)
    encode = text_encoder(model, load_tokenizer("models/tokenizer.json"), p.evaluate.batch_size)
    torch_top1 = {t.name: zero_shot(t, feats, encode, templates[t.templates])["top1"] for t in tasks}
    rt = ClipRuntime.load(ONNX_DIR)
    ort_top1 = onnx_top1(rt, tasks, pixels, templates)
    report = {**check, "torch_top1": torch_top1, "onnx_top1": ort_top1}

    sizes = quantize_int8(ONNX_DIR, INT8_DIR)
    rt8 = ClipRuntime.load(INT8_DIR)
    int8_top1 = onnx_top1(rt8, tasks, pixels, templates)
    batch = pixels[:32]
    drop = max((ort_top1[k] - int8_top1[k] for k in ort_top1), default=0.0)
    published = drop <= ex.int8_max_drop
    report["int8"] = {"top1": int8_top1, "max_top1_drop": drop, "published": published, "bytes": sizes,
                      "image_batch32_ms": {"fp32": median_ms(lambda: rt.embed_pixels(batch)),
                                           "int8": median_ms(lambda: rt8.embed_pixels(batch))}}
    if not published:
        shutil.rmtree(INT8_DIR)
    write_json("reports/export.json", report)

    failures = []
    if check["max_abs_diff"] > ex.max_abs_diff or check["min_cosine"] < ex.min_cosine:
        failures.append(f"embeddings differ (max |diff| {check['max_abs_diff']:.2e}, min cosine {check['min_cosine']:.7f})")
    failures += [f"{k}: torch top-1 {torch_top1[k]:.4f} != onnx {ort_top1[k]:.4f}"
                 for k in torch_top1 if torch_top1[k] != ort_top1[k]]
    if failures:
        raise SystemExit("export: ONNX parity failed: " + "; ".join(failures))

    metrics = tracking.flatten(json.loads(Path("reports/metrics.json").read_text()))
    if ex.champion_metric not in metrics:
        raise SystemExit(f"export: params.yaml export.champion_metric: {ex.champion_metric!r} is not in reports/metrics.json")
    with tracking.pipeline_run() as run_id:
        info = tracking.mlflow.get_run(run_id)
        tags = {"git_commit": info.data.tags.get("git_commit", "unknown"),
                "data_fingerprint": info.data.tags.get("data_fingerprint", "unknown"), "mlflow_run_id": run_id}
        key_metrics = {k: str(v) for k, v in metrics.items() if k.endswith(".top1") or k.endswith(".r1")}
        sample = to_tensor(pixels[:2]).numpy()
        versions = registry.register(ONNX_DIR, sample, tokens[:2].astype(np.int64),
                                     {registry.IMAGE_MODEL: rt.embed_pixels(pixels[:2]),
                                      registry.TEXT_MODEL: rt.embed_tokens(tokens[:2])},
                                     ex.champion_metric, float(metrics[ex.champion_metric]), {**tags, **key_metrics})
        tracking.mlflow.log_metrics({"export.max_abs_diff": check["max_abs_diff"], "export.min_cosine": check["min_cosine"]})
        tracking.mlflow.log_artifact("reports/export.json")
    report["registry"] = versions
    write_json("reports/export.json", report)
    print(f"export: parity {check}; registry {versions}; int8 published: {published} (max drop {drop:.4f})")


if __name__ == "__main__":
    main()
