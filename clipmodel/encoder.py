"""A trained model folder's two towers as numpy-in, numpy-out encoders (torch), with its own
tokenizer and the preprocessing its training images went through."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipmodel.checkpoint import load_model
from clipmodel.data import to_tensor
from clipmodel.images import ImageError, load_image
from clipmodel.model import CLIP, CLIPEnsemble
from clipmodel.support import Support
from clipmodel.templates import DEFAULT_TEMPLATES
from clipmodel.tokenizer import encode, length_order, load_tokenizer, trim_padding
from clipmodel.zeroshot import as_list, class_vectors


class Encoder:
    """L2-normalised float32 embeddings [N, embed_dim] of images and texts, `batch_size` at a time on `device`."""

    def __init__(self, model: CLIP | CLIPEnsemble, tokenizer, preprocess: dict, batch_size: int = 256,
                 device: str | torch.device = "cpu", support: Support | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer, self.preprocess, self.batch_size = tokenizer, preprocess, batch_size
        self.support = support  # the folder's support bank (clipmodel.support), or None

    @classmethod
    def load(cls, folder: str | Path, batch_size: int = 256, device: str | torch.device = "cpu") -> Encoder:
        """From a folder the train stage wrote (config.json, clip.safetensors, tokenizer.json), with the
        support bank the evaluate stage wrote beside them when there is one.

        Raises: FileNotFoundError when `folder` has no config.json or clip.safetensors; RuntimeError
        when the weights do not fit the config; ValueError for a malformed support file.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} not found")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json: not a model folder written by the train stage")
        model, config = load_model(folder)
        return cls(model, load_tokenizer(folder / config["tokenizer"]), config["preprocess"], batch_size, device,
                   Support.find(folder))

    @property
    def logit_scale(self) -> float:
        """The trained temperature as a multiplier of cosine similarity: exp(logit_scale), at most 100
        (clamped in training); an ensemble's is its members' mean."""
        return self.model.logit_scale.exp().mean().item()

    def load_image(self, source: str | Path | bytes) -> np.ndarray:
        """uint8 [S, S, 3] (S = the training image size, pixels) as the model's training images were stored.

        Raises: ImageError naming why not.
        """
        return load_image(source, self.preprocess["image_size"], tuple(self.preprocess["background"]))

    @torch.no_grad()
    def pixels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] preprocessed images -> float32 [N, D], L2-normalised."""
        out = [F.normalize(self.model.encode_image(to_tensor(images[s:s + self.batch_size]).to(self.device)).float(),
                           dim=-1).cpu().numpy() for s in range(0, len(images), self.batch_size)]
        return np.concatenate(out) if out else np.empty((0, self.model.cfg.output_dim), np.float32)

    @torch.no_grad()
    def tokens(self, ids: np.ndarray) -> np.ndarray:
        """int token ids [N, context] -> float32 [N, D], L2-normalised; batched by length, each batch
        trimmed to its longest text (exact, and faster)."""
        out = np.empty((len(ids), self.model.cfg.output_dim), np.float32)
        order = length_order(ids)
        for s in range(0, len(ids), self.batch_size):
            rows = order[s:s + self.batch_size]
            batch = torch.from_numpy(trim_padding(ids[rows])).long().to(self.device)
            out[rows] = F.normalize(self.model.encode_text(batch).float(), dim=-1).cpu().numpy()
        return out

    def texts(self, texts: list[str]) -> np.ndarray:
        """float32 [N, D], L2-normalised, for raw strings tokenized as in training (over-long texts cut,
        EOT kept last)."""
        return self.tokens(encode(self.tokenizer, as_list(texts, "texts"))[0])

    def class_embeddings(self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> np.ndarray:
        """float32 [C, D] class vectors: each label's prompt embeddings averaged
        (clipmodel.zeroshot.class_vectors), unit, or with `support`'s term added when it is set; as
        ClipRuntime.class_embeddings, so the torch and ONNX classifiers agree."""
        classes = class_vectors(self.texts, labels, templates)
        return self.support.apply(classes) if self.support else classes

    def images(self, sources: list[str | Path | bytes]) -> np.ndarray:
        """float32 [N, D], L2-normalised, for image files or encoded bytes ([0, D] for none).

        Raises: ImageError naming the first that cannot be decoded; TypeError for one path not in a list.
        """
        loaded = [self._load_named(s) for s in as_list(sources, "images")]
        size = self.model.cfg.image_size
        return self.pixels(np.stack(loaded) if loaded else np.empty((0, size, size, 3), np.uint8))

    def _load_named(self, source: str | Path | bytes) -> np.ndarray:
        try:
            return self.load_image(source)
        except ImageError as e:
            raise e.naming(source) from None
