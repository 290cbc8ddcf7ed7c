"""Image decoding and preprocessing shared by ingest and the torch-free runtime.

Both call the same two functions, `load_rgb` then `preprocess`, so a model served outside the
pipeline sees exactly the pixels it was trained on. Only PIL and numpy: no torch import here.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 89_478_485  # PIL's own default limit
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
STRIP_RATIO = 8  # aspect ratios past this are cropped before the resize (`preprocess`)
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}  # "I": how older PIL opens 16-bit greyscale


class ImageError(Exception):
    """An image that cannot be used; `reason` is the short code written to rejected.csv: empty_file,
    missing_file, not_an_image, unreadable_file, corrupt_image, too_many_pixels or
    unsupported_pixel_range. `detail` says more (often the path), or is empty."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason, detail)  # both in args, so the error survives pickling between processes
        self.reason, self.detail = reason, detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason

    def naming(self, source: object) -> ImageError:
        """This error with `source` (a path) at the front of its detail, unless the detail starts with
        that path already or the source is bytes: for callers that decode many images and stop at one."""
        if not isinstance(source, (str, Path)) or self.detail == str(source) \
                or self.detail.startswith(f"{source}: "):
            return self
        return ImageError(self.reason, f"{source}: {self.detail}" if self.detail else str(source))


def _open(source: bytes | str | Path) -> io.BytesIO | Path:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty_file")
        return io.BytesIO(source)
    try:
        if os.path.getsize(source) == 0:
            raise ImageError("empty_file", str(source))
    except FileNotFoundError:
        raise ImageError("missing_file", str(source)) from None
    return Path(source)


def decode(source: bytes | str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Fully decoded image with its EXIF orientation applied, in whatever mode the file holds.

    The pixel count is checked from the header, before any pixel is decoded, so a small file that
    expands to gigabytes (a decompression bomb) costs nothing. PIL's own limit still applies on top.
    `max_pixels` is width x height.

    Raises: ImageError (empty_file, missing_file, not_an_image, unreadable_file, corrupt_image,
    too_many_pixels) for anything that stops the decode, whatever PIL raised.
    """
    fp = _open(source)
    at = "" if isinstance(source, bytes) else f"{source}: "  # every detail names the file it came from
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "" if isinstance(source, bytes) else str(source)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_many_pixels", f"{at}{e}") from None
    except OSError as e:  # a directory, no permission
        raise ImageError("unreadable_file", f"{at}{type(e).__name__}: {e}") from None
    except Exception as e:  # a decoder's own error while reading the header (e.g. ValueError on a huge text chunk)
        raise ImageError("corrupt_image", f"{at}{type(e).__name__}: {e}") from None
    with img:
        if img.width * img.height > max_pixels:
            raise ImageError("too_many_pixels", f"{at}{img.width}x{img.height} > {max_pixels}")
        try:
            img.load()
            return ImageOps.exif_transpose(img)  # a new image, so it outlives the closed file
        except Exception as e:  # PIL reports bad data as OSError, SyntaxError, ValueError, zlib.error, ...
            raise ImageError("corrupt_image", f"{at}{type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB, with transparency composited onto `background`.

    A plain convert("RGB") would drop alpha and reveal whatever colour sits under transparent
    pixels (often black, sometimes garbage), would clip 16-bit images instead of scaling them, and
    would turn a float image in [0, 1] black. Per mode: 16-bit (and 32-bit integer within 0..65535)
    is divided by 257; float is scaled from [0, 1]. `background` is 8-bit RGB.

    Raises: ImageError ("unsupported_pixel_range") for 32-bit integers outside 0..65535 and for
    floats outside [0, 1] or not finite.
    """
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.int64)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):  # true 32-bit data: no agreed scale
            raise ImageError("unsupported_pixel_range", f"mode {img.mode} values {wide.min()}..{wide.max()}")
        img = Image.fromarray(np.rint(wide / 257).astype(np.uint8), "L")
    elif img.mode == "F":  # float greyscale: [0, 1] is the only convention to rely on
        x = np.asarray(img, dtype=np.float64)
        if not np.isfinite(x).all() or (x.size and (x.min() < 0 or x.max() > 1)):
            raise ImageError("unsupported_pixel_range", "float image with values outside [0, 1] (or NaN)")
        img = Image.fromarray(np.rint(x * 255).astype(np.uint8), "L")
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, (*background, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(source: bytes | str | Path, background: tuple[int, int, int] = (255, 255, 255),
             max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [H, W, 3] from encoded bytes or a path (H, W: the file's pixels, EXIF orientation applied).

    Raises: ImageError with a reason code (`decode`, `to_rgb`).
    """
    return np.asarray(to_rgb(decode(source, max_pixels), background))


def load_image(source: bytes | str | Path, size: int, background: tuple[int, int, int] = (255, 255, 255),
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 [size, size, 3] (size in pixels), exactly as ingest stores a training image: decode,
    composite alpha onto `background`, resize the shorter side, centre-crop.

    Raises: ImageError with a reason code (`decode`, `to_rgb`).
    """
    return preprocess(load_rgb(source, background, max_pixels), size)


def preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side resized to `size` pixels (bicubic,
    antialiased), then centre-cropped.

    Sizes and crop offsets follow torchvision's Resize(size) + CenterCrop(size) on PIL images, so
    the stored pixels equal CLIP's reference preprocessing before normalisation. Past an aspect ratio
    of STRIP_RATIO only the cropped region is resampled, so memory never grows with the aspect ratio.
    """
    h, w = rgb.shape[:2]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    if new_long > STRIP_RATIO * size:
        # A strip (say 1 x 1,000,000): resizing it whole would build a size x (size * aspect) image, gigabytes
        # for a file of a few hundred bytes. Resample only the source region under the centre crop instead,
        # with the same filter and scale: memory follows the output, pixels within a few levels of the full path.
        sx, sy = w / new_w, h / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC, box=box))
    img = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC)
    return np.asarray(img.crop((left, top, left + size, top + size)))
