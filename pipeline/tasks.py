"""Zero-shot tasks: what to classify, the words that name each class, and each image's answer.

On the synthetic data the manifest's labels give shape, colour, size and position of single-object
scenes, the object count of every scene, and colour+shape compositions split by whether the pair
was ever seen in training. User data has no such labels: its zero-shot sets are `evaluate.datasets`
(clipmodel.evaluation).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipmodel import synthetic
from pipeline.params import DataParams


@dataclass
class Task:
    """One zero-shot task over a list of corpus images: its classes, the text naming each in a prompt,
    and each image's target class."""
    name: str
    classes: list[str]      # label names, reported in confusion matrices
    texts: list[str]        # what fills the templates' {} for each class
    targets: np.ndarray     # [N] class index of each image, -1 where the task does not apply
    templates: str          # key of the template list to use

    @property
    def mask(self) -> np.ndarray:
        """bool [N]: the images the task applies to (target >= 0)."""
        return self.targets >= 0


COUNT_WORDS = ("one", "two", "three")


def _index(values: Sequence[str | None], classes: Sequence[str]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)


def synthetic_tasks(labels: Sequence[str], seed: int, holdout_fraction: float) -> list[Task]:
    """The tasks of synthetic scenes, from the manifest's labels JSON [N]: shape, color, size and
    position of single-object scenes, count of every scene, and colour+shape compositions split into
    pairs seen in training and held out (`holdout_pairs(seed, holdout_fraction)`, as ingest drew them).
    A task no image applies to is left out."""
    scenes = [json.loads(s) for s in labels]
    single = [s["objects"][0] if s["count"] == 1 else None for s in scenes]

    def attr(key: str) -> list[str | None]:
        return [o[key] if o else None for o in single]

    held = synthetic.holdout_pairs(seed, holdout_fraction)
    pairs = [f"{c} {s}" for c in synthetic.COLORS for s in synthetic.SHAPES]
    comp = attr("color")
    comp = [f"{c} {s}" if c else None for c, s in zip(comp, attr("shape"))]
    unseen = {f"{c} {s}" for c, s in held}
    places = [synthetic.PLACE_WORDS[p][0] for p in synthetic.POSITIONS]
    tasks = [
        Task("shape", list(synthetic.SHAPES), list(synthetic.SHAPES), _index(attr("shape"), synthetic.SHAPES), "shape"),
        Task("color", list(synthetic.COLORS), list(synthetic.COLORS), _index(attr("color"), synthetic.COLORS), "color"),
        Task("size", list(synthetic.SIZES), list(synthetic.SIZES), _index(attr("size"), synthetic.SIZES), "size"),
        Task("position", list(synthetic.POSITIONS), places, _index(attr("position"), synthetic.POSITIONS), "position"),
        Task("count", [str(n) for n in (1, 2, 3)], list(COUNT_WORDS),
             np.array([s["count"] - 1 for s in scenes], dtype=np.int64), "count"),
        # Both composition tasks choose among all 64 pairs: the unseen ones must beat the seen ones too.
        Task("composition_seen", pairs, pairs, _index([c if c not in unseen else None for c in comp], pairs),
             "composition"),
        Task("composition_unseen", pairs, pairs, _index([c if c in unseen else None for c in comp], pairs),
             "composition"),
    ]
    return [t for t in tasks if t.mask.any()]


def tasks_for(data: DataParams, labels: Sequence[str]) -> list[Task]:
    """The zero-shot tasks the corpus's own labels define: the synthetic scenes' attributes; none for
    other sources, whose labelled sets are `evaluate.datasets`."""
    if data.source == "synthetic":
        return synthetic_tasks(labels, data.seed, data.synthetic.holdout_fraction)
    return []


def canonical_scene(labels: str) -> str | None:
    """The same scene described in other words: identical objects, in any order."""
    scene = json.loads(labels)
    if not scene.get("objects"):
        return None
    return json.dumps(sorted(json.dumps(o, sort_keys=True) for o in scene["objects"]))
