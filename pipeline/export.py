"""Stage `export`: ONNX encoders for downstream apps, checked against torch, registered in MLflow.

Parity is enforced, not just reported: the stage fails when onnxruntime's embeddings drift past
the tolerance or when any zero-shot task's or held-out set's top-1 differs from torch's. The int8
variant (static, so an embedding never depends on its batch) is published (models/onnx/int8) only when
it loses at most `export.int8_max_drop` top-1 on every task and set and is faster or at most half the
size; with no task to check it on, it is not published.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clipmodel import evaluation
from clipmodel.data import Corpus, to_tensor
from clipmodel.encoder import Encoder
from clipmodel.export import MODEL_CARD, batch_dependence, calibration_sample, export_onnx, parity, quantize_int8
from clipmodel.io import atomic_path, write_json
from clipmodel.runtime import ClipRuntime
from pipeline import registry, tracking
from pipeline.dvcfile import flatten
from pipeline.evaluation_sets import held_out_sets, read_templates, templates_of
from pipeline.params import Params, load_params
from pipeline.tasks import tasks_for

PARITY_IMAGES = 256  # images checked for embedding parity when there is no test split


def champion_metric(p: Params, metrics: dict[str, float]) -> str:
    """export.champion_metric, or the data's natural one: the first held-out set's top-1, the synthetic
    shape task, or image->text R@1. Checked before anything is written.

    Raises: SystemExit (one line) when the named metric is not in reports/metrics.json."""
    name = p.export.champion_metric
    if name is None:
        candidates = [f"zero_shot.{s}.top1" for s in p.evaluate.datasets]
        candidates += ["zero_shot.shape.top1"] if p.data.source == "synthetic" else []
        name = next((c for c in candidates + ["retrieval.image_to_text.r1"] if c in metrics), None)
        if name is None:
            raise SystemExit("export: reports/metrics.json has no metric to rank models by; "
                             "set export.champion_metric")
    if name not in metrics:
        raise SystemExit(f"export: params.yaml export.champion_metric: {name!r} is not in reports/metrics.json "
                         f"(it has e.g. {', '.join(k for k in metrics if k.endswith(('.top1', '.r1')))})")
    return name


class Checks:
    """The zero-shot top-1 that parity and the int8 check compare: the synthetic tasks on the test split
    and every held-out set, each computed from one encoder's embeddings."""

    def __init__(self, p: Params, corpus: Corpus, test: np.ndarray, enc: Encoder):
        table = read_templates(p.evaluate.templates)
        self.support = enc.support  # the bank evaluate scored with, the same for every encoder compared
        self.tasks = [(t, templates_of(table, t.templates, f"task {t.name}"))
                      for t in tasks_for(p.data, corpus.manifest.labels.to_numpy()[test])]
        self.test_pixels = corpus.images(test) if self.tasks else None
        self.sets = []
        for ds, templates in held_out_sets(p.evaluate, table):
            pixels, kept, _ = evaluation.embed_images(ds.images, enc.load_image, np.stack)
            self.sets.append((ds, templates, pixels, ds.targets()[kept]))

    def templates(self) -> dict[str, list[str]]:
        """Task or set name -> the templates evaluate scored it with (the model card lists them)."""
        return {**{t.name: templates for t, templates in self.tasks},
                **{ds.name: templates for ds, templates, _, _ in self.sets}}

    def __bool__(self) -> bool:
        return bool(self.tasks or self.sets)

    def top1(self, embed_pixels: Callable[[np.ndarray], np.ndarray],
             embed_texts: Callable[[list[str]], np.ndarray]) -> dict[str, float]:
        """Zero-shot top-1 (a fraction in [0, 1]) by task or set name, with one encoder's callables:
        `embed_pixels` maps uint8 [N, S, S, 3] to [N, D], `embed_texts` n strings to [n, D]. The same
        images and templates on every call, so two encoders' results compare exactly."""
        out = {}
        if self.tasks:
            feats = embed_pixels(self.test_pixels)
            for task, templates in self.tasks:
                out[task.name] = evaluation.zero_shot(feats[task.mask], task.targets[task.mask], task.classes,
                                                      embed_texts, templates, task.texts,
                                                      support=self.support)[0]["top1"]
        for ds, templates, pixels, targets in self.sets:
            out[ds.name] = evaluation.zero_shot(embed_pixels(pixels), targets, ds.classnames, embed_texts,
                                                templates, support=self.support)[0]["top1"]
        return out


def held_out_descriptions(p: Params, metrics: dict[str, float]) -> dict[str, str]:
    """Held-out set name -> what its zero-shot figures were measured on, for the model card: the file,
    images scored and classes, and where the class list came from (flattened reports/metrics.json)."""
    out = {}
    for name, spec in p.evaluate.datasets.items():
        source = ("its sorted distinct labels" if spec.classnames is None else
                  f"the classes in {spec.classnames}" if isinstance(spec.classnames, str) else
                  "names for its labels in params.yaml" if isinstance(spec.classnames, dict) else "a list in params.yaml")
        out[name] = (f"`{spec.path}`, {metrics.get(f'zero_shot.{name}.n', 0):,.0f} images, "
                     f"{metrics.get(f'zero_shot.{name}.classes', 0):,.0f} classes ({source})")
    return out


SYNTHETIC_DATA = ("synthetic scenes drawn and captioned by the ingest stage (clipmodel/synthetic.py), "
                  "generated by this project's code")


def training_data(p: Params) -> str | None:
    """The model card's words on the training data: export.dataset and its licence; for the synthetic
    scenes, unless set, what they are; else None."""
    ex = p.export
    if ex.dataset is None:
        return SYNTHETIC_DATA if p.data.source == "synthetic" else None
    return f"{ex.dataset}; licence: {ex.dataset_license or 'not stated in export.dataset_license'}"


def append_to_card(folder: Path, text: str) -> None:
    """Add `text` to the end of `folder`'s MODEL.md, atomically."""
    with atomic_path(folder / MODEL_CARD) as tmp:
        tmp.write_text((folder / MODEL_CARD).read_text() + text)


def median_ms(fn, repeats: int = 10, warmup: int = 6) -> float:
    """Median wall time of `repeats` calls of `fn()`, in milliseconds, after `warmup` untimed calls: a
    fresh int8 session takes about six calls of 256 captions to settle (84 ms falling to 56 on 2 EPYC
    cores), so one warm-up call let a single export report int8 no faster than fp32."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths: the defaults are the root pipeline's, which dvc.yaml passes explicitly."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models"), help="input: the model folder train wrote")
    ap.add_argument("--data", type=Path, default=Path("data"), help="input: the corpus folder")
    ap.add_argument("--metrics", type=Path, default=Path("reports/metrics.json"), help="input: evaluate's metrics")
    ap.add_argument("--run", type=Path, default=Path("reports/run.json"), help="input: the MLflow run id")
    ap.add_argument("--onnx", type=Path, default=Path("models/onnx"),
                    help="output: the ONNX folder (int8/ inside it when published, so DVC tracks it)")
    ap.add_argument("--report", type=Path, default=Path("reports/export.json"), help="output: the report")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the stage. Raises: SystemExit (one line) when no champion metric can be found (see
    `champion_metric`), for a bad templates file or held-out set, or when ONNX parity fails (then
    the report is written but nothing is registered)."""
    args = parse_args(argv)
    onnx_dir, int8_dir = args.onnx, args.onnx / "int8"
    p = load_params()
    ex = p.export
    metrics = flatten(json.loads(args.metrics.read_text()))
    metric = champion_metric(p, metrics)
    corpus = Corpus.load(args.data)
    test = corpus.split("test")
    enc = Encoder.load(args.model, p.evaluate.batch_size)
    checks = Checks(p, corpus, test, enc)
    # Embedding parity on the test split, or on the first images of the corpus when there is none.
    sample = test if len(test) else np.arange(min(PARITY_IMAGES, len(corpus.manifest)))
    pixels = corpus.images(sample)
    tokens = np.asarray(corpus.tokens[corpus.caption_start[sample]])

    key_metrics = {k: v for k, v in metrics.items() if k.endswith((".top1", ".r1", ".top1_without_support"))}
    export_onnx(args.model, onnx_dir, opset=ex.opset, metrics=key_metrics, evaluated_templates=checks.templates(),
                evaluated_sets=held_out_descriptions(p, metrics), training_data=training_data(p))
    check = parity(args.model, onnx_dir, pixels, tokens)
    rt = ClipRuntime.load(onnx_dir)
    torch_top1 = checks.top1(enc.pixels, enc.texts)
    ort_top1 = checks.top1(rt.embed_pixels, rt.encode_texts)
    report = {**check, "torch_top1": torch_top1, "onnx_top1": ort_top1}

    sizes = quantize_int8(onnx_dir, int8_dir, *calibration_sample(corpus))
    rt8 = ClipRuntime.load(int8_dir)
    int8_top1 = checks.top1(rt8.embed_pixels, rt8.encode_texts) if checks else {}
    drop = max((ort_top1[k] - int8_top1[k] for k in ort_top1), default=None)
    images, captions = pixels[:32], tokens[:256]
    ms = {"image_batch32_ms": {"fp32": median_ms(lambda: rt.embed_pixels(images)),
                               "int8": median_ms(lambda: rt8.embed_pixels(images))},
          "text_batch256_ms": {"fp32": median_ms(lambda: rt.embed_tokens(captions)),
                               "int8": median_ms(lambda: rt8.embed_tokens(captions))}}
    quicker = [k.split("_")[0] for k, m in ms.items() if m["int8"] < m["fp32"]]  # the encoders int8 speeds up
    size_ratio = sum(v for k, v in sizes.items() if k.endswith("int8")) / sum(
        v for k, v in sizes.items() if k.endswith("fp32"))
    smaller = size_ratio <= 0.5
    published = drop is not None and drop <= ex.int8_max_drop and (bool(quicker) or smaller)
    rule = " and ".join(r for r, ok in ((f"faster ({', '.join(quicker)})", quicker), ("at most half the size", smaller))
                        if ok) or "neither"
    report["int8"] = {"scheme": "static QDQ (Conv, MatMul, Gemm; int8 per-channel weights, uint8 activations "
                                "calibrated on train images and captions)",
                      "top1": int8_top1, "max_top1_drop": drop, "published": published, "rule_met": rule,
                      "size_ratio": size_ratio, "bytes": sizes, **ms,
                      "batch1_vs_batch32_max_abs_diff": batch_dependence(rt8, images, tokens[:32])}
    if published:
        figures = "\n".join(f"- {k}: {int8_top1[k]:.4f} (float32 {ort_top1[k]:.4f})" for k in int8_top1)
        append_to_card(int8_dir, "\nZero-shot top-1 of these int8 encoders, the float32 ones' beside, on the "
                       f"same images, templates and support set:\n{figures}\n")  # its own figures
        append_to_card(onnx_dir, f"""
## int8 variant
`int8/` holds a statically quantised copy of both encoders ({size_ratio:.2f}x their bytes; the folder
repeats the tokenizer and support set), with the same inputs, outputs and steps. Its zero-shot top-1
(these encoders' beside; more in its MODEL.md):
{figures}
""")
    else:
        shutil.rmtree(int8_dir)
    write_json(args.report, report)

    failures = []
    if check["max_abs_diff"] > ex.max_abs_diff or check["min_cosine"] < ex.min_cosine:
        failures.append(f"embeddings differ (max |diff| {check['max_abs_diff']:.2e}, min cosine {check['min_cosine']:.7f})")
    failures += [f"{k}: torch top-1 {torch_top1[k]:.4f} != onnx {ort_top1[k]:.4f}"
                 for k in torch_top1 if torch_top1[k] != ort_top1[k]]
    if failures:
        raise SystemExit("export: ONNX parity failed: " + "; ".join(failures))

    with tracking.pipeline_run(flatten(p.model_dump()), args.run) as run_id:
        run_tags = tracking.mlflow.get_run(run_id).data.tags  # tracking.pipeline_tags: where the model came from
        tags = {"git_commit": "unknown", "data_fingerprint": "unknown", "mlflow_run_id": run_id,
                **{k: run_tags[k] for k in ("git_commit", "data_fingerprint", "dvc_experiment", "prefect_flow_run_id")
                   if k in run_tags}}
        example = to_tensor(pixels[:2]).numpy()
        versions = registry.register(onnx_dir, example, tokens[:2].astype(np.int64),
                                     {registry.IMAGE_MODEL: rt.embed_pixels(pixels[:2]),
                                      registry.TEXT_MODEL: rt.embed_tokens(tokens[:2])},
                                     metric, float(metrics[metric]),
                                     {**tags, **{k: str(v) for k, v in key_metrics.items()}})
        tracking.mlflow.log_metrics({"export.max_abs_diff": check["max_abs_diff"], "export.min_cosine": check["min_cosine"]})
        tracking.mlflow.log_artifact(str(args.report))
    report["registry"], report["mlflow_run_id"] = versions, run_id
    write_json(args.report, report)
    times = ", ".join(f"{k.removesuffix('_ms').replace('_batch', ' batch ')} {m['int8']:.1f} ms against {m['fp32']:.1f}"
                      for k, m in ms.items())
    why = (f"int8 against fp32: top-1 drop at most {drop:.4f} (negative: int8 scored higher), {times}, "
           f"{size_ratio:.2f}x the bytes; rule met: {rule}" if drop is not None
           else "no zero-shot task or held-out set to check it on")
    print(f"export: parity {check}; registry {versions} by {metric}; int8 published: {published} ({why})")


if __name__ == "__main__":
    main()
