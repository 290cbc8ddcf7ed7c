"""Decoding and preprocessing: every mode lands as the RGB a person would see, bad files get a reason."""
from __future__ import annotations

import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from torchvision import transforms

from clipmodel.data import random_resized_crop
from clipmodel.images import ImageError, load_rgb, preprocess
from conftest_ingest_helpers import encode, noise, png_header, truncated

BG = (10, 200, 30)


def test_alpha_is_composited_onto_the_background_not_dropped():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 255, 0)      # transparent, with a loud colour hiding underneath
    rgba[0, 1] = (200, 100, 50, 255)   # opaque
    rgba[0, 2] = (250, 0, 0, 128)      # half transparent
    out = load_rgb(encode(Image.fromarray(rgba, "RGBA")), background=BG)
    assert tuple(out[0, 0]) == BG
    assert tuple(out[0, 1]) == (200, 100, 50)
    assert np.allclose(out[0, 2], [(250 + 10) / 2, 100, 15], atol=2)


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), BG])
def test_compositing_is_the_formula_the_model_card_gives(background):
    """MODEL.md tells other-language clients: out = round((c * a + bg * (255 - a)) / 255); every (c, a)."""
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, c, c, a], -1).astype(np.uint8)
    out = load_rgb(encode(Image.fromarray(rgba, "RGBA")), background=background)
    expected = np.rint((c[..., None] * a[..., None] + np.array(background) * (255 - a[..., None])) / 255)
    assert np.array_equal(out, expected.astype(np.uint8))


def test_la_and_palette_transparency_use_the_background():
    la = Image.fromarray(np.array([[[77, 0], [77, 255]]], dtype=np.uint8), "LA")
    assert load_rgb(encode(la), background=BG)[0].tolist() == [list(BG), [77, 77, 77]]

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    out = load_rgb(encode(pal, transparency=0), background=BG)
    assert out[0].tolist() == [list(BG), [255, 0, 0]]


def test_palette_grayscale_and_cmyk_become_rgb():
    rgb = np.asarray(noise(1, (8, 6)))
    pal = Image.fromarray(rgb).quantize(256)
    assert (load_rgb(encode(pal)) == np.asarray(pal.convert("RGB"))).all()

    gray = load_rgb(encode(Image.fromarray(rgb[..., 0], "L")))
    assert gray.shape == (6, 8, 3) and (gray == rgb[..., :1]).all()

    cyan = load_rgb(encode(Image.new("CMYK", (2, 2), (255, 0, 0, 0)), "TIFF"))
    assert cyan.dtype == np.uint8 and cyan[0, 0].tolist() == [0, 255, 255]


def test_sixteen_bit_is_scaled_not_clipped():
    wide = Image.fromarray(np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16))
    assert wide.mode == "I;16"
    out = load_rgb(encode(wide))
    assert out[0, :, 0].tolist() == [0, 100, 128, 255]
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (4, 2), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 2, 2))  # left half red
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = load_rgb(encode(img, exif=exif.tobytes()))
    assert out.shape == (4, 2, 3)
    assert out[0, 0, 0] == 255 and out[-1, 0, 2] == 255  # red on top, blue at the bottom


def text_bomb() -> bytes:
    """A 1 KB PNG whose compressed text chunk inflates past Pillow's limit: Image.open raises ValueError."""
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_file"),
    (text_bomb(), "corrupt_image"),  # a decoder error of a kind not listed anywhere: still one reason
    (truncated(encode(noise(0, (64, 64)))), "corrupt_image"),
    (truncated(encode(noise(0, (64, 64)), "JPEG")), "corrupt_image"),
    (b"GIF89a but not really", "not_an_image"),
    (b"hello, world", "not_an_image"),
])
def test_bad_bytes_have_a_reason(data, reason):
    with pytest.raises(ImageError) as e:
        load_rgb(data)
    assert e.value.reason == reason


def test_bad_paths_have_a_reason_and_name_the_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "cut.png").write_bytes(truncated(encode(noise(0, (64, 64)))))
    for name, reason in [("missing.png", "missing_file"), ("empty.jpg", "empty_file"), ("dir.png", "unreadable_file"),
                         ("cut.png", "corrupt_image")]:
        with pytest.raises(ImageError) as e:
            load_rgb(tmp_path / name)
        assert e.value.reason == reason and e.value.detail.startswith(str(tmp_path / name))
        assert e.value.naming(tmp_path / name) is e.value  # named once, not twice


def test_pixel_count_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageError) as e:
        load_rgb(png_header(5000, 5000), max_pixels=1_000_000)  # our limit; the body is garbage
    assert e.value.reason == "too_many_pixels"
    with pytest.raises(ImageError) as e:
        load_rgb(png_header(30_000, 30_000), max_pixels=10**12)  # PIL's own bomb limit still holds
    assert e.value.reason == "too_many_pixels"


def test_image_error_survives_pickling_between_processes():
    err = pickle.loads(pickle.dumps(ImageError("corrupt_image", "broken PNG")))
    assert (err.reason, err.detail, str(err)) == ("corrupt_image", "broken PNG", "corrupt_image: broken PNG")


@pytest.mark.parametrize("size", [(40, 23), (23, 40), (32, 32), (7, 9), (101, 64)])
def test_preprocess_matches_torchvision_resize_and_centre_crop(size):
    img = noise(3, size)
    expected = transforms.Compose([transforms.Resize(16, transforms.InterpolationMode.BICUBIC),
                                   transforms.CenterCrop(16)])(img)
    out = preprocess(np.asarray(img), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out == np.asarray(expected)).all()


def test_images_module_does_not_import_torch():
    code = "import sys, clipmodel.images; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_random_resized_crop_is_the_identity_only_without_crop():
    x = torch.rand(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop(x, (1, 1), (1, 1), g) is x
    y = random_resized_crop(x, (0.5, 0.8), (3 / 4, 4 / 3), g)
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_extreme_strip_costs_memory_of_the_output_not_of_its_aspect_ratio(tmp_path):
    """A 1 x 1,000,000 PNG (a few KB) would need gigabytes resized whole; under a 1.5 GB address-space
    limit it must still preprocess."""
    strip = tmp_path / "strip.png"
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), 1_000_000 // 256 + 1)[None, :1_000_000]).save(strip)
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000,) * 2)\n"
            "from clipmodel.images import load_image\n"
            f"x = load_image({str(strip)!r}, 64); assert x.shape == (64, 64, 3), x.shape; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_float_and_wide_integer_images_per_mode(tmp_path):
    """float32 in [0, 1] is scaled (not black); floats outside it and true 32-bit data are rejected."""
    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray(ramp, "F").save(tmp_path / "float.tiff")
    rgb = load_rgb(tmp_path / "float.tiff")
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and abs(int(rgb[24, 32, 0]) - 128) <= 2
    Image.fromarray(ramp * 1000, "F").save(tmp_path / "hdr.tiff")
    Image.fromarray(np.full((8, 8), 2 ** 20, np.int32), "I").save(tmp_path / "wide.tiff")
    for name in ("hdr.tiff", "wide.tiff"):
        with pytest.raises(ImageError, match="unsupported_pixel_range"):
            load_rgb(tmp_path / name)


def test_images_equal_only_after_resizing_are_not_duplicates(tmp_path):
    from pipeline.ingest import decode
    from pipeline.sources import Record
    board = (np.indices((128, 128)).sum(0) % 2 * 255).astype(np.uint8)  # 1-px checkerboard and its inverse:
    digests = []                                                          # both resize to flat grey
    for name, pixels in (("a.png", board), ("b.png", 255 - board)):
        Image.fromarray(pixels).save(tmp_path / name)
        out = decode(Record(name, name, name, tmp_path / name, ("x",)), 16, (255, 255, 255), 10 ** 8, False)
        digests.append(out[1])
        resized = out[0]
    assert digests[0] != digests[1] and np.ptp(resized) <= 2
