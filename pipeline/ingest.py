"""Stage `ingest`: any source becomes the same memory-mappable image shards and manifest.

    python -m pipeline.ingest [--images data/images] [--manifest data/manifest.parquet]
                              [--rejected data/rejected.csv] [--report reports/ingest.json]

Outputs (the defaults; dvc.yaml names them): data/images/shard-NNNNN.npy (uint8 [n, S, S, 3],
data.shard_images each), data/manifest.parquet (one row per unique image, in shard order: id,
source, captions, split, shard, row, labels), data/rejected.csv (source, reason, detail) and
reports/ingest.json.

With data.output_format: webdataset, the train split goes to data/images/train-NNNNNN.tar instead
(WebDataset shards of NNNNNNNNN.png + .json, the format in clipmodel/stream.py, streamed by
StreamingBatches), and only val and test go to the .npy shards, which stay small; a train row's
shard and row then number its tar and its place in it. clipmodel.data.Corpus reads a train row
from its tar too, so CorpusBatches, the supervised baseline and evaluate's linear probe take either.

Images are decoded once, in worker processes. Everything else (dedup, splits, shard order) happens
in source order in this process, so the outputs do not depend on data.workers. Each output is
written beside its target and renamed over it (the manifest last): an interrupted run leaves the
previous outputs, never half-written ones, and never touches the tokenize stage's files in data/.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import tarfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from clipmodel.images import ImageError, load_rgb, preprocess
from clipmodel.io import atomic_path, write_json
from clipmodel.shards import png_table, sample_key, write_sample
from clipmodel.synthetic import Scene, render
from pipeline.params import DataParams, load_params
from pipeline.sources import Item, Record, Rejection, SourceError, escaped, read, split_of

BATCH = 512   # records per imap call; two calls in flight bound the memory held in queues
CHUNK = 16    # records per worker task: amortises inter-process overhead

MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("captions", pa.list_(pa.string())),
                             ("split", pa.string()), ("shard", pa.int32()), ("row", pa.int32()),
                             ("labels", pa.string()), ("duplicates", pa.list_(pa.string()))])

Decoded = tuple[np.ndarray, bytes, bytes | None] | Rejection  # (pixels, pixel digest, PNG) or why not


def decode(record: Record, size: int, background: tuple[int, int, int], max_pixels: int, png: bool) -> Decoded:
    """Runs in a worker: the record's pixels at the stored size, a digest of the decoded full-size
    pixels for exact dedup and, for tar output, the PNG encoding (here, so it runs in parallel)."""
    try:
        if isinstance(record.image, Scene):
            pixels = full = render(record.image, size)
        else:
            full = load_rgb(record.image, background, max_pixels)
            pixels = preprocess(full, size)  # = images.load_image, keeping the full-size pixels for the digest
    except ImageError as e:
        return Rejection(record.origin, e.reason, e.detail)
    # Duplicates are equal at full size: two images that only became equal when resized are two images.
    digest = hashlib.blake2b(repr(full.shape).encode() + full.tobytes(), digest_size=16).digest()
    return pixels, digest, encode_png(pixels) if png else None


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless and fast (zlib level 1): the pixels were already resized once; PNG adds no second loss."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def decode_in_order(items: Iterable[Item], work: Callable[[Record], Decoded],
                    imap: Callable = map) -> Iterator[tuple[Item, Decoded | None]]:
    """Each item with its decoded image, in source order; None for rejections and for records whose
    key was seen before (another caption of an image already on its way).

    Items go to `imap` in batches with at most two batches in flight, so a fast reader never piles
    a whole dataset of encoded bytes into the pool's queue.
    """
    seen: set[str] = set()
    pending: deque = deque()
    items = iter(items)
    while batch := list(islice(items, BATCH)):
        fresh = []
        for it in batch:
            fresh.append(isinstance(it, Record) and it.key not in seen)
            if fresh[-1]:
                seen.add(it.key)
        pending.append((batch, fresh, imap(work, [it for it, new in zip(batch, fresh) if new])))
        if len(pending) == 2:
            yield from _merge(*pending.popleft())
    while pending:
        yield from _merge(*pending.popleft())


def _merge(batch: list[Item], fresh: list[bool],
           results: Iterator[Decoded]) -> Iterator[tuple[Item, Decoded | None]]:
    results = iter(results)
    for it, new in zip(batch, fresh):
        yield it, next(results) if new else None


class ShardWriter:
    """Fills one shard-sized buffer at a time: only the current shard's pixels are ever in memory."""

    def __init__(self, folder: Path, per_shard: int, size: int) -> None:
        folder.mkdir(parents=True)
        self.folder, self.per_shard, self.count = folder, per_shard, 0
        self.buffer = np.empty((per_shard, size, size, 3), dtype=np.uint8)

    def add(self, pixels: np.ndarray) -> None:
        """Append one image, uint8 [S, S, 3]; a full buffer is saved as the next shard-NNNNN.npy."""
        self.buffer[self.count % self.per_shard] = pixels
        self.count += 1
        if self.count % self.per_shard == 0:
            self._flush(self.per_shard)

    def close(self) -> None:
        """Save the last, partly filled shard (shorter than per_shard), if any. Call once, after the last add."""
        if self.count % self.per_shard:
            self._flush(self.count % self.per_shard)

    def _flush(self, n: int) -> None:
        np.save(self.folder / f"shard-{(self.count - 1) // self.per_shard:05d}.npy", self.buffer[:n])


class TarShards:
    """The train split as WebDataset shards in a seeded random order, holding no pixels in memory.

    A streaming reader shuffles only within its buffer, so shards in source order (often sorted: by
    category, skin-tone variants side by side) would put look-alike images in one batch; WebDataset's
    advice is to shuffle when writing shards. The split is spread evenly over ceil(n / per_shard)
    shards (sizes within one sample of each other): stream readers step in turn, each over its own
    shards, so a short last shard would bring its reader's samples round more often. Captions can
    also still grow after an image is written (a later row of the same key, a pixel duplicate). So
    images first go to spool tars in source order, and `finish` writes the shards from them in a
    permuted order with the final metadata: the train split is on disk twice until it ends.
    """

    def __init__(self, folder: Path, per_shard: int) -> None:
        self.folder, self.per_shard, self.count = folder, per_shard, 0
        self.spool: tarfile.TarFile | None = None

    def add(self, index: int, png: bytes) -> None:
        """Spool the PNG of manifest row `index` (its key, `sample_key(index)`); the metadata comes in `finish`."""
        if self.count % self.per_shard == 0:
            self._close_spool()
            self.spool = tarfile.open(self._spool_path(self.count // self.per_shard), "w")
        write_sample(self.spool, sample_key(index), {"png": png})
        self.count += 1

    def finish(self, meta: Callable[[int], dict], seed: int) -> list[np.ndarray]:
        """Writes train-NNNNNN.tar, the spooled samples in the order of a permutation seeded by `seed`,
        with `meta(index)` beside each image; returns each shard's manifest rows (int64), in order."""
        self._close_spool()
        spools = [self._spool_path(n) for n in range(-(-self.count // self.per_shard))]
        where: list[tuple[Path, int, int]] = []  # each spooled PNG: spool, byte offset, size
        rows: list[int] = []
        for spool in spools:
            table, names = png_table(spool)
            where += [(spool, int(offset), int(size)) for offset, size in table]
            rows += [int(name.partition(".")[0]) for name in names]
        parts = np.array_split(np.random.default_rng(seed).permutation(self.count), len(spools)) if spools else []
        for n, part in enumerate(parts):
            with tarfile.open(self.folder / f"train-{n:06d}.tar", "w") as dst:
                for k in part:
                    spool, offset, size = where[k]
                    with open(spool, "rb") as f:
                        f.seek(offset)
                        png = f.read(size)
                    write_sample(dst, sample_key(rows[k]), {"png": png, "json": json.dumps(meta(rows[k])).encode()})
        for spool in spools:
            spool.unlink()
        return [np.array(rows, dtype=np.int64)[part] for part in parts]

    def _spool_path(self, n: int) -> Path:
        return self.folder / f".spool-{n:06d}.tar"

    def _close_spool(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


@dataclass
class Manifest:
    """The per-image metadata, small enough to keep whole; shard and row follow from the position
    (counted apart for the train split when it goes to tar shards)."""
    per_shard: int
    tar_train: bool
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)

    def add(self, record: Record, split: str) -> int:
        """A new image row (its captions deduplicated, first occurrence kept); returns its manifest index."""
        self.ids.append(record.key)
        self.sources.append(record.source)
        self.captions.append(list(dict.fromkeys(record.captions)))
        self.splits.append(split)
        self.labels.append(record.labels)
        self.duplicates.append([])
        return len(self.ids) - 1

    def add_duplicate(self, index: int, item: Record) -> None:
        """An item whose pixels equal image `index`'s: its captions join that image and its key is kept
        in the image's `duplicates`, so that every input item stays traceable."""
        self.duplicates[index].append(item.key)
        self.add_captions(index, item.captions)

    def add_captions(self, index: int, captions: Iterable[str]) -> int:
        """Appends the captions not already there; returns how many were new."""
        new = [c for c in dict.fromkeys(captions) if c not in self.captions[index]]
        self.captions[index] += new
        return len(new)

    def meta(self, index: int) -> dict:
        """A tar sample's .json: what the stream needs (captions) and what identifies the image."""
        return {"id": self.ids[index], "captions": self.captions[index], "labels": json.loads(self.labels[index]),
                "source": self.sources[index]}

    def write(self, path: Path, pixels_sha256: str, tar_shards: list[np.ndarray]) -> None:
        """The manifest as Parquet (MANIFEST_SCHEMA), shard and row numbered within each store: the npy
        shards, in manifest order, and the tar shards for the train split when `tar_train`, as
        `tar_shards` (TarShards.finish: each tar's rows, in order) holds them. `pixels_sha256`, the digest of
        every stored image in manifest order, goes into the file's metadata, so that the manifest, which
        training fingerprints to decide whether a checkpoint may be resumed, changes with the pixels
        (data.background, edited image files, the decoding code), not only with the captions."""
        in_npy = (np.array(self.splits) != "train") | (not self.tar_train)
        shard, row = np.empty(len(self.ids), dtype=np.int64), np.empty(len(self.ids), dtype=np.int64)
        shard[in_npy], row[in_npy] = np.divmod(np.arange(in_npy.sum()), self.per_shard)
        for n, rows in enumerate(tar_shards):
            shard[rows], row[rows] = n, np.arange(len(rows))
        pq.write_table(pa.table({
            "id": self.ids, "source": self.sources, "captions": self.captions, "split": self.splits,
            "shard": shard, "row": row, "labels": self.labels, "duplicates": self.duplicates,
        }, schema=MANIFEST_SCHEMA.with_metadata({"pixels_sha256": pixels_sha256})), path)


class NoUsableImage(SourceError):
    """Every item was rejected: `run` still writes rejected.csv, the list of what to fix."""
    def __init__(self, message: str, rejected: list[Rejection]) -> None:
        super().__init__(message)
        self.rejected = rejected


def write_rejected(rejected: list[Rejection], path: Path) -> None:
    """rejected.csv: one row per rejection (source, reason, detail), in the order they were found."""
    pd.DataFrame([(escaped(r.source), r.reason, escaped(r.detail)) for r in rejected],
                 columns=["source", "reason", "detail"]).to_csv(path, index=False)


def ingest(data: DataParams, images_dir: Path, manifest_path: Path, rejected_path: Path) -> dict:
    """Reads, decodes, dedups and writes; returns the report. Raises SourceError when nothing is usable."""
    start = time.perf_counter()
    tar = data.output_format == "webdataset"
    shards = ShardWriter(images_dir, data.shard_images, data.image_size)
    tars = TarShards(images_dir, data.shard_images)
    manifest = Manifest(data.shard_images, tar)
    by_key: dict[str, int] = {}         # key -> manifest index (of the first copy, after dedup)
    by_digest: dict[bytes, int] = {}    # pixel digest -> manifest index
    failed: dict[str, Rejection] = {}   # key -> why its image was refused, for later rows of that key
    rejected: list[Rejection] = []
    duplicates = 0  # items whose pixels equal an earlier image's: their captions join it
    merged = 0      # further rows of an image already read, adding captions to it
    stored = hashlib.sha256()  # every stored image's pixels, in manifest order

    work = partial(decode, size=data.image_size, background=data.background, max_pixels=data.max_pixels, png=tar)
    total = data.synthetic.num_images if data.source == "synthetic" else None
    with Pool(data.workers) if data.workers > 1 else nullcontext() as pool:
        stream = decode_in_order(read(data), work, pool.imap if pool else map)
        for item, result in tqdm(stream, desc="ingest", unit="img", total=total, mininterval=1.0):
            if isinstance(item, Rejection):
                rejected.append(item)
            elif isinstance(result, Rejection):
                rejected.append(result)
                failed[item.key] = result
            elif result is None:  # another row naming an image already seen
                if item.key in failed:
                    rejected.append(replace(failed[item.key], source=item.origin))
                elif manifest.add_captions(by_key[item.key], item.captions):
                    merged += 1
                else:
                    rejected.append(Rejection(item.origin, "duplicate_row", item.key))
            else:
                pixels, digest, png = result
                if digest in by_digest:
                    duplicates += 1
                    manifest.add_duplicate(by_digest[digest], item)
                    by_key[item.key] = by_digest[digest]
                else:
                    split = split_of(item.key, data.val_fraction, data.test_fraction)
                    by_key[item.key] = by_digest[digest] = manifest.add(item, split)
                    stored.update(pixels.tobytes())
                    if tar and split == "train":
                        tars.add(by_key[item.key], png)
                    else:
                        shards.add(pixels)
    shards.close()
    tar_shards = tars.finish(manifest.meta, data.seed)

    reasons = Counter(r.reason for r in rejected)
    if not manifest.ids:
        first = f"; first: {rejected[0].source}: {rejected[0].reason}: {rejected[0].detail}" if rejected else ""
        raise NoUsableImage(f"no usable image in the {data.source} source ({len(rejected)} rejected: "
                            f"{dict(reasons.most_common())}{first})", rejected)
    manifest.write(manifest_path, stored.hexdigest(), tar_shards)
    write_rejected(rejected, rejected_path)
    seconds = time.perf_counter() - start
    return {
        "accepted": len(manifest.ids),
        "rejected": len(rejected),
        "reasons": dict(reasons.most_common()),
        "duplicates": duplicates,
        "rows_merged": merged,
        "splits": {s: manifest.splits.count(s) for s in ("train", "val", "test")},
        "images_per_s": round(len(manifest.ids) / seconds, 1),
        "seconds": round(seconds, 2),
        "source": data.source,
        "output_format": data.output_format,
        "tar_shards": len(tar_shards),
    }


def run(data: DataParams, root: Path = Path("."), images: str | Path = "data/images",
        manifest: str | Path = "data/manifest.parquet", rejected: str | Path = "data/rejected.csv",
        report: str | Path = "reports/ingest.json") -> dict:
    """Ingest into `images`, `manifest`, `rejected` and `report` (relative to `root`), replacing only these.
    When no image is usable, the others keep the last good run's files and `rejected` lists this run's
    rejections (a list of another source's would mislead).

    Raises: SourceError (NoUsableImage when every item was rejected)."""
    try:
        with ExitStack() as stack:  # contexts exit in reverse: images, then rejected.csv, then the manifest
            manifest_tmp = stack.enter_context(atomic_path(root / manifest))
            rejected_tmp = stack.enter_context(atomic_path(root / rejected))
            images_tmp = stack.enter_context(atomic_path(root / images))
            summary = ingest(data, images_tmp, manifest_tmp, rejected_tmp)
    except NoUsableImage as e:
        with atomic_path(root / rejected) as tmp:
            write_rejected(e.rejected, tmp)
        raise
    write_json(root / report, summary)
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The stage's paths: the defaults are the root pipeline's, which dvc.yaml passes explicitly."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.ingest", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--images", type=Path, default=Path("data/images"), help="output: the image shards folder")
    ap.add_argument("--manifest", type=Path, default=Path("data/manifest.parquet"), help="output: the manifest")
    ap.add_argument("--rejected", type=Path, default=Path("data/rejected.csv"), help="output: each rejected item, why")
    ap.add_argument("--report", type=Path, default=Path("reports/ingest.json"), help="output: the stage's summary")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the stage. Raises: SystemExit (one line) when the source is unreadable or yields no usable image."""
    args = parse_args(argv)
    data = load_params().data
    try:
        r = run(data, images=args.images, manifest=args.manifest, rejected=args.rejected, report=args.report)
    except NoUsableImage as e:
        raise SystemExit(f"ingest: {e}; all listed in {args.rejected}") from None
    except SourceError as e:
        raise SystemExit(f"ingest: {e}") from None
    repeats = r["reasons"].get("duplicate_row", 0)
    print(f"ingest: {r['accepted']} images ({r['splits']}), {r['rejected']} rejected {r['reasons']}"
          f"{f' ({repeats} duplicate_row: a caption its image already has, nothing lost)' if repeats else ''}, "
          f"{r['duplicates']} duplicates merged, {r['images_per_s']} img/s")


if __name__ == "__main__":
    main()
