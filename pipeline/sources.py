"""One reader per `data.source`: a lazy stream of records and rejections, never the dataset in RAM.

A reader settles everything that is known without decoding an image (paths, captions, pairing,
path safety); ingest does the decoding. A bad item becomes a Rejection with a reason code and the
stream goes on; only a source that cannot be read at all raises SourceError.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from clipmodel import synthetic
from clipmodel.shards import BadSample, read_samples, shard_paths
from pipeline.params import CocoSource, CsvSource, DataParams, FolderSource, WebDatasetSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SourceError(Exception):
    """The source as a whole is unusable: a missing file, a CSV without the named columns, no shards."""


@dataclass(frozen=True)
class Record:
    """One image with its captions, all that a reader can settle without decoding it. Rows sharing a
    key are one image (ingest merges their captions); `labels` is a JSON object, "{}" when unlabelled."""
    key: str                                # stable id: names the item and decides its split
    source: str                             # where the pixels are: a file path, shard:key, "synthetic"
    origin: str                             # where the item was declared (a CSV row...), for rejected.csv
    image: bytes | Path | synthetic.Scene   # encoded bytes, a file, or a scene to render
    captions: tuple[str, ...]
    labels: str = "{}"


@dataclass(frozen=True)
class Rejection:
    """A row of rejected.csv; `source` is the refused item's origin."""
    source: str
    reason: str
    detail: str = ""


Item = Record | Rejection


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """The item's split, a pure function of its key: adding data never moves earlier items.

    It lives with the readers because the synthetic one must know an item's split before drawing it.
    """
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def clean_caption(raw: str | bytes) -> str:
    """The caption stripped of surrounding whitespace and of a leading byte-order mark (a sidecar .txt
    saved by a Windows editor); the tokenizer does any other normalisation.

    Raises: BadSample (bad_caption, caption_not_utf8, empty_caption) for a caption that is not usable text."""
    if not isinstance(raw, (str, bytes)):
        raise BadSample("bad_caption", f"a {type(raw).__name__}, not text")
    try:
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")  # back to the file's bytes, see read_csv
        text = raw.decode("utf-8-sig").strip()
    except UnicodeError:  # undecodable bytes, or a lone surrogate (a truncated emoji in JSON)
        raise BadSample("caption_not_utf8", repr(raw[:60])) from None
    if not text:
        raise BadSample("empty_caption", f"{len(raw)} bytes of whitespace" if raw else "no text")
    return text


def utf8_name(name: str) -> str:
    """`name` when it is valid UTF-8; a name holding undecodable bytes (read with surrogateescape) cannot be
    written to the manifest or compared across systems, so the item is refused with the name escaped.

    Raises: BadSample (path_not_utf8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSample("path_not_utf8", escaped(name)) from None
    return name


def escaped(text: str) -> str:
    """`text` as valid UTF-8 for reports: the file's own undecodable bytes (read with surrogateescape) as
    \\xNN, a lone surrogate as \\uNNNN."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()


def _inside(root: Path, path: Path) -> Path:
    """`path`, refused when it (or a symlink on the way) leads out of the already-resolved `root`: a
    data root holds its data. The detail says how to keep a linked tree (its root may be a link)."""
    if not path.resolve().is_relative_to(root):
        raise BadSample("unsafe_path", f"{path} -> {path.resolve()}: outside the data root {root}; point the "
                                       "source at the folder the files are in (a linked root is followed), "
                                       "or copy or hard-link them in")
    return path


def read_synthetic(data: DataParams) -> Iterator[Item]:
    """data.synthetic.num_images generated scenes, each a function of (data.seed, index): no rejections.
    Train-split scenes never show the held-out (color, shape) pairs, so zero-shot on those tests
    composition; val and test scenes may."""
    p = data.synthetic
    held_out = synthetic.holdout_pairs(data.seed, p.holdout_fraction)
    for i in range(p.num_images):
        key = f"synthetic-{i:06d}"
        train = split_of(key, data.val_fraction, data.test_fraction) == "train"
        scene, texts = synthetic.sample(data.seed, i, p.max_objects, held_out if train else frozenset(),
                                        p.captions_per_image, p.color_mention)
        yield Record(key, "synthetic", key, scene, texts, scene.labels())


def read_csv(p: CsvSource) -> Iterator[Item]:
    """open_clip's CSV/TSV layout: one (image path, caption) per line, paths relative to the CSV.

    Every physical line after the header becomes exactly one record or one rejection naming its line
    number: a row is one line (a caption cannot span lines), so a broken quote costs its own line only.
    Quotes are CSV quoting for `,`-separated files and plain text for tab-separated ones (a caption may
    start with a quoted title), unless `data.csv.quoting` says otherwise.
    """
    path = Path(p.path)
    quoted = p.quoting == "csv" or (p.quoting == "auto" and p.sep != "\t")
    dialect = dict(delimiter=p.sep, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, strict=True)
    try:
        f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    except FileNotFoundError:
        raise SourceError(f"{path}: not found") from None
    except OSError as e:  # a directory, no permission
        raise SourceError(f"{path}: cannot read: {e}") from None
    with f:
        try:
            columns = next(csv.reader([f.readline().rstrip("\r\n")], **dialect), [])
        except (csv.Error, OSError) as e:
            raise SourceError(f"{path}: cannot read the header: {e}") from None
        missing = [c for c in (p.image_column, p.caption_column) if c not in columns]
        if missing:
            raise SourceError(f"{path}: no column {', '.join(map(repr, missing))}; it has {columns} "
                              "(set data.csv.image_column / caption_column / sep)")
        image_at, caption_at = columns.index(p.image_column), columns.index(p.caption_column)
        for number, line in enumerate(f, start=2):
            where = f"{path}:line {number}"
            line = line.rstrip("\r\n")
            try:
                fields = next(csv.reader([line], **dialect), [])
            except csv.Error as e:  # an unclosed quote, a stray quote inside a quoted field
                yield Rejection(where, "malformed_row", f"{e}: {line[:200]}")
                continue
            if len(fields) != len(columns):
                reason = "blank_line" if not line.strip() else "malformed_row"
                yield Rejection(where, reason, f"{len(fields)} fields, the header has {len(columns)}: {line[:200]}")
                continue
            image, text = fields[image_at], fields[caption_at]
            if not image.strip():
                yield Rejection(where, "missing_image", "empty image path")
                continue
            try:
                captions = (clean_caption(text),)
                utf8_name(image)
            except BadSample as e:
                yield Rejection(where, e.reason, e.detail)
                continue
            yield Record(os.path.normpath(image), str(path.parent / image), where, path.parent / image, captions)


def read_coco(p: CocoSource) -> Iterator[Item]:
    """A COCO captions JSON: all captions of an image travel together as one record.

    A file whose top level is wrong is a SourceError naming the key; a malformed image or annotation
    record is a rejection with its position and reason."""
    path = Path(p.annotations)
    root = Path(p.images) if p.images else path.parent
    try:
        coco = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{path}: not found") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not a COCO captions file: {type(e).__name__}: {e}") from None
    for key in ("images", "annotations"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            found = (f"the top level is a {type(coco).__name__}" if not isinstance(coco, dict) else
                     f"it is missing (keys: {', '.join(map(str, coco)) or 'none'})" if key not in coco else
                     f"found {type(coco[key]).__name__}")
            raise SourceError(f"{path}: not a COCO captions file: {key!r} must be a list ({found})")
    if not root.is_dir():
        raise SourceError(f"{root}: image folder not found")
    real_root = root.resolve()

    images: dict[int | str, dict] = {}
    for i, im in enumerate(coco["images"]):
        try:
            if not isinstance(im, dict) or not _scalar_id(im.get("id")) or not isinstance(im.get("file_name"), str):
                raise BadSample("bad_record", "an image needs a scalar id and a string file_name")
            if im["id"] in images:
                raise BadSample("duplicate_image_id", f"image id {im['id']} (file_name {im['file_name']!r})")
            utf8_name(im["file_name"])
            images[im["id"]] = im
        except BadSample as e:
            yield Rejection(f"{path}:images[{i}]", e.reason, e.detail)
    captions: dict[int | str, list[str]] = defaultdict(list)
    for i, ann in enumerate(coco["annotations"]):
        where = f"{path}:annotations[{i}]"
        try:
            if not isinstance(ann, dict) or not _scalar_id(ann.get("image_id")) or "caption" not in ann:
                raise BadSample("bad_record", "an annotation needs a scalar image_id and a caption")
            if ann["image_id"] not in images:
                raise BadSample("missing_image", f"image_id {ann['image_id']!r}{_id_type_hint(ann['image_id'], images)}")
            text = clean_caption(ann["caption"])
            if text in captions[ann["image_id"]]:
                raise BadSample("duplicate_row", text)
            captions[ann["image_id"]].append(text)
        except BadSample as e:
            yield Rejection(where, e.reason, e.detail)

    for image_id, im in images.items():
        where = f"{path}:image {image_id}"
        try:
            if not captions.get(image_id):
                raise BadSample("missing_caption", im["file_name"])
            file = _inside(real_root, root / im["file_name"])
        except BadSample as e:
            yield Rejection(where, e.reason, e.detail)
            continue
        yield Record(im["file_name"], str(file), where, file, tuple(captions.pop(image_id)))


def _scalar_id(value: object) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _id_type_hint(image_id: int | str, images: dict[int | str, dict]) -> str:
    """Where the id names an image only when read as the other type (`9` against `"9"`), say so: ids
    are compared as the JSON gives them, so the two rows would otherwise seem to contradict each other."""
    try:
        other = str(image_id) if isinstance(image_id, int) else int(image_id)
    except ValueError:  # a string id that is no number
        return ""
    if other not in images:
        return ""
    kind = {int: "a number", str: "a string"}
    return f" (an image has id {other!r}, {kind[type(other)]}; this one is {kind[type(image_id)]}: ids must match in type)"


def read_webdataset(p: WebDatasetSource) -> Iterator[Item]:
    """`.tar` shards streamed member by member (never extracted): key.{jpg,png,webp} + key.txt, the
    key as clipmodel.shards reads it. Bad members and samples are rejections, never merged or dropped unseen."""
    try:
        shards = shard_paths(p.shards)
    except OSError as e:
        raise SourceError(f"data.webdataset.shards: {e}") from None
    for shard in map(Path, shards):
        for item in read_samples(shard):
            if isinstance(item, BadSample):
                yield Rejection(item.where, item.reason, item.detail)
            else:
                yield _sample(shard, item.key, item.files)


def _sample(shard: Path, key: str, files: dict[str, bytes]) -> Item:
    where = f"{shard}:{key}"
    image = next((files[s[1:]] for s in IMAGE_SUFFIXES if s[1:] in files), None)
    try:
        if image is None:
            raise BadSample("missing_image", f"only {sorted(files)}")
        if "txt" not in files:
            raise BadSample("missing_caption", f"only {sorted(files)}")
        captions = (clean_caption(files["txt"]),)
    except BadSample as e:
        return Rejection(where, e.reason, e.detail)
    return Record(f"{shard.name}/{key}", where, where, image, captions)


def read_folder(p: FolderSource) -> Iterator[Item]:
    """Images anywhere under the root, each with a sidecar caption: photo.jpg + photo.txt."""
    root = Path(p.path)
    if not root.is_dir():
        raise SourceError(f"{root}: folder not found")
    real_root = root.resolve()
    for here, dirs, files in os.walk(root):  # symlinked folders are not entered...
        here = Path(here)
        dirs.sort()
        for d in dirs:
            if (here / d).is_symlink() and not (here / d).resolve().is_relative_to(real_root):
                yield Rejection(str(here / d), "unsafe_path", f"-> {(here / d).resolve()}")  # ...but reported
        names = set(files)
        image_stems = {Path(f).stem for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES}
        for name in sorted(files):
            path = here / name
            key = path.relative_to(root).as_posix()
            try:
                if path.suffix == ".txt":
                    if path.stem not in image_stems:
                        raise BadSample("missing_image", "caption without an image")
                    continue
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                utf8_name(key)  # its sidecar shares the name: one rejection for the pair
                caption = path.with_suffix(".txt")
                if caption.name not in names:
                    raise BadSample("missing_caption", caption.name)
                captions = (clean_caption(_inside(real_root, caption).read_bytes()),)
                yield Record(key, str(path), str(path), _inside(real_root, path), captions)
            except BadSample as e:
                yield Rejection(str(path), e.reason, e.detail)  # named as its Record would be


READERS = {
    "synthetic": read_synthetic,
    "csv": lambda data: read_csv(data.csv),
    "coco": lambda data: read_coco(data.coco),
    "webdataset": lambda data: read_webdataset(data.webdataset),
    "folder": lambda data: read_folder(data.folder),
}


def read(data: DataParams) -> Iterator[Item]:
    """The reader of data.source, lazily: records and rejections in source order.

    Raises: SourceError (when iterated) when the source as a whole cannot be read.
    """
    return READERS[data.source](data)
