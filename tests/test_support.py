"""Support-set zero-shot (clipmodel.support): the support vectors, the class-vector sum, the file, and
both CLIs' --support-weight."""
from __future__ import annotations

import numpy as np
import pytest

from clipmodel.zeroshot import unit
from clipmodel.support import Support


def bank(weight: float = 1.0, temperature: float = 0.01, weights_sha256: str = "") -> Support:
    """Three images along the axes; image 0 has two captions, the others one each."""
    images = np.eye(3, 4, dtype=np.float32)
    captions = unit(np.array([[1, 0, 0, 0.1], [1, 0.1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], np.float32))
    return Support(images, captions, np.array([0, 0, 1, 2]), weight, temperature, weights_sha256)


def test_each_class_is_joined_by_the_images_of_its_nearest_captions():
    classes = unit(np.array([[1, 0, 0, 0], [0, 0.9, 0.1, 0], [0, 0, 0, 1]], np.float32))
    s = bank().vectors(classes)
    assert s.dtype == np.float32 and s.shape == (3, 4)
    np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1, atol=1e-6)
    assert s[0].argmax() == 0 and s[0, 0] > 0.999 and s[1].argmax() == 1  # sharp softmax: the nearest caption's image
    # far from every caption, the softmax spreads over them; captions of one image add up (image 0 has two)
    assert s[2, 0] > s[2, 1] > 0 and s[2, 1] == pytest.approx(s[2, 2], abs=1e-6)
    # a flat softmax is the caption-weighted mean of the images
    flat = bank(temperature=1e6).vectors(classes[:1])[0]
    np.testing.assert_allclose(flat, unit(np.array([2, 1, 1, 0], np.float32)), atol=1e-5)


def test_apply_adds_the_weighted_support_and_weight_zero_is_plain_zero_shot():
    classes = unit(np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32))
    assert bank(weight=0.0).apply(classes) is classes
    b = bank(weight=0.5)
    np.testing.assert_allclose(b.apply(classes), classes + 0.5 * b.vectors(classes), rtol=1e-6)
    assert b.with_weight(2.0).weight == 2.0 and b.weight == 0.5


def test_vectors_are_the_same_a_few_classes_at_a_time():
    rng = np.random.default_rng(1)
    images, captions = unit(rng.normal(size=(50, 8))).astype(np.float32), unit(rng.normal(size=(80, 8))).astype(np.float32)
    b = Support(images, captions, rng.integers(0, 50, 80), 1.0, 0.05)
    classes = unit(rng.normal(size=(37, 8))).astype(np.float32)
    np.testing.assert_allclose(b.vectors(classes, max_elements=100), b.vectors(classes), atol=1e-5)


def test_file_round_trip_and_errors(tmp_path):
    b = bank(weight=0.75, temperature=0.02)
    b.save(tmp_path / "support.safetensors")
    got = Support.find(tmp_path)
    assert (got.weight, got.temperature) == (0.75, 0.02)
    for name in ("images", "captions", "caption_image"):
        np.testing.assert_array_equal(getattr(got, name), getattr(b, name))
    assert Support.find(tmp_path / "nowhere") is None
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="bad.safetensors: not a support file"):
        Support.load(tmp_path / "bad.safetensors")


def test_a_bank_of_other_weights_is_not_used_and_says_so(tmp_path):
    from clipmodel.io import files_sha256

    (tmp_path / "clip.safetensors").write_bytes(b"these weights")
    bank(weights_sha256=files_sha256([tmp_path / "clip.safetensors"])).save(tmp_path / "support.safetensors")
    assert Support.find(tmp_path) is not None
    (tmp_path / "clip.safetensors").write_bytes(b"retrained weights")
    with pytest.warns(UserWarning, match="written for other weights"):
        assert Support.find(tmp_path) is None
    with pytest.raises(ValueError, match="another model"):
        bank().vectors(np.ones((2, 5), np.float32))


@pytest.mark.parametrize("change, message", [
    (dict(caption_image=np.array([0, 0, 1, 3])), "rows of the 3 images"),
    (dict(captions=np.ones((4, 5), np.float32)), "must be"),
    (dict(weight=-1.0), "weight"),
    (dict(temperature=0.0), "temperature"),
    (dict(weight=float("inf")), "finite"),
    (dict(temperature=float("nan")), "finite"),
])
def test_malformed_banks_are_refused(change, message):
    b = bank()
    fields = dict(images=b.images, captions=b.captions, caption_image=b.caption_image, weight=1.0, temperature=0.01)
    with pytest.raises(ValueError, match=message):
        Support(**{**fields, **change})


def test_the_bank_travels_with_the_model_into_both_clis_and_the_runtime(tmp_path):
    """A bank beside a model folder: export copies it and describes it, the runtime adds it to every
    class vector, and both CLIs score a set with it by default, alike, and without it at weight 0."""
    import json
    import subprocess
    import sys

    from PIL import Image

    from clipmodel.encoder import Encoder
    from clipmodel.zeroshot import class_vectors
    from clipmodel.export import export_onnx
    from clipmodel.runtime import ClipRuntime
    from clipmodel.support import SUPPORT_FILE
    from test_export import build_model_folder

    models = build_model_folder(tmp_path / "models", "resnet")
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    rows = []
    for name, rgb in colours.items():
        for i in range(3):
            Image.new("RGB", (30 + 5 * i, 32), rgb).save(tmp_path / f"{name}{i}.png")
            rows.append(f"{name}{i}.png,{name}")
    (tmp_path / "set.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    enc = Encoder.load(models)
    paths = [tmp_path / f"{name}{i}.png" for name in colours for i in range(3)]
    captions = [f"a {name} square" for name in colours for _ in range(3)]
    Support(enc.images(paths), enc.texts(captions), np.arange(9), 2.0, 0.05).save(models / SUPPORT_FILE)

    onnx = export_onnx(models, tmp_path / "onnx")
    pre = json.loads((onnx / "preprocess.json").read_text())
    assert pre["support"] == {"file": SUPPORT_FILE, "weight": 2.0, "temperature": 0.05, "images": 9, "captions": 9}
    assert SUPPORT_FILE in (onnx / "MODEL.md").read_text()
    rt = ClipRuntime.load(onnx, threads=1)
    plain = class_vectors(rt.encode_texts, list(colours), ["{}"])
    np.testing.assert_allclose(rt.class_embeddings(list(colours), ["{}"]), rt.support.apply(plain), rtol=1e-6)
    assert not np.allclose(rt.class_embeddings(list(colours), ["{}"]), plain)

    got = {}
    for cli, model in (("clipmodel.cli", models), ("clipmodel.runtime_cli", onnx)):
        for weight in (None, "0"):
            out = tmp_path / f"{cli}-{weight}.json"
            args = ["zeroshot", "--model", str(model), str(tmp_path / "set.csv"), "--json", str(out)]
            proc = subprocess.run([sys.executable, "-m", cli, *args, *(["--support-weight", weight] if weight else [])],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr
            got[cli, weight] = json.loads(out.read_text())["set"]["per_class_recall"]
    assert got["clipmodel.cli", None] == got["clipmodel.runtime_cli", None]
    assert got["clipmodel.cli", "0"] == got["clipmodel.runtime_cli", "0"]
    (models / SUPPORT_FILE).unlink()
    proc = subprocess.run([sys.executable, "-m", "clipmodel.cli", "classify", "--model", str(models), str(paths[0]),
                           "--labels", "red,blue", "--support-weight", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "has no support.safetensors" in proc.stderr.splitlines()[-1]
    for bad in ("-1", "nan", "inf"):
        proc = subprocess.run([sys.executable, "-m", "clipmodel.runtime_cli", "classify", "--model", str(onnx),
                               str(paths[0]), "--labels", "red,blue", "--support-weight", bad], capture_output=True,
                              text=True)
        assert proc.returncode == 2 and "must be a finite number >= 0" in proc.stderr.splitlines()[-1], bad
