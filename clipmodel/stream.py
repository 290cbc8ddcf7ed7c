"""Training batches streamed from WebDataset tar shards, in bounded memory whatever the dataset size.

The shards are ingest's train split (`data.output_format: webdataset`; format in clipmodel.shards).

Every (rank, DataLoader worker) pair is one reader. `shard_order` says which shards it reads:
- "epochs" (training's): shards[reader::readers], disjoint, endlessly, in a fresh seeded order each
  pass, the shuffle buffer drained at each pass's end, so over E passes every sample is seen E
  times, as the npy route's per-epoch permutation does. Readers step in turn, so the samples of a
  smaller share come round more often: shares are even when the shards are of one size (ingest
  spreads the split evenly) and the readers divide their number; `rank_batches` warns when they do
  not. With fewer shards than readers each reader resamples instead.
- "resample": an endless stream of shards drawn with replacement from the reader's own seeded RNG
  (webdataset's ResampledShards): readers draw different shards, though not disjoint sets, and over
  E epochs of n shards a shard's count varies by about sqrt(E) around E.
- "once": one disjoint pass over shards[reader::readers] (every sample exactly once).
Memory held per reader: the tar member being read, a shuffle buffer
of at most `shuffle_buffer` decoded samples (S*S*3 bytes each: 12 KiB at 64 px) and one batch.
Images are decoded before the buffer, so every buffered sample is known good and a stream of
nothing but bad samples stops with an error. Captions are tokenized on the fly, each sample's
caption views (clipmodel.caption_views) among them, as the tokenize stage adds them for the npy route.

Resume is exact: a reader's randomness is seeded by (seed, reader, pass) for the shard order and
the shuffle buffer and by (seed, reader, batch) for a batch's captions and crops, so a run resumed
at step k skips what each reader gave before k and goes on with batch k as the uninterrupted run
would, given the same world size and DataLoader workers (with other counts the interrupted epoch's
samples may come twice or not at all). Whole passes are skipped unread when `shard_sizes` says how
many samples each shard holds (the manifest does; a sample found corrupt in such a pass shifts the
resumed stream by one); the pass that step k falls in is read and decoded up to it. The npy path,
CorpusBatches, is exact on any number of ranks.
"""
from __future__ import annotations

import io
import itertools
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image

from clipmodel import distributed
from clipmodel.caption_views import with_views
from clipmodel.data import ColorAugment, image_fields
from clipmodel.shards import BadSample, caption_ids, read_samples, shard_paths
from clipmodel.tokenizer import encode, load_tokenizer, trim_padding

T = TypeVar("T")
ShardOrder = Literal["epochs", "resample", "once"]


class SkippedSample(UserWarning):
    """A sample (or a whole shard) the stream could not use; the message names shard, key and reason."""


class Decoded(NamedTuple):
    """One decoded, checked training sample of a shard."""

    index: int           # the manifest row, from the key
    pixels: np.ndarray   # uint8 [S, S, 3]
    captions: list[str]


def shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Shuffle through a buffer of at most `size` items: each new item evicts a random buffered one."""
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(size))
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class StreamingBatches(torch.utils.data.IterableDataset):
    """Batches in CorpusBatches' format (images, tokens, caption_ids, image_index) from tar shards.

    `batch_size` is per rank. Use with DataLoader(batch_size=None, num_workers=...): each worker
    builds whole batches from its own shards. `epoch_samples` (e.g. the manifest's train count)
    gives len(), the nominal steps per epoch, which the training loop uses for epoch boundaries.
    A batch: images float32 [B, 3, S, S] (cropped, normalised; S = image_size pixels), tokens int64
    [B, L] (L <= context, trimmed), caption_ids int64 [B] (63-bit hash of the token row), image_index
    int64 [B] (manifest rows); with `raw_pixels`, uint8 pixels and crop boxes instead of images, as
    CorpusBatches.batch gives them. `shuffle_buffer` counts samples, not bytes. `caption_views` K > 0:
    each caption's K views (split at the regex `caption_view_sep`) join the sample's captions, as
    tokenize.caption_views does for the npy route, and each step draws one of them all uniformly.
    `shard_order`: "epochs", "resample" or "once" (the module docstring); only "once" ends.
    `shard_sizes`: the samples in each shard (ingest's manifest counts them), so that a resumed run
    skips whole passes without reading them; unset, it reads and decodes them to skip.

    Raises: FileNotFoundError when no shard matches; ValueError for a bad rank/world_size pair, a
    batch_size or shuffle_buffer below 1, an unknown shard_order or shard_sizes not one per shard.
    len() raises TypeError without `epoch_samples`. Iterating raises ValueError with shard_order
    "once" when there are fewer shards than readers, and RuntimeError when a pass over a reader's
    shards held no usable sample (each skip is a SkippedSample warning).
    """

    def __init__(self, shards: str | Sequence[str | Path], tokenizer: str | Path, batch_size: int,
                 image_size: int, seed: int, crop_scale: tuple[float, float],
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), *, color: ColorAugment = ColorAugment(),
                 ssl_crop_scale: tuple[float, float] | None = None, caption_views: int = 0,
                 caption_view_sep: str = r"[(),;]", shard_order: ShardOrder = "epochs",
                 shuffle_buffer: int = 2048, start_step: int = 0, epoch_samples: int | None = None,
                 shard_sizes: Sequence[int] | None = None, rank: int | None = None,
                 world_size: int | None = None):
        self.shards = shard_paths(shards) if isinstance(shards, str) else [str(s) for s in shards]
        if not self.shards:
            raise FileNotFoundError("no tar shards given")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        self.rank, self.world_size = (rank, world_size) if rank is not None else (distributed.rank(), distributed.world())
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        if batch_size < 1 or shuffle_buffer < 1:
            raise ValueError(f"batch_size ({batch_size}) and shuffle_buffer ({shuffle_buffer}) must be >= 1")
        if shard_order not in ShardOrder.__args__:
            raise ValueError(f"shard_order {shard_order!r} is not one of {ShardOrder.__args__}")
        if shard_sizes is not None and len(shard_sizes) != len(self.shards):
            raise ValueError(f"{len(shard_sizes)} shard_sizes for {len(self.shards)} shards")
        self.tokenizer, self.batch_size, self.image_size, self.seed = str(tokenizer), batch_size, image_size, seed
        self.crop_scale, self.crop_ratio, self.color = crop_scale, crop_ratio, color
        self.ssl_crop_scale = ssl_crop_scale  # a second, self-supervised view of each image (data.image_fields)
        self.caption_views, self.caption_view_sep = caption_views, caption_view_sep
        self.shard_order, self.shuffle_buffer, self.start_step = shard_order, shuffle_buffer, start_step
        self.epoch_samples, self.shard_sizes = epoch_samples, shard_sizes
        self.raw_pixels = False  # True: uint8 pixels and crop boxes, finished on the device (data.finish_batch)
        self.skipped: Counter[str] = Counter()  # reason -> count in this process; workers' show as warnings

    def __len__(self) -> int:
        if self.epoch_samples is None:
            raise TypeError("StreamingBatches has no length: pass epoch_samples")
        return self.epoch_samples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        slot, workers = (info.id, info.num_workers) if info else (0, 1)
        # A DataLoader takes batches from its workers in turn, from worker 0, however far a resumed run
        # is: the worker in `slot` plays the one whose turn global batch start_step + slot was.
        worker = (slot + self.start_step) % workers
        reader, readers = self.rank * workers + worker, self.world_size * workers
        done = -(-(self.start_step - worker) // workers)  # batches this reader gave before start_step
        skip, tok = done * self.batch_size, load_tokenizer(self.tokenizer)  # per worker: nothing heavy is pickled
        batch: list[Decoded] = []
        for order, rng in self._passes(reader, readers):
            if self.shard_sizes is not None and 0 < (size := sum(self.shard_sizes[i] for i in order)) <= skip:
                skip -= size  # a pass given before the resume, skipped unread
                continue
            samples = (sample for i in order for sample in self._read(self.shards[i]))
            seen = 0
            for sample in shuffle(samples, self.shuffle_buffer, rng):  # drained at the pass's end
                seen += 1
                if skip:
                    skip -= 1
                    continue
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield self._collate(batch, np.random.default_rng((self.seed, reader, 1, done)), tok)
                    batch, done = [], done + 1
            if not seen:
                raise RuntimeError(f"no usable sample in a pass over {len(order)} shard(s) ({self.shards[order[0]]}"
                                   f"{', ...' if len(order) > 1 else ''}); see the SkippedSample warnings")
        if batch:  # only "once" ends: its last batch may be short, so every sample is seen once
            yield self._collate(batch, np.random.default_rng((self.seed, reader, 1, done)), tok)

    def rank_batches(self, start: int, total: int, workers: int = 0, pin_memory: bool = False,
                     raw_pixels: bool = False) -> torch.utils.data.DataLoader:
        """This rank's stream, from its own shards, read by `workers` processes (0: this one), from
        global batch `start` on: a resumed run goes on as the uninterrupted one (module docstring).
        The caller stops at `total`.
        `raw_pixels`: uint8 "pixels" and "crops" instead of images (the caller applies data.finish_batch).
        Rank 0 warns (UserWarning) when shard_order "epochs" cannot give every sample one visit per
        epoch: fewer shards than readers, or a number of shards the readers do not divide."""
        self.start_step, self.raw_pixels = start, raw_pixels
        readers = self.world_size * max(workers, 1)
        if self.shard_order == "epochs" and self.rank == 0 and len(self.shards) % readers:
            warnings.warn(self._uneven(readers), stacklevel=2)
        return torch.utils.data.DataLoader(self, batch_size=None, num_workers=workers, pin_memory=pin_memory)

    def _uneven(self, readers: int) -> str:
        """Why the readers' shares differ, and the data.shard_images that evens them (epoch_samples known)."""
        n, images = len(self.shards), self.epoch_samples or "train images"
        workers = readers // self.world_size
        why = f"{n} shards for {readers} readers (world_size {self.world_size} x DataLoader workers {workers})"
        if n < readers:
            return f"{why}: each reader draws shards with replacement, as none can have one of its own; " \
                   "a smaller data.shard_images gives more shards"
        size = -(-self.epoch_samples // (readers * -(-n // readers))) if self.epoch_samples else None
        example = f" (e.g. {size})" if size and -(-self.epoch_samples // size) % readers == 0 else ""
        return (f"{why}: readers hold {-(-n // readers)} or {n // readers} shards, and the samples of the smaller "
                f"shares come round more often; set data.shard_images so that ceil({images} / shard_images) is a "
                f"multiple of {readers}{example}, or the readers to divide {n}")

    def _passes(self, reader: int, readers: int) -> Iterator[tuple[list[int], np.random.Generator]]:
        """The reader's passes: its shards (indices) in the order read, and the pass's own generator,
        which the shuffle buffer goes on drawing from. The buffer drains at each pass's end, so a pass
        gives each of its samples once however large the buffer; "resample" passes are len(shards)
        shards drawn with replacement."""
        n = len(self.shards)
        resample = self.shard_order == "resample" or (self.shard_order == "epochs" and n < readers)
        if n < readers and not resample:
            raise ValueError(f"{n} shards for {readers} readers (world_size {self.world_size} x DataLoader "
                             "workers): each reader needs a shard of its own for one disjoint pass")
        mine = range(reader, n, readers)
        for p in itertools.count():
            rng = np.random.default_rng((self.seed, reader, 0, p))
            order = rng.integers(n, size=n).tolist() if resample else [mine[i] for i in rng.permutation(len(mine))]
            yield order, rng
            if self.shard_order == "once":
                return

    def _read(self, shard: str) -> Iterator[Decoded]:
        for item in read_samples(shard):
            if isinstance(item, BadSample):
                self._skip(item.where, item.reason, item.detail)
            elif decoded := self._parse(f"{shard}:{item.key}", item.key, item.files):
                yield decoded

    def _parse(self, where: str, key: str, files: dict[str, bytes]) -> Decoded | None:
        """The decoded sample, or None (skipped and counted) when its key, captions or image are bad."""
        try:
            if not key.isdigit():
                raise BadSample("bad_key", "expected the manifest row number")
            if "png" not in files:
                raise BadSample("missing_image", f"members {sorted(files)}")
            try:
                captions = json.loads(files["json"])["captions"]
            except (KeyError, TypeError, ValueError) as e:
                raise BadSample("missing_caption", f"{type(e).__name__}: {e}") from None
            if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c for c in captions):
                raise BadSample("missing_caption", f"captions {captions!r:.60}")
            return Decoded(int(key), self._decode(files["png"]),
                           with_views(captions, self.caption_views, self.caption_view_sep))
        except BadSample as e:
            self._skip(where, e.reason, e.detail)
            return None

    def _decode(self, png: bytes) -> np.ndarray:
        try:
            img = Image.open(io.BytesIO(png))
            if img.size != (self.image_size, self.image_size):  # checked before decoding: no bombs
                raise BadSample("bad_image", f"size {img.size}, expected {self.image_size}")
            return np.asarray(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's errors for bad data
            raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None

    def _collate(self, batch: list[Decoded], rng: np.random.Generator, tok) -> dict[str, torch.Tensor]:
        captions = [s.captions[int(rng.integers(len(s.captions)))] for s in batch]
        tokens, _ = encode(tok, captions)
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        pixels = torch.from_numpy(np.stack([s.pixels for s in batch]))
        return {**image_fields(pixels, self.crop_scale, self.crop_ratio, self.color, g, self.raw_pixels,
                              self.ssl_crop_scale),
                "tokens": torch.from_numpy(trim_padding(tokens).astype(np.int64)),
                "caption_ids": torch.from_numpy(caption_ids(tokens)),
                "image_index": torch.tensor([s.index for s in batch], dtype=torch.int64)}

    def _skip(self, where: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        warnings.warn(f"{where}: skipped ({reason}): {detail}", SkippedSample)
