"""WebDataset tar shards: the one place the format is written, streamed and indexed.

A sample is a run of adjacent members sharing a key (WebDataset's convention: the key is the member's
path up to the first dot of its file name, the extension everything after it, so `x.y.png` is key
`x`, extension `y.png`). Ingest reads users' shards with `read_samples` and, with
`data.output_format: webdataset`, writes the train split with `write_sample`:

    000000042.png    the stored image, lossless: uint8 RGB, data.image_size square
    000000042.json   {"id": source key, "captions": [...], "labels": {...}, "source": "..."}

keyed by `sample_key` (the manifest row). `clipmodel.stream` streams those shards for training and
`clipmodel.data.Corpus` reads single images from them through `png_table`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
from braceexpand import braceexpand


class BadSample(Exception):
    """Why one item (a tar sample, a CSV row, a file) is unusable: a reason code, as in ingest's
    rejected.csv, a detail, and where it was found (shard:member) when the reader knows better than
    its caller. Readers turn it into a rejection or a skip and read on."""

    def __init__(self, reason: str, detail: str = "", where: str = "") -> None:
        super().__init__(reason, detail, where)
        self.reason, self.detail, self.where = reason, detail, where


class Sample(NamedTuple):
    """One sample of a shard: its key and its members' bytes by lower-cased extension."""

    key: str
    files: dict[str, bytes]


def shard_paths(pattern: str) -> list[str]:
    """The .tar files a shard spec names, sorted: a glob, a brace range as WebDataset and open_clip write
    them (`train-{000000..000099}.tar`), or both (`{a,b}/*.tar`).

    Raises: FileNotFoundError when nothing matches; IsADirectoryError when a match is a folder (the
    spec must name the files in it, e.g. `folder/*.tar`)."""
    paths = sorted({path for part in braceexpand(pattern) for path in glob.glob(part)})
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        raise IsADirectoryError(f"{folders[0]} is a folder: name the shards in it, e.g. "
                                f"{os.path.join(folders[0], '*.tar')!r}")
    return paths


def sample_key(index: int) -> str:
    """The member name stem of manifest row `index`: digits only, so it never holds a dot or a slash."""
    return f"{index:09d}"


def write_sample(tar: tarfile.TarFile, key: str, files: dict[str, bytes]) -> None:
    """Append key.<ext> for each extension in order; mtime stays 0, so equal inputs give byte-equal shards."""
    for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def read_samples(shard: str | Path) -> Iterator[Sample | BadSample]:
    """Stream a shard member by member (never extracted, never seeking: pipes and gzip work too).

    Yields each sample, and a BadSample (not raised: the stream goes on) for a link or a path
    escaping the shard (`unsafe_path`), a file name starting with a dot (`bad_key`), a key seen
    earlier in the shard or a second member of one extension (`duplicate_key`), and, ending the
    shard, a read error (`corrupt_shard`). Samples before a corrupt block are still yielded."""
    key, files, seen = None, {}, set()
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                where = f"{shard}:{member.name}"
                name = PurePosixPath(member.name)
                if member.issym() or member.islnk():
                    yield BadSample("unsafe_path", f"link to {member.linkname}", where)
                    continue
                if name.is_absolute() or ".." in name.parts:
                    yield BadSample("unsafe_path", "absolute or '..' member name", where)
                    continue
                if not member.isfile():
                    continue
                stem, _, ext = name.name.partition(".")
                if not stem:
                    yield BadSample("bad_key", "a file name starting with a dot has no key", where)
                    continue
                if str(name.parent / stem) != key:
                    if key is not None:
                        yield Sample(key, files)
                    key, files = str(name.parent / stem), {}
                    if key in seen:
                        yield BadSample("duplicate_key", f"key {key} appeared earlier in the shard", where)
                        key = None
                        continue
                    seen.add(key)
                if ext.lower() in files:
                    yield BadSample("duplicate_key", f"a second .{ext} for key {key}", where)
                    continue
                files[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        yield BadSample("corrupt_shard", f"rest of the shard unread: {type(e).__name__}: {e}", f"{shard}:{key or '-'}")
    if key is not None:
        yield Sample(key, files)


def png_table(shard: str | Path) -> tuple[np.ndarray, list[str]]:
    """Random access into a shard: int64 [n, 2] (byte offset, size) of each .png member's data, in
    member order, and their names. Reads the headers only; the data blocks are skipped by seeking.

    Raises: tarfile.TarError or OSError when the shard cannot be read."""
    with tarfile.open(shard) as tar:
        pngs = [m for m in tar.getmembers() if m.name.endswith(".png")]
    return np.array([(m.offset_data, m.size) for m in pngs], dtype=np.int64).reshape(-1, 2), [m.name for m in pngs]


def caption_ids(tokens: np.ndarray) -> np.ndarray:
    """int64 [C] from token rows int [C, L]: equal rows (captions the model cannot tell apart) get
    equal ids, distinct rows distinct ones (a 63-bit BLAKE2b hash of the row's bytes; a collision
    needs ~3e9 distinct captions). The same id for the same caption whether the rows come from the
    whole corpus or from one streamed batch, so the multi-positive loss and retrieval agree."""
    rows = np.ascontiguousarray(tokens)
    return np.fromiter((int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") >> 1
                        for row in rows), dtype=np.int64, count=len(rows))
