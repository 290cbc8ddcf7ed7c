"""Synthetic captioned scenes: a dataset that needs no download and whose ground truth is known.

Each scene holds 1-3 coloured shapes in distinct position slots on a muted background (plain,
noisy or gradient, so an object's colour is never just the mean pixel). Captions come from varied
templates and synonyms. A fixed fraction of colour-shape pairs is held out of the train split, in
pixels and in words, so evaluation can measure zero-shot transfer to unseen compositions.

A scene is sampled (cheap: attributes and caption) separately from its rendering (the pixels), so
ingest can sample in order in one process and render in parallel workers.
"""
from __future__ import annotations

import colorsys
import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = ("plain", "noisy", "gradient")

# Saturated or extreme colours; backgrounds are desaturated mid-tones, so every object stands out.
RGB = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (245, 215, 30),
       "purple": (140, 50, 190), "orange": (250, 130, 20), "white": (248, 248, 248), "black": (18, 18, 18)}

# Geometry in fractions of the image side. Slots are far enough apart that two large objects touch
# at most when both jitter towards each other.
SLOTS = {"left": (0.2, 0.5), "right": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "centre": (0.5, 0.5)}
RADIUS = {"small": 0.08, "large": 0.14}
JITTER = 0.02
MAX_ROTATION = np.deg2rad(15)
SUPERSAMPLE = 4  # shapes are drawn this much larger, then box-filtered: antialiased edges
REPEAT = 0.3     # chance an object copies an earlier one's colour and shape, so counts get captions

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PLACE_WORDS = {"left": ("on the left", "at the left", "to the left"),
               "right": ("on the right", "at the right", "to the right"),
               "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
               "centre": ("in the centre", "in the middle", "in the center")}
BACKGROUND_WORDS = {"plain": ("plain", "flat"), "noisy": ("noisy", "grainy"), "gradient": ("gradient", "shaded")}
NUMBERS = {2: "two", 3: "three"}
TEMPLATES = ("{}", "a picture of {}", "an image of {}", "a drawing of {}", "there {} {}")

_HOLDOUT_STREAM, _ITEM_STREAM = 0, 1  # different seed-sequence lengths: the streams never collide


@dataclass(frozen=True)
class Object:
    """One shape of a scene: values from SHAPES, COLORS, SIZES and POSITIONS."""

    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """Objects in distinct position slots on a background (one of BACKGROUNDS); `render` draws it."""

    objects: tuple[Object, ...]
    background: str
    seed: int  # drives background colours, noise and jitter when rendered

    def labels(self) -> str:
        """The ground truth as the manifest's `labels` JSON."""
        return json.dumps({"objects": [asdict(o) for o in self.objects], "count": len(self.objects)})


def _ring(n: int, radii: tuple[float, ...] = (1.0,), phase: float = -np.pi / 2) -> np.ndarray:
    """n vertices around the centre, radii cycled: (1, 0.45) alternates a star's tips and notches."""
    t = phase + np.arange(n) * 2 * np.pi / n
    r = np.resize(np.asarray(radii), n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y - (y.max() + y.min()) / 2], 1)


def _cross(arm: float = 0.34) -> np.ndarray:
    quarter = np.array([(-arm, -1.0), (arm, -1.0), (arm, -arm)])  # the top arm and the corner after it
    turn = np.array([[0.0, -1.0], [1.0, 0.0]])  # a quarter turn clockwise (image y points down)
    return np.concatenate([quarter @ np.linalg.matrix_power(turn, k).T for k in range(4)])


def _fit(points: np.ndarray) -> np.ndarray:
    """Scale to a circumradius of 1, so any rotation stays inside the object's slot."""
    return points / np.linalg.norm(points, axis=1).max()


OUTLINES = {name: _fit(np.asarray(p, dtype=np.float64)) for name, p in {
    "circle": _ring(48),
    "square": _ring(4, phase=np.pi / 4),
    "triangle": _ring(3),
    "star": _ring(10, (1.0, 0.45)),
    "heart": _heart(),
    "cross": _cross(),
    "diamond": [(0, -1), (0.62, 0), (0, 1), (-0.62, 0)],
    "hexagon": _ring(6, phase=0.0),
}.items()}


def holdout_pairs(seed: int, fraction: float) -> frozenset[tuple[str, str]]:
    """The (color, shape) pairs never shown in the train split.

    Pairs are taken along shuffled diagonals of the colour x shape grid, so each colour and each
    shape loses about the same number of partners and every one stays common in train.
    `fraction` of the 64 pairs, rounded; the same (seed, fraction) always gives the same set.
    """
    rng = np.random.default_rng((seed, _HOLDOUT_STREAM))
    colors, shapes = rng.permutation(len(COLORS)), rng.permutation(len(SHAPES))
    cells = [(i, (i + d) % len(SHAPES)) for d in range(len(SHAPES)) for i in range(len(COLORS))]
    n = round(fraction * len(COLORS) * len(SHAPES))
    return frozenset((COLORS[colors[i]], SHAPES[shapes[j]]) for i, j in cells[:n])


def sample_scene(rng: np.random.Generator, max_objects: int,
                 excluded: frozenset[tuple[str, str]] = frozenset()) -> Scene:
    """A random scene drawn from `rng`: 1..max_objects objects (at most one per slot), no (color, shape)
    pair from `excluded`; an object sometimes repeats an earlier one's colour and shape (REPEAT).

    Raises: ValueError (numpy's) when max_objects < 1 or `excluded` holds every pair.
    """
    pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in excluded]
    n = int(rng.integers(1, max_objects + 1))
    objects: list[Object] = []
    for position in rng.permutation(POSITIONS)[:n]:
        if objects and rng.random() < REPEAT:
            twin = objects[int(rng.integers(len(objects)))]
            color, shape = twin.color, twin.shape
        else:
            color, shape = pairs[int(rng.integers(len(pairs)))]
        objects.append(Object(shape, color, SIZES[int(rng.integers(len(SIZES)))], str(position)))
    return Scene(tuple(objects), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], int(rng.integers(2**63)))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _a_or_an(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


# Colour alone tells most scenes in a batch apart, so captions that always name it let the contrastive
# task ignore shape and place (a shortcut). Leaving colour out of about half the phrases forces the other
# cues; leaving it out of more trades colour accuracy for shape and position, out of fewer the reverse
# (params data.synthetic.color_mention; docs/results.md).
COLOR_MENTION = 0.5625


def _object_phrase(obj: Object, rng: np.random.Generator, color_mention: float) -> str:
    """'a large red circle on the left', with size, colour and place each sometimes left out."""
    words = [_pick(rng, SIZE_WORDS[obj.size])] if rng.random() < 0.6 else []
    words += [obj.color] if rng.random() < color_mention else []
    phrase = _a_or_an(" ".join([*words, obj.shape]))
    return f"{phrase} {_pick(rng, PLACE_WORDS[obj.position])}" if rng.random() < 0.6 else phrase


def _grouped(objects: tuple[Object, ...], with_color: bool) -> list[str]:
    """'two blue squares', 'a yellow star' (or 'two squares', 'a star'): like objects counted together."""
    counts: dict[tuple[str, ...], int] = {}
    for o in objects:
        key = (o.color, o.shape) if with_color else (o.shape,)
        counts[key] = counts.get(key, 0) + 1
    return [_a_or_an(" ".join(k)) if n == 1 else f"{NUMBERS[n]} {' '.join(k[:-1] + (_plural(k[-1]),))}"
            for k, n in counts.items()]


def caption(scene: Scene, rng: np.random.Generator, color_mention: float) -> str:
    """One lower-case English caption of `scene` drawn from `rng`: per object or grouped by kind, from
    varied templates and synonyms, naming colour with probability `color_mention` per phrase."""
    if rng.random() < 0.6:
        body = _join([_object_phrase(o, rng, color_mention) for o in scene.objects])
    else:
        body = _join(_grouped(scene.objects, with_color=rng.random() < color_mention))
    if rng.random() < 0.25:
        body += f" on {_a_or_an(_pick(rng, BACKGROUND_WORDS[scene.background]))} background"
    template = _pick(rng, TEMPLATES)
    if template.startswith("there"):
        return template.format("is" if len(scene.objects) == 1 else "are", body)
    return template.format(body)


def sample(seed: int, index: int, max_objects: int, excluded: frozenset[tuple[str, str]] = frozenset(),
           captions: int = 1, color_mention: float = COLOR_MENTION) -> tuple[Scene, tuple[str, ...]]:
    """Scene and captions of item `index`: its own random stream, so items never depend on each other.

    Several captions per image (as COCO has five) each mention a different subset of the attributes,
    so over the epochs every image is supervised on all of them rather than on one fixed phrasing."""
    rng = np.random.default_rng((seed, _ITEM_STREAM, index))
    scene = sample_scene(rng, max_objects, excluded)
    return scene, tuple(caption(scene, rng, color_mention) for _ in range(captions))


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A desaturated mid-tone: far from every object colour, black and white included."""
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.35, 0.65))
    return np.asarray(rgb) * 255


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = _muted(rng)
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3))
    if kind == "noisy":
        return base + 14 * rng.standard_normal((size, size, 3), dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.linspace(0, 1, size)
    t = np.add.outer(ramp * np.sin(angle), ramp * np.cos(angle))  # rows are y, columns x
    t = (t - t.min()) / (t.max() - t.min())
    return base + t[..., None] * (_muted(rng) - base)


def _coverage(obj: Object, size: int, rng: np.random.Generator) -> Image.Image:
    """An "L" mask of how much of each pixel the jittered, rotated shape covers.

    The shape is drawn SUPERSAMPLE times larger and box-averaged down: antialiased edges.
    """
    big = size * SUPERSAMPLE
    centre = np.asarray(SLOTS[obj.position]) + rng.uniform(-JITTER, JITTER, 2)
    radius = RADIUS[obj.size] * rng.uniform(0.9, 1.1)
    a = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    points = (OUTLINES[obj.shape] @ rotation.T * radius + centre) * big
    mask = Image.new("L", (big, big))
    ImageDraw.Draw(mask).polygon([tuple(p) for p in points], fill=255)
    return mask.reduce(SUPERSAMPLE)


def render(scene: Scene, size: int) -> np.ndarray:
    """uint8 [size, size, 3] (size in pixels); a pure function of the scene, so the same seed gives the
    same bytes."""
    rng = np.random.default_rng(scene.seed)
    background = _background(scene.background, size, rng)
    canvas = Image.fromarray(np.clip(np.rint(background), 0, 255).astype(np.uint8))
    for obj in scene.objects:
        canvas.paste(RGB[obj.color], mask=_coverage(obj, size, rng))  # blends by coverage
    return np.asarray(canvas)
