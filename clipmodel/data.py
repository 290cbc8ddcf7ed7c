"""Training data read straight from the ingest and tokenize outputs: no image decoding per step.

Every batch is a pure function of (seed, global step): which images, which of their captions and
which crops. Resuming at step k therefore replays exactly what an uninterrupted run would have
seen, with no sampler state to save.
"""
from __future__ import annotations

import copy
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from clipmodel import distributed
from clipmodel.shards import caption_ids, png_table, sample_key
from clipmodel.tokenizer import trim_padding

# CLIP's normalisation constants; kept for models trained from scratch so checkpoints stay interchangeable.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Corpus:
    """Images (memory-mapped uint8 [N, S, S, 3] shards, S pixels), the manifest and the tokenized captions.

    With `data.output_format: webdataset` the train split lives in tar shards instead (streamed by
    clipmodel.stream for training); `images` still reads any row, seeking to the PNG in its tar, so
    the linear probe and the supervised baseline work on either layout.
    """
    shards: list[np.ndarray]
    manifest: pd.DataFrame
    tokens: np.ndarray          # int32 [C, context]
    caption_start: np.ndarray   # int64 [N]: first caption row of each image
    caption_count: np.ndarray   # int64 [N]
    tars: list[Path] = field(default_factory=list)  # train-NNNNNN.tar, when the train split is in tars
    _members: dict[int, tuple[np.ndarray, list[str]]] = field(default_factory=dict, repr=False)
    _caption_ids: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def load(cls, data_dir: str | Path = "data") -> Corpus:
        """The corpus the ingest and tokenize stages wrote under `data_dir` (images and tokens memory-mapped).

        Raises: FileNotFoundError when manifest.parquet, tokens.npy or caption_image.npy is missing.
        """
        data_dir = Path(data_dir)
        manifest = pd.read_parquet(data_dir / "manifest.parquet")
        paths = sorted((data_dir / "images").glob("shard-*.npy"))
        shards = [np.load(p, mmap_mode="r") for p in paths]
        tokens = np.load(data_dir / "tokens.npy", mmap_mode="r")
        owner = np.load(data_dir / "caption_image.npy")
        count = np.bincount(owner, minlength=len(manifest)).astype(np.int64)
        start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
        tars = sorted((data_dir / "images").glob("train-*.tar"))
        return cls(shards, manifest, tokens, start, count, tars)

    def images(self, index: np.ndarray) -> np.ndarray:
        """Gather uint8 [B, S, S, 3] for global image indices [B], reading each shard once.

        Raises: ValueError when a train tar's member is not the image the manifest expects.
        """
        index = np.asarray(index, dtype=np.int64)
        shard = self.manifest.shard.to_numpy()[index]
        row = self.manifest.row.to_numpy()[index]
        in_tar = (self.manifest.split.to_numpy()[index] == "train") & bool(self.tars)
        size = self.shards[0].shape[1] if self.shards else self._from_tar(0, np.array([0]), None).shape[1]
        out = np.empty((len(index), size, size, 3), dtype=np.uint8)
        for s in np.unique(shard[~in_tar]):
            sel = np.flatnonzero((shard == s) & ~in_tar)
            order = np.argsort(row[sel])  # sorted reads are sequential in the memory map
            out[sel[order]] = self.shards[s][row[sel][order]]
        for s in np.unique(shard[in_tar]):
            sel = np.flatnonzero((shard == s) & in_tar)
            out[sel] = self._from_tar(int(s), row[sel], index[sel])
        return out

    def _from_tar(self, shard: int, rows: np.ndarray, index: np.ndarray | None) -> np.ndarray:
        """Decode the PNGs at positions `rows` of tar `shard` (random access through its member table)."""
        path = self.tars[shard]
        if shard not in self._members:
            self._members[shard] = png_table(path)
        table, names = self._members[shard]
        out = []
        with open(path, "rb") as f:
            for k, r in enumerate(rows):
                if index is not None and names[r] != f"{sample_key(index[k])}.png":
                    raise ValueError(f"{path}: member {r} is {names[r]}, the manifest expects "
                                     f"{sample_key(index[k])}.png; rerun ingest (dvc repro -f ingest)")
                f.seek(table[r, 0])
                out.append(np.asarray(Image.open(io.BytesIO(f.read(table[r, 1]))).convert("RGB")))
        return np.stack(out)

    def split(self, name: str) -> np.ndarray:
        """int64 [n] global image indices of the manifest's split `name` (e.g. "train", "test"), ascending."""
        return np.flatnonzero(self.manifest.split.to_numpy() == name)

    def caption_ids(self) -> np.ndarray:
        """int64 [C] one id per distinct token row, i.e. per distinct normalised caption text (cached;
        clipmodel.shards.caption_ids, as the stream computes them per batch).

        The multi-positive loss and the retrieval metrics treat equal ids as the same caption."""
        if self._caption_ids is None:
            self._caption_ids = caption_ids(np.asarray(self.tokens))
        return self._caption_ids


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] normalised with CLIP's MEAN and STD, the encoders' input."""
    return normalize(torch.from_numpy(np.ascontiguousarray(images)))


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1)


def normalize(pixels: torch.Tensor, color: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] tensor -> float32 [B, 3, H, W] normalised with MEAN and STD, on the pixels' device
    (`to_tensor` on the CPU; `finish_batch` on the GPU, after a uint8 copy a quarter the size of float32).
    `color` [B, 5] (`ColorAugment.draw`) is applied first, to pixel values in [0, 1]."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255)
    if color is not None:
        x = apply_color(x, color.to(x.device))
    mean, std = _mean_std(x.device)
    return (x - mean) / std


@dataclass(frozen=True)
class ColorAugment:
    """Photometric augmentation per image: SimCLR's colour distortion and blur (Chen et al. 2020, appendix
    A) without the hue shift, in batched tensor ops. With probability `jitter_p` brightness, contrast and
    saturation are scaled by factors uniform in [1 - s, 1 + s] (s = `jitter`, in that order, as
    torchvision's ColorJitter defines each), then greyscale with probability `grayscale_p`, then a 5-tap
    Gaussian blur with sigma uniform in `blur_sigma` pixels with probability `blur_p`.

    On real artwork it breaks the link between a concept and one artist's palette and line work: see
    docs/real-data.md. All zero (the default) draws nothing, so batches are as without it."""
    jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.5)

    def draw(self, b: int, generator: torch.Generator) -> torch.Tensor | None:
        """float32 [b, 5] per-image parameters (brightness, contrast and saturation factors, greyscale
        flag, blur sigma with 0 for none), drawn on the CPU from `generator`; None when inactive."""
        if not (self.jitter_p and any(self.jitter)) and not self.grayscale_p and not self.blur_p:
            return None
        u = torch.rand(b, 7, generator=generator)
        factors = 1 + (2 * u[:, 1:4] - 1) * torch.tensor(self.jitter)
        factors = torch.where(u[:, :1] < self.jitter_p, factors, torch.ones(()))
        grey = (u[:, 4] < self.grayscale_p).float()
        lo, hi = self.blur_sigma
        sigma = torch.where(u[:, 6] < self.blur_p, lo + (hi - lo) * u[:, 5], torch.zeros(()))
        return torch.cat([factors, grey[:, None], sigma[:, None]], 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: ITU-R 601 luma, as PIL's and torchvision's greyscale."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def apply_color(x: torch.Tensor, color: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> the same, with `ColorAugment.draw`'s parameters [B, 5] applied
    image by image (factors of 1, flag 0 and sigma 0 leave an image unchanged, up to float rounding)."""
    b, c, s = (color[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = (x * b).clamp(0, 1)
    m = _luma(x).mean((1, 2, 3), keepdim=True)
    x = ((x - m) * c + m).clamp(0, 1)
    grey = _luma(x)
    x = ((x - grey) * s + grey).clamp(0, 1)
    x = torch.where(color[:, 3].view(-1, 1, 1, 1) > 0, _luma(x).expand_as(x), x)
    sigma = color[:, 4]
    t = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
    k = torch.exp(-t**2 / (2 * sigma.clamp(min=1e-3).view(-1, 1)**2))  # [B, 5]; sigma 0 -> a delta
    k = torch.where(sigma.view(-1, 1) > 0, k, (t == 0).to(x.dtype))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(3, 0)  # one kernel per channel: [3B, 5]
    n, _, h, w = x.shape
    y = F.pad(x.reshape(1, 3 * n, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, k.view(-1, 1, 5, 1), groups=3 * n)
    y = F.conv2d(y, k.view(-1, 1, 1, 5), groups=3 * n)
    return y.view(n, 3, h, w)


SSL_CROP_RATIO = (3 / 4, 4 / 3)  # the self-supervised view's aspect ratios: SimCLR's (Chen et al. 2020)


def image_fields(pixels: torch.Tensor, crop_scale: tuple[float, float], crop_ratio: tuple[float, float],
                 color: ColorAugment, generator: torch.Generator, raw: bool,
                 ssl_crop_scale: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
    """The image entries of a training batch from uint8 pixels [B, S, S, 3]: crops, then colour
    parameters, drawn from `generator` in that order. `raw`: the pixels with "crops" [B, 2, 3] and
    "color" [B, 5] where drawn (`finish_batch` applies them on the device); else "images" float32
    [B, 3, S, S], augmented, normalised and cropped here.

    `ssl_crop_scale`: also a second view of every image for image self-supervision (SLIP, Mu et al.
    2022), drawn first: a random resized crop of that area range at SimCLR's aspect ratios, then the
    same colour augmentation; "ssl_images" (raw: "ssl_crops" and, where drawn, "ssl_color")."""
    fields = {}
    if ssl_crop_scale is not None:
        crops = crop_boxes(len(pixels), ssl_crop_scale, SSL_CROP_RATIO, generator)
        params = color.draw(len(pixels), generator)
        fields = ({"ssl_crops": crops, **({} if params is None else {"ssl_color": params})} if raw
                  else {"ssl_images": apply_crops(normalize(pixels, params), crops)})
    crops = crop_boxes(len(pixels), crop_scale, crop_ratio, generator)
    params = color.draw(len(pixels), generator)
    if raw:
        return {"pixels": pixels, **fields, **{k: v for k, v in (("crops", crops), ("color", params)) if v is not None}}
    return {"images": apply_crops(normalize(pixels, params), crops), **fields}


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], ratio: tuple[float, float],
                        generator: torch.Generator) -> torch.Tensor:
    """float [B, C, H, W] -> float [B, C, H, W]: a random resized crop per image (bilinear, one affine grid each).

    As torchvision's RandomResizedCrop (the Inception crop, Szegedy et al. 2015): the area fraction is
    uniform in `scale`, the log aspect ratio (width / height) uniform in log(`ratio`); a side that would
    exceed the image is clamped to it rather than redrawn. Scale and ratio both (1, 1) mean no crop:
    the stored pixels, not a resampling of them. All randomness comes from `generator`; the crops are
    drawn by `crop_boxes` and applied by `apply_crops`, which can run apart (on the GPU)."""
    return apply_crops(x, crop_boxes(x.shape[0], scale, ratio, generator))


def crop_boxes(b: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator) -> torch.Tensor | None:
    """`b` random resized crops (see `random_resized_crop`) as float32 [b, 2, 3] affine matrices in
    affine_grid's normalised coordinates, drawn on the CPU from `generator`; None for no crop (scale and
    ratio both (1, 1))."""
    if tuple(scale) == tuple(ratio) == (1, 1):
        return None
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_r = torch.empty(b).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=generator)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)   # crop width and height as fractions of the image
    h = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * (1 - w) + w / 2) * 2 - 1  # centres in [-1, 1]
    cy = (torch.rand(b, generator=generator) * (1 - h) + h / 2) * 2 - 1
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta


def apply_crops(x: torch.Tensor, theta: torch.Tensor | None) -> torch.Tensor:
    """float [B, C, H, W] resampled (bilinear, border padding) through the affine crops theta [B, 2, 3]
    (`crop_boxes`, on x's device); x itself when theta is None."""
    if theta is None:
        return x
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def finish_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch as the encoders take it, on the device its tensors are on. A raw batch (rank_batches with
    raw_pixels: uint8 "pixels" [B, S, S, 3] and, where drawn, "crops" [B, 2, 3] and "color" [B, 5]) is
    augmented, normalised and cropped there, giving "images" float32 [B, 3, S, S] (and "ssl_images"
    from "ssl_crops" and "ssl_color", see `image_fields`); any other batch is returned as it is."""
    if "pixels" not in batch:
        return batch
    raw = ("pixels", "crops", "color", "ssl_crops", "ssl_color")
    out = {k: v for k, v in batch.items() if k not in raw}
    out["images"] = apply_crops(normalize(batch["pixels"], batch.get("color")), batch.get("crops"))
    if "ssl_crops" in batch:
        out["ssl_images"] = apply_crops(normalize(batch["pixels"], batch.get("ssl_color")), batch["ssl_crops"])
    return out


class CorpusBatches(torch.utils.data.Dataset):
    """Training batches of a Corpus (image-caption pairs for CLIP, images and their labels for the
    supervised baseline): item k is the whole k-th batch (see `batch`); len() is the steps per epoch.

    Raises: ValueError when `index` holds fewer images than `batch_size`.
    """

    def __init__(self, corpus: Corpus, index: np.ndarray, batch_size: int, seed: int,
                 crop_scale: tuple[float, float], crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 color: ColorAugment = ColorAugment(), ssl_crop_scale: tuple[float, float] | None = None):
        if len(index) < batch_size:
            raise ValueError(f"{len(index)} training images is fewer than batch_size={batch_size}")
        self.corpus, self.index, self.batch_size, self.seed = corpus, index, batch_size, seed
        self.crop_scale, self.crop_ratio, self.color = crop_scale, crop_ratio, color
        self.ssl_crop_scale = ssl_crop_scale  # a second, self-supervised view of each image (image_fields)
        self.steps_per_epoch = len(index) // batch_size  # drop the ragged tail: the loss wants full batches
        self.caption_id = corpus.caption_ids()
        self.raw_pixels = False  # True: uint8 pixels and crop boxes, finished on the device (finish_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's shuffle, computed once per epoch rather than once per step."""
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._perm = epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.index))
        return self._perm

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of global step `step` (>= 0, any epoch): images float32 [B, 3, S, S] (cropped,
        normalised), tokens int64 [B, L] (L <= context, trimmed), caption_ids int64 [B] and
        image_index [B] (global indices, `index`'s dtype). With `raw_pixels` set, "pixels" uint8
        [B, S, S, 3], "crops" [B, 2, 3] and "color" [B, 5] (where drawn) instead of images: `finish_batch` turns
        them into the same images wherever the batch is.

        Raises: ValueError when a train tar's member is not the image the manifest expects.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        images = self.index[order[k * self.batch_size:(k + 1) * self.batch_size]]
        rng = np.random.default_rng((self.seed, epoch, k))
        c = self.corpus
        caption = c.caption_start[images] + (rng.random(len(images)) * c.caption_count[images]).astype(np.int64)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        return {**image_fields(torch.from_numpy(c.images(images)), self.crop_scale, self.crop_ratio, self.color, g,
                               self.raw_pixels, self.ssl_crop_scale),
                "tokens": torch.from_numpy(trim_padding(c.tokens[caption]).astype(np.int64)),
                "caption_ids": torch.from_numpy(self.caption_id[caption]), "image_index": torch.from_numpy(images)}

    __getitem__ = batch

    def rank_batches(self, start: int, total: int, workers: int = 0, pin_memory: bool = False,
                     raw_pixels: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """This data-parallel rank's share of batches start..total-1, assembled by `workers`
        processes (0: in this one). Batch k is the global batch k and each rank takes its contiguous
        rows, so a run resumes bit-exactly on any number of ranks. `raw_pixels`: batches as `batch`
        gives them with raw_pixels set (the caller applies `finish_batch`)."""
        world, rank = distributed.world(), distributed.rank()
        share = slice(rank * self.batch_size // world, (rank + 1) * self.batch_size // world)
        source = self
        if raw_pixels != self.raw_pixels:
            source = copy.copy(self)
            source.raw_pixels = raw_pixels
        loader = torch.utils.data.DataLoader(source, batch_size=None, sampler=range(start, total), num_workers=workers,
                                             pin_memory=pin_memory)
        return ({k: v[share] for k, v in batch.items()} for batch in loader)
