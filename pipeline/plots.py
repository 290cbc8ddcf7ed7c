"""PNG plots for reports/plots/: DVC renders them (`dvc plots show`) and MLflow stores them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
import numpy as np
import pandas as pd

from clipmodel.io import atomic_path


def save(fig: plt.Figure, path: Path) -> Path:
    """Write `fig` as a PNG at `path`, replaced atomically, and close it (pyplot keeps figures alive
    otherwise). Returns `path`."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_training_curves(log_csv: Path, path: Path) -> Path:
    """Loss, logit scale and learning rate(s) against step, from the training log CSV (`fit`'s
    log_csv: a `step` column; any of loss, logit_scale, lr, vision_lr that is absent is left out)."""
    log = pd.read_csv(log_csv)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, keys in zip(axes, (["loss"], ["logit_scale"], ["lr", "vision_lr"])):
        for key in keys:
            if key in log:
                ax.plot(log.step, log[key], label=key)
        ax.set_xlabel("step")
        ax.set_title(" / ".join(k for k in keys if k in log))
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:  # lr and vision_lr share a panel
            ax.legend()
    return save(fig, path)


MATRIX_CLASSES = 40  # past this many classes a confusion matrix is unreadable (and N x N memory): top pairs instead


@dataclass
class Scored:
    """One zero-shot task or held-out set, as evaluate scored it (clipmodel.evaluation.metrics)."""
    name: str
    classes: list[str]
    targets: np.ndarray                         # int64 [N]
    top: np.ndarray                             # int64 [N, k] predictions, best first
    result: dict                                # metrics, with per_class_recall and most_confused
    images: Callable[[np.ndarray], np.ndarray]  # rows of the N -> uint8 [n, S, S, 3]


def confusion(path: Path, s: Scored) -> Path:
    """The C x C confusion matrix of top-1 predictions, each row (true class) normalised to fractions.
    O(C^2) memory and figure size: `evaluation_plots` draws it only up to MATRIX_CLASSES classes."""
    n = len(s.classes)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (s.targets, s.top[:, 0]), 1)
    fig, ax = plt.subplots(figsize=(max(4, n * 0.28 + 2), max(3.5, n * 0.28 + 1.5)))
    norm = matrix / np.maximum(1, matrix.sum(1, keepdims=True))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), s.classes, rotation=90, fontsize=7 if n > 12 else 9)
    ax.set_yticks(range(n), s.classes, fontsize=7 if n > 12 else 9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"zero-shot {s.name}: confusion (row-normalised)")
    return save(fig, path)


def top_confusions(path: Path, s: Scored) -> Path:
    """The most frequent (true -> predicted) mistakes: a confusion plot whose size does not grow with classes."""
    pairs = s.result["most_confused"]
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(pairs) + 1.2))
    ax.barh(range(len(pairs)), [p["count"] for p in pairs])
    ax.set_yticks(range(len(pairs)), [f"{p['true'][:40]} -> {p['predicted'][:40]}" for p in pairs], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    repeats = "" if any(p["count"] > 1 for p in pairs) else "; no pair repeats, so these are ties"
    ax.set_title(f"zero-shot {s.name}: most frequent confusions ({len(s.classes)} classes{repeats})")
    return save(fig, path)


def per_class_recall(path: Path, s: Scored) -> Path:
    """A bar per class when they fit, else the distribution of per-class recall."""
    recall = s.result["per_class_recall"]
    if len(recall) <= MATRIX_CLASSES:
        fig, ax = plt.subplots(figsize=(max(4, len(recall) * 0.22 + 2), 3))
        ax.bar(range(len(recall)), list(recall.values()))
        ax.set_xticks(range(len(recall)), list(recall), rotation=90, fontsize=7 if len(recall) > 12 else 9)
        ax.set_ylim(0, 1)
    else:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(list(recall.values()), bins=20, range=(0, 1))
        ax.set_xlabel("recall")
        ax.set_ylabel("classes")
    ax.set_title(f"zero-shot {s.name}: per-class recall")
    return save(fig, path)


def similarity_heatmap(path: Path, sims: np.ndarray, captions: list[str]) -> Path:
    """Heatmap of cosine similarities float [n, n]: row i an image, column j the caption of image j
    (so a good model lights up the diagonal)."""
    n = len(captions)
    fig, ax = plt.subplots(figsize=(n * 0.45 + 4, n * 0.45 + 1))
    shown = ax.imshow(sims, cmap="viridis")
    fig.colorbar(shown, ax=ax, label="cosine similarity", shrink=0.8)
    ax.set_yticks(range(n), [f"image {i}" for i in range(n)], fontsize=7)
    ax.set_xticks(range(n), [c if len(c) <= 40 else c[:39] + "…" for c in captions], rotation=90, fontsize=7)
    ax.set_title("cosine similarity: test images x their captions")
    return save(fig, path)


def prediction_grid(path: Path, images: np.ndarray, truths: list[str], predictions: list[list[str]]) -> Path:
    """Images uint8 [n, S, S, 3], four per row, each titled with its true class and its ranked
    predicted classes (names cut to 30 characters)."""
    cols = 4
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, img, truth, preds in zip(np.atleast_1d(axes).ravel(), images, truths, predictions):
        ax.imshow(img)
        ax.set_title(f"true: {truth[:30]}\n" + "\n".join(f"{i + 1}. {p[:30]}" for i, p in enumerate(preds)), fontsize=7)
    return save(fig, path)


def evaluation_plots(out: Path, scored: list[Scored], sample: int = 12) -> list[Path]:
    """Per task or set: a confusion matrix (or its top pairs past MATRIX_CLASSES classes) and per-class
    recall; one grid of sample predictions (of `composition_seen`, else the first)."""
    paths = []
    for s in scored:
        if len(s.classes) <= MATRIX_CLASSES:
            paths.append(confusion(out / f"confusion_{s.name}.png", s))
        elif s.result["most_confused"]:
            paths.append(top_confusions(out / f"confusions_{s.name}.png", s))
        paths.append(per_class_recall(out / f"per_class_{s.name}.png", s))
    grid = next((s for s in scored if s.name == "composition_seen"), scored[0] if scored else None)
    if grid:
        rows = np.arange(min(sample, len(grid.targets)))
        paths.append(prediction_grid(out / "predictions.png", grid.images(rows),
                                     [grid.classes[t] for t in grid.targets[rows]],
                                     [[grid.classes[k] for k in row[:3]] for row in grid.top[rows]]))
    return paths


def test_similarity(path: Path, corpus, test: np.ndarray, image_feats: np.ndarray, text_feats: np.ndarray,
                    caption_rows: np.ndarray, sample: int = 12) -> Path:
    """Cosine similarities of the first test images with their first captions, labelled with the
    captions as the manifest holds them (not the tokens decoded, which are lower-cased and cut)."""
    n = min(sample, len(test))
    first = corpus.caption_start[test[:n]]
    row_of = {int(r): i for i, r in enumerate(caption_rows)}
    sims = image_feats[:n] @ text_feats[[row_of[int(c)] for c in first]].T
    return similarity_heatmap(path, sims, [str(corpus.manifest.captions.iat[int(i)][0]) for i in test[:n]])


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
