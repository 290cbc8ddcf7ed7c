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

    Raises: FileNotFoundError when nothing matches, or when one name of a brace range (or one of its
    globs) matches nothing: a range one past the last shard would otherwise train on the rest and
    never say so (WebDataset fails on the missing file too); IsADirectoryError when a match is a
    folder (the spec must name the files in it, e.g. `folder/*.tar`)."""
    parts = {part: glob.glob(part) for part in braceexpand(pattern)}
    paths = sorted({path for matches in parts.values() for path in matches})
    if not paths:
        raise FileNotFoundError(f"no shards match {pattern!r}")
    missing = [part for part, matches in parts.items() if not matches]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(parts)} names in {pattern!r} match no file, "
                                f"first {missing[0]!r}")
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


def cut_short(shard: str | Path) -> str | None:
    """Why an uncompressed shard file looks truncated, or None. tarfile reads a tar cut inside a
    member header as a clean end, so the samples after the cut would vanish unreported; a whole tar
    is a run of 512-byte blocks ending in zero blocks (the end-of-archive marker). Compressed shards
    and pipes are left to their decoder, which fails on a cut stream."""
    path = Path(shard)
    if not path.is_file():
        return None
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ")):
            return None
        if size % 512:
            return f"{size} bytes is not a whole number of 512-byte tar blocks"
        f.seek(max(0, size - 512))
        if any(f.read(512)):
            return "no end-of-archive block"
    return None


def read_samples(shard: str | Path) -> Iterator[Sample | BadSample]:
    """Stream a shard member by member (never extracted, never seeking: pipes and gzip work too).

    Yields each sample, and a BadSample (not raised: the stream goes on) for a link or a path
    escaping the shard (`unsafe_path`), a file name starting with a dot (`bad_key`), a key seen
    earlier in the shard or a second member of one extension (`duplicate_key`), and, ending the
    shard, a read error or a truncated file (`cut_short`) as one `corrupt_shard` naming the sample
    being read, which is not also yielded: its members may be cut. Samples before it are yielded."""
    key, files, seen = None, {}, set()
    cut = cut_short(shard)
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
        cut = f"{type(e).__name__}: {e}"
    if cut:
        got = f"this sample (read of it: {', '.join(sorted(files)) or 'nothing'}) and " if key is not None else ""
        yield BadSample("corrupt_shard", f"{got}the rest of the shard unread: {cut}", f"{shard}:{key or '-'}")
    elif key is not None:
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
