"""PNG plots for reports/plots/: DVC renders them (`dvc plots show`) and MLflow stores them."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from clipmodel.io import atomic_path  # noqa: E402
from clipmodel.tokenizer import decode  # noqa: E402


def save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_training_curves(log_csv: Path, path: Path) -> Path:
    log = pd.read_csv(log_csv)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, keys in zip(axes, (["loss"], ["logit_scale"], ["lr", "vision_lr"])):
        for key in keys:
            if key in log:
                ax.plot(log.step, log[key], label=key)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(k for k in keys if k in log))
        ax.grid(alpha=0.3)
    return save(fig, path)


def confusion(path: Path, name: str, classes: list[str], matrix: np.ndarray) -> Path:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, n * 0.28 + 2), max(3.5, n * 0.28 + 1.5)))
    norm = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=7 if n > 12 else 9)
    ax.set_yticks(range(n), classes, fontsize=7 if n > 12 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"zero-shot {name}: confusion (row-normalised)")
    return save(fig, path)


def per_class_accuracy(path: Path, name: str, accuracy: dict[str, float]) -> Path:
    classes, acc = list(accuracy), list(accuracy.values())
    fig, ax = plt.subplots(figsize=(max(4, len(classes) * 0.22 + 2), 3))
    ax.bar(range(len(classes)), acc)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7 if len(classes) > 12 else 9)
    ax.set_ylim(0, 1)
    ax.set_title(f"zero-shot {name}: per-class top-1")
    return save(fig, path)


def similarity_heatmap(path: Path, sims: np.ndarray, captions: list[str]) -> Path:
    n = len(captions)
    fig, ax = plt.subplots(figsize=(n * 0.45 + 4, n * 0.45 + 1))
    ax.imshow(sims, cmap="viridis")
    ax.set_yticks(range(n), [f"image {i}" for i in range(n)], fontsize=7)
    ax.set_xticks(range(n), captions, rotation=90, fontsize=7)
    ax.set_title("cosine similarity: test images x their captions")
    return save(fig, path)


def prediction_grid(path: Path, images: np.ndarray, truths: list[str], predictions: list[list[str]]) -> Path:
    cols = 4
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, truth, preds in zip(np.atleast_1d(axes).ravel(), images, truths, predictions):
        ax.imshow(img)
        ax.set_title(f"true: {truth}\n" + "\n".join(f"{i + 1}. {p}" for i, p in enumerate(preds)), fontsize=7)
    return save(fig, path)


def evaluation_plots(out: Path, results: dict, corpus, test: np.ndarray, image_feats, text_feats,
                     caption_rows: np.ndarray, tok, logit_scale: float, sample: int = 12) -> list[Path]:
    """Confusion and per-class plots per task, a similarity heat-map and a prediction grid."""
    paths = []
    for name, (task, r) in results.items():
        paths.append(confusion(out / f"confusion_{name}.png", name, task.classes, r["confusion"]))
        paths.append(per_class_accuracy(out / f"per_class_{name}.png", name, r["per_class"]))
    n = min(sample, len(test))
    first = corpus.caption_start[test[:n]]  # each sample image's first caption
    row_of = {int(r): i for i, r in enumerate(caption_rows)}
    sims = (image_feats[:n] @ text_feats[[row_of[int(c)] for c in first]].T).numpy()
    captions = [decode(tok, corpus.tokens[c]) for c in first]
    paths.append(similarity_heatmap(out / "similarity.png", sims, captions))
    grid_task = results.get("composition_seen") or next(iter(results.values()), None)
    if grid_task:
        task, r = grid_task
        where = np.flatnonzero(task.mask)[:sample]
        paths.append(prediction_grid(out / "predictions.png", corpus.images(test[where]),
                                     [task.classes[t] for t in task.targets[where]],
                                     [[task.classes[k] for k in row] for row in r["predictions"][: len(where)]]))
    return paths


def efficiency_curves(path: Path, curves: dict[str, tuple[list[int], list[float]]], target: float) -> Path:
    """The paper's Figure 2 on our data: zero-shot accuracy against images processed, log x-axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, (images, accuracy) in curves.items():
        ax.plot(images, accuracy, marker="o", label=name)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("images processed")
    ax.set_ylabel("zero-shot top-1 (mean over tasks)")
    ax.set_title("data efficiency of the training objective")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save(fig, path)
