"""Support-set zero-shot: each class vector joined by the training images whose captions match it.

Plain zero-shot sends an image x to argmax_c cos(x, t_c), with t_c the class's prompt embedding: an
image matched to a text, across the gap between the two modalities. Name-only transfer (Udandarao et
al. 2023, "SuS-X: Training-Free Name-Only Transfer of Vision-Language Models") adds, per class, images
found from its name alone. Here they come from the model's own training corpus: the class vector t_c
is matched to every training caption in text space, and the images of those captions, weighted by a
softmax of the caption cosines at `temperature`, average into a support vector s_c. The class score is
cos(x, t_c) + weight * cos(x, s_c), the sum of a text and an image term as in Tip-Adapter (Zhang et al.
2022), which is one class vector t_c + weight * s_c: every scorer of class vectors uses it unchanged.
No label of the evaluated set is used; weight 0 is the paper's zero-shot, exactly.

It pays where the image tower was trained to match images to images (SLIP's self-supervision): on
real-emoji it lifts unseen-concept top-1 by 0.015-0.03 and leaves open_clip's own model where it
was (docs/real-data.md, "Support-set zero-shot").
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from clipmodel.io import atomic_path, files_sha256
from clipmodel.zeroshot import unit

SUPPORT_FILE = "support.safetensors"  # beside a model's config.json (models/, models/onnx/)
WEIGHTS_FILE = "clip.safetensors"  # the weights a torch model folder holds (the ONNX folder has none)


@dataclass(frozen=True)
class Support:
    """Training images and captions embedded by one model, and how much they add to a class vector.

    images: float32 [M, D] unit image embeddings; captions: float32 [K, D] unit text embeddings;
    caption_image: int64 [K], the row of `images` each caption describes; weight >= 0 (0: plain
    zero-shot); temperature > 0, of the softmax over caption cosines (smaller: fewer captions count).
    """
    images: np.ndarray
    captions: np.ndarray
    caption_image: np.ndarray
    weight: float
    temperature: float
    weights_sha256: str = ""  # of the clip.safetensors that embedded them ("": not recorded)

    def __post_init__(self) -> None:
        m, k = len(self.images), len(self.captions)
        if self.images.ndim != 2 or self.captions.ndim != 2 or self.images.shape[1] != self.captions.shape[1]:
            raise ValueError(f"support: images {self.images.shape} and captions {self.captions.shape} "
                             "must be [M, D] and [K, D]")
        if k == 0:
            raise ValueError("support: no captions")
        if self.caption_image.shape != (k,) or not 0 <= self.caption_image.min() <= self.caption_image.max() < m:
            raise ValueError(f"support: caption_image must be [K={k}] rows of the {m} images")
        if not (np.isfinite(self.weight) and np.isfinite(self.temperature)) or self.weight < 0 or self.temperature <= 0:
            raise ValueError(f"support: weight {self.weight} must be finite and >= 0, temperature "
                             f"{self.temperature} finite and > 0")

    def with_weight(self, weight: float) -> Support:
        return replace(self, weight=weight)

    @cached_property
    def described(self) -> np.ndarray:
        """float32 [K, D]: the image each caption describes (an image counts once per caption of it),
        gathered once per bank rather than per call of `vectors`."""
        return self.images[self.caption_image]

    def vectors(self, classes: np.ndarray, max_elements: int = 2**24) -> np.ndarray:
        """float32 [C, D] unit support vectors s_c for unit class vectors [C, D], a few classes at a
        time so that the class-by-caption matrix stays under `max_elements` floats.

        Raises: ValueError when the class vectors' D is not the bank's (another model's bank)."""
        if classes.ndim != 2 or classes.shape[1] != self.images.shape[1]:
            raise ValueError(f"support: class vectors {classes.shape} do not fit a bank of {self.images.shape[1]}-dim "
                             "embeddings (was it written for another model?)")
        rows = max(1, max_elements // len(self.captions))
        out = []
        for start in range(0, len(classes), rows):
            logits = classes[start:start + rows] @ self.captions.T / self.temperature
            w = np.exp(logits - logits.max(1, keepdims=True))
            s = (w / w.sum(1, keepdims=True)) @ self.described
            out.append(unit(s))
        return np.concatenate(out).astype(np.float32) if out else np.empty((0, self.images.shape[1]), np.float32)

    def apply(self, classes: np.ndarray) -> np.ndarray:
        """float32 [C, D]: t_c + weight * s_c (not renormalised: the score is the sum of two cosines)."""
        return classes if self.weight == 0 else (classes + self.weight * self.vectors(classes)).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Atomically, as safetensors with weight and temperature in its metadata."""
        with atomic_path(path) as tmp:
            save_file({"images": np.ascontiguousarray(self.images, np.float32),
                       "captions": np.ascontiguousarray(self.captions, np.float32),
                       "caption_image": np.ascontiguousarray(self.caption_image, np.int64)}, str(tmp),
                      metadata={"weight": repr(float(self.weight)), "temperature": repr(float(self.temperature)),
                                "weights_sha256": self.weights_sha256})

    @classmethod
    def load(cls, path: str | Path) -> Support:
        """Raises: ValueError naming the file when it is not a support file."""
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
            t = load_file(str(path))
            return cls(t["images"], t["captions"], t["caption_image"], float(meta["weight"]), float(meta["temperature"]),
                       meta.get("weights_sha256", ""))
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise ValueError(f"{path}: not a support file ({e})") from None

    @classmethod
    def find(cls, folder: str | Path) -> Support | None:
        """The support file of a model folder, or None when it has none, or (with a warning) when it
        was written for other weights than the folder's clip.safetensors: a model retrained without
        rerunning evaluate must not be scored with its predecessor's embeddings.

        Raises: ValueError for a malformed support file."""
        path = Path(folder) / SUPPORT_FILE
        if not path.is_file():
            return None
        support, weights = cls.load(path), Path(folder) / WEIGHTS_FILE
        if support.weights_sha256 and weights.is_file() and files_sha256([weights]) != support.weights_sha256:
            warnings.warn(f"{path} was written for other weights than {weights}; not used (rerun the evaluate "
                          "stage to write it for these)", stacklevel=2)
            return None
        return support


def reweighted(found: Support | None, weight: float | None, subject: str, folder: str | Path) -> Support | None:
    """The support set to score with: `found` (a model folder's) as saved when `weight` is None, none at 0
    (the paper's zero-shot), else `found` at `weight`. The one rule of the CLIs' --support-weight and
    serving's `support_weight` param, named `subject` in the messages.

    Raises: ValueError for a weight that is not a finite number >= 0, or a positive one when `folder`
    has no support set.
    """
    if weight is None:
        return found
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"{subject} must be a finite number >= 0, not {weight}")
    if weight == 0:
        return None
    if found is None:
        raise ValueError(f"{subject}: {folder} has no {SUPPORT_FILE} (the evaluate stage writes it beside the "
                         "model; export copies it into the ONNX folder)")
    return found.with_weight(weight)
