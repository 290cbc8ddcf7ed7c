"""Serving an exported model without torch: onnxruntime, numpy, PIL and tokenizers only.

Images go through the very function ingest used (`images.load_image`) and text
through the same tokenizer.json, so the encoders see what they were trained on. Everything else that
was fixed at training time (size, background, mean/std, temperature) comes from preprocess.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from clipmodel.images import ImageError, load_image, preprocess, to_rgb
from clipmodel.io import atomic_path
from clipmodel.support import Support
from clipmodel.templates import DEFAULT_TEMPLATES
from clipmodel.tokenizer import encode, length_order, load_tokenizer, trim_padding
from clipmodel.zeroshot import as_list, class_vectors, classify

ImageSource = str | Path | bytes | Image.Image


def default_threads() -> int:
    """Physical cores this process may run on: hyperthread siblings share one core's vector units,
    so more intra-op threads than cores only adds synchronisation."""
    usable = len(os.sched_getaffinity(0))
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable))


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options measured fastest for these encoders on CPU by benchmarks/onnx_latency.py; `threads`
    (intra-op) defaults to `default_threads()`.

    One inference is a chain of dependent ops, so sequential execution with every thread inside the
    ops (intra-op) beats running independent branches in parallel; full graph optimisation adds the
    layout and fusion passes the lower levels skip. Worker threads sleep instead of busy-waiting between
    ops: spinning saves little on an idle machine and costs a lot when other processes want the cores.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


EXPORT_HINT = ("the pipeline's export stage writes one (models/onnx; or `python -m clipmodel.export`, "
               "which needs the train extra)")

@dataclass(frozen=True)
class Preprocess:
    """preprocess.json: how pixels and text were prepared when the model was trained. image_size in
    pixels; mean and std per RGB channel on the [0, 1] scale; background 8-bit RGB; context_length in
    tokens; logit_scale the exponentiated temperature."""
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    background: tuple[int, int, int]
    context_length: int
    logit_scale: float
    embed_dim: int

    @classmethod
    def read(cls, path: Path) -> Preprocess:
        """Parse preprocess.json.

        Raises: ValueError when it asks for a resize or crop other than `images.preprocess`'s;
        KeyError for a missing field; FileNotFoundError when the file is missing.
        """
        d = json.loads(path.read_text())
        if (d["resize"], d["crop"]) != ("shorter_side_bicubic", "center"):
            raise ValueError(f"{path}: resize={d['resize']!r}, crop={d['crop']!r} is not what images.preprocess does")
        return cls(d["image_size"], tuple(d["mean"]), tuple(d["std"]), tuple(d["background"]),
                   d["context_length"], d["logit_scale"], d["embed_dim"])

    def rgb(self, image: ImageSource) -> np.ndarray:
        """uint8 [S, S, 3] (S = image_size) from a path, encoded bytes or a PIL image, as ingest stored
        training images.

        Raises: ImageError with a reason code.
        """
        if isinstance(image, Image.Image):
            return preprocess(np.asarray(to_rgb(ImageOps.exif_transpose(image), self.background)), self.image_size)
        return load_image(image, self.image_size, self.background)

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, 3, S, S], the image encoder's `pixels` input."""
        x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255
        mean = np.asarray(self.mean, np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, 3, 1, 1)
        return np.ascontiguousarray((x - mean) / std)


class ClipRuntime:
    """Both encoders of one exported model folder, plus zero-shot classification and image search.
    Every embedding is float32 [N, D] and L2-normalised (D = preprocess.json's embed_dim)."""

    def __init__(self, folder: Path, image: ort.InferenceSession, text: ort.InferenceSession, tokenizer: Tokenizer,
                 pre: Preprocess, support: Support | None = None):
        self.folder, self.image, self.text, self.tokenizer, self.pre = folder, image, text, tokenizer, pre
        self.support = support  # added to every class vector (clipmodel.support); None: plain zero-shot

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> ClipRuntime:
        """Open a folder the pipeline's export stage (or `python -m clipmodel.export`) wrote, on CPU with
        `threads` intra-op threads.

        The folder's support.safetensors, when export copied one there, joins every class vector.

        Raises: FileNotFoundError when the folder or one of its four files is missing; ValueError or
        KeyError for a preprocess.json that `Preprocess.read` refuses or a malformed support file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} not found; {EXPORT_HINT}")
        missing = [n for n in ("image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "preprocess.json")
                   if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not an exported model folder (missing {', '.join(missing)}); "
                                    f"{EXPORT_HINT}")
        opts = session_options(threads)
        sessions = [ort.InferenceSession(str(folder / n), opts, providers=["CPUExecutionProvider"])
                    for n in ("image_encoder.onnx", "text_encoder.onnx")]
        return cls(folder, *sessions, load_tokenizer(folder / "tokenizer.json"),
                   Preprocess.read(folder / "preprocess.json"), Support.find(folder))

    def embed_pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] preprocessed images -> float32 [N, D] unit embeddings."""
        return self.image.run(None, {"pixels": self.pre.normalise(images)})[0]

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """int token ids [N, context_length] -> float32 [N, D] unit embeddings. The pad columns every row
        has are dropped first when the graph's sequence axis is symbolic (exports since the model card)."""
        if isinstance(self.text.get_inputs()[0].shape[1], str):
            tokens = trim_padding(tokens)
        return self.text.run(None, {"tokens": np.ascontiguousarray(tokens, dtype=np.int64)})[0]

    def encode_images(self, images: Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """float32 [N, D] unit embeddings of paths, encoded bytes or PIL images.

        Raises: ImageError naming the first unreadable image; TypeError for one image not in a list.
        """
        images = as_list(images, "images")
        out = np.empty((len(images), self.pre.embed_dim), np.float32)
        for start in range(0, len(images), batch_size):
            batch = [self._rgb_or_raise(image) for image in images[start:start + batch_size]]
            out[start:start + len(batch)] = self.embed_pixels(np.stack(batch))
        return out

    def _rgb_or_raise(self, image: ImageSource) -> np.ndarray:
        try:
            return self.pre.rgb(image)
        except ImageError as e:
            raise e.naming(image) from None

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """float32 [N, D] unit embeddings; over-long texts are truncated as in training (EOT kept last).
        Batched by length (`tokenizer.length_order`), so that each batch is trimmed to little padding."""
        texts = as_list(texts, "texts")
        tokens, _ = encode(self.tokenizer, texts)
        out = np.empty((len(texts), self.pre.embed_dim), np.float32)
        order = length_order(tokens)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self.embed_tokens(tokens[rows])
        return out

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """float32 [C, D] class vectors: each label's prompt embeddings averaged
        (clipmodel.zeroshot.class_vectors), unit, or with `support`'s term added when it is set."""
        classes = class_vectors(self.encode_texts, labels, templates)
        return self.support.apply(classes) if self.support else classes

    def classify(self, images: Sequence[ImageSource], labels: Sequence[str],
                 templates: Sequence[str] = DEFAULT_TEMPLATES, k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image, the min(k, C) most probable labels with their probabilities (softmax over all labels).

        Raises: ValueError when `labels` is empty; ImageError naming the first unreadable image; TypeError
        for one image or label not in a list.
        """
        labels = as_list(labels, "labels")
        if not labels:
            raise ValueError("no labels to classify into")
        index, probs = classify(self.encode_images(images), self.class_embeddings(labels, templates),
                                self.pre.logit_scale, k)
        return [[(labels[i], float(p)) for i, p in zip(row_i, row_p)] for row_i, row_p in zip(index, probs)]

    def fingerprint(self) -> str:
        """16 hex digits identifying what an image embedding depends on: the image graph and preprocessing."""
        h = hashlib.sha256((self.folder / "image_encoder.onnx").read_bytes())
        h.update((self.folder / "preprocess.json").read_bytes())
        return h.hexdigest()[:16]

    def index(self, image_dir: str | Path, cache_dir: str | Path | None = None,
              batch_size: int = 32) -> tuple[list[Path], np.ndarray]:
        """Every readable image under `image_dir` and its embedding, through an on-disk cache.

        A cached embedding is reused while its file keeps the same size and mtime; new or changed files
        are embedded, deleted ones dropped. Files are stat-ed before they are read, so one modified
        while being embedded is re-embedded next time rather than cached as current. The cache lives in
        `cache_dir` (default $XDG_CACHE_HOME or ~/.cache, then clip-onnx); unreadable images are skipped
        with a warning. Returns the paths, sorted by relative path, and float32 [N, D] unit embeddings.

        Raises: FileNotFoundError when `image_dir` is not a folder.
        """
        root = Path(image_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} {'is a file, not a folder' if root.exists() else 'not found'}")
        files = _image_files(root)
        stats = {rel: os.stat(root / rel) for rel in files}
        cache = _cache_file(root, self.fingerprint(), cache_dir)
        cached = _read_cache(cache)
        rows: dict[str, np.ndarray] = {}
        for rel, size, mtime_ns, embedding in cached:
            st = stats.get(rel)
            if st is not None and (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                rows[rel] = embedding
        todo = [rel for rel in files if rel not in rows]
        failed = []
        for start in range(0, len(todo), batch_size):
            batch, names = [], []
            for rel in todo[start:start + batch_size]:
                try:
                    batch.append(self.pre.rgb(root / rel))
                    names.append(rel)
                except ImageError as e:
                    failed.append(f"{rel} ({e.reason})")
            if batch:
                rows.update(zip(names, self.embed_pixels(np.stack(batch))))
        if failed:
            warnings.warn(f"skipped {len(failed)} unreadable image(s) in {root}: {', '.join(failed)}", stacklevel=2)
        kept = [rel for rel in files if rel in rows]
        embeddings = np.stack([rows[rel] for rel in kept]) if kept else np.empty((0, self.pre.embed_dim), np.float32)
        if len(todo) > len(failed) or kept != [rel for rel, *_ in cached]:
            _write_cache(cache, kept, stats, embeddings)
        return [root / rel for rel in kept], embeddings

    def search(self, query: str, image_dir: str | Path, top: int = 5,
               cache_dir: str | Path | None = None) -> list[tuple[Path, float]]:
        """The `top` images under `image_dir` most similar to `query`, with their cosine similarity in [-1, 1].

        Raises: FileNotFoundError when `image_dir` is not a folder; ValueError when it holds no readable image.
        """
        paths, embeddings = self.index(image_dir, cache_dir)
        if not paths:
            raise ValueError(f"no readable images in {image_dir}")
        scores = embeddings @ self.encode_texts([query])[0]
        order = np.argsort(-scores, kind="stable")[:top]
        return [(paths[i], float(scores[i])) for i in order]


def _image_files(root: Path) -> list[str]:
    """Paths (relative, POSIX) of files under `root` whose extension PIL can open, sorted."""
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in extensions and p.is_file())


def _cache_file(root: Path, fingerprint: str, cache_dir: str | Path | None) -> Path:
    """One cache per (image folder, model), outside the image folder, which may be read-only."""
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clip-onnx"
    folder = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:16]  # any name, UTF-8 or not
    return Path(cache_dir) / f"{folder}-{fingerprint}.npz"


def _read_cache(path: Path) -> list[tuple[str, int, int, np.ndarray]]:
    if not path.is_file():
        return []
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(zip(z["path"].tolist(), z["size"].tolist(), z["mtime_ns"].tolist(), z["embedding"]))
    except Exception as e:  # noqa: BLE001 - truncated, garbage or foreign: a cache is rebuilt, never fatal
        warnings.warn(f"embedding cache {path} is unreadable ({type(e).__name__}: {e}); rebuilding it", stacklevel=3)
        return []


def _write_cache(path: Path, kept: list[str], stats: dict[str, os.stat_result], embeddings: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, path=np.array(kept, dtype=str),
                 size=np.array([stats[rel].st_size for rel in kept], np.int64),
                 mtime_ns=np.array([stats[rel].st_mtime_ns for rel in kept], np.int64),
                 embedding=embeddings.astype(np.float32))
