"""Builders for ingest fixtures: small images in every awkward encoding, and bad inputs of each kind."""
from __future__ import annotations

import io
import tarfile
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def noise(seed: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    """A random image: distinct seeds give distinct pixels, so dedup never merges them by accident."""
    channels = len(Image.new(mode, (1, 1)).getbands())
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost nothing: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# The 12 bad rows of the acceptance test: (image cell, caption cell, expected reason). bad_files()
# creates the files they name; "@k" stands for the k-th good image (a good file, a bad caption).
BAD_ROWS = [
    ("img/none.png", "a missing file", "missing_file"),
    ("img/empty.png", "an empty file", "empty_file"),
    ("img/truncated.png", "a truncated png", "corrupt_image"),
    ("img/truncated.jpg", "a truncated jpeg", "corrupt_image"),
    ("img/text.png", "a text file", "not_an_image"),
    ("img/bomb.png", "a decompression bomb", "too_many_pixels"),
    ("img/folder.png", "a directory", "unreadable_file"),
    ("@3", "   ", "empty_caption"),
    ("@4", b"\xff\xfe not utf-8", "caption_not_utf8"),
    ("@0", "good image 0", "duplicate_row"),
    ("", "no image path", "missing_image"),
    ("@5", "too\tmany\tfields", "malformed_row"),
]
BOMB_MAX_PIXELS = 1_000_000  # params for the acceptance test: the bomb header claims 25 megapixels


def good_images(folder: Path, n: int) -> list[str]:
    """n distinct small images in assorted modes and formats; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    variants = [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("RGB", "JPEG"), ("P", "PNG"), ("CMYK", "TIFF")]
    names = []
    for i in range(n):
        mode, fmt = variants[i % len(variants)]
        img = noise(i, (24 + i, 16), "RGB").convert(mode)
        name = f"good-{i:02d}.{ {'PNG': 'png', 'JPEG': 'jpg', 'TIFF': 'tif'}[fmt] }"
        (folder / name).write_bytes(encode(img, fmt))
        names.append(name)
    return names


def bad_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(truncated(encode(noise(100, (64, 64)))))
    (folder / "truncated.jpg").write_bytes(truncated(encode(noise(101, (64, 64)), "JPEG")))
    (folder / "text.png").write_text("not an image at all\n")
    (folder / "bomb.png").write_bytes(png_header(5000, 5000))
    (folder / "folder.png").mkdir()


def acceptance_csv(root: Path, n_good: int = 20) -> tuple[Path, list[str]]:
    """A TSV of n_good good rows and the 12 BAD_ROWS, interleaved; returns it and the good names."""
    names = good_images(root / "img", n_good)
    bad_files(root / "img")
    lines = [b"filepath\ttitle"]
    good = [(f"img/{n}".encode(), f"good image {i}".encode()) for i, n in enumerate(names)]
    bad = [((f"img/{names[int(img[1:])]}" if img.startswith("@") else img).encode(),
            cap if isinstance(cap, bytes) else cap.encode()) for img, cap, _ in BAD_ROWS]
    for i in range(max(len(good), len(bad))):
        lines += [b"\t".join(row) for row in (good[i:i + 1] + bad[i:i + 1])]
    path = root / "captions.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, names


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular file `name` holding `data` in an open tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
