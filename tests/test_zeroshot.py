"""Zero-shot maths (prompt ensembling, normalisation, top-k) and the `clipmodel` CLI."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipmodel.templates import load_templates
from clipmodel.zeroshot import class_vectors, classify
from test_export import build_model_folder


def test_ensemble_normalises_each_prompt_then_averages_then_renormalises():
    vectors = {"a cat": [3.0, 0.0], "the cat": [0.0, 1.0], "a dog": [0.0, -2.0], "the dog": [0.0, -5.0]}
    emb = class_vectors(lambda texts: np.array([vectors[t] for t in texts]), ["cat", "dog"], ["a {}", "the {}"])
    # cat: mean of (1,0) and (0,1) = (0.5,0.5) -> (0.7071, 0.7071); unnormalised averaging would tilt to (3,1)
    assert emb.dtype == np.float32 and np.allclose(emb, [[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]], atol=1e-6)
    # a few classes per text batch (batch_prompts) gives the same vectors
    assert np.array_equal(class_vectors(lambda texts: np.array([vectors[t] for t in texts]), ["cat", "dog"],
                                        ["a {}", "the {}"], batch_prompts=2), emb)


def test_classify_topk_and_softmax_probabilities():
    classes = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    images = torch.tensor([[2.0, 0.1], [0.1, -3.0]])
    top, probs = classify(images.numpy(), classes.numpy(), logit_scale=10.0, k=2)
    reference = (10 * F.normalize(images, dim=-1) @ classes.T).softmax(-1).topk(2)  # torch as the reference
    assert top.tolist() == reference.indices.tolist() and np.allclose(probs, reference.values.numpy(), atol=1e-6)
    p0 = 1 / (1 + np.exp(-10 * 2 ** -0.5))  # two classes: softmax of logits (10 * 0.7071, 10 * 0)
    assert np.allclose(classify(np.array([[2.0, 0.0]]), np.array([[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]]), 10.0)[1],
                       [[p0, 1 - p0]])
    assert top.shape == (2, 2) and classify(images.numpy(), classes.numpy(), 1.0, k=10)[0].shape == (2, 3)


def test_templates_file_validation(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("# comment\na photo of a {}.\n\nthere is a {}\n")
    assert load_templates(str(good)) == ["a photo of a {}.", "there is a {}"]
    good.write_text("\ufeffa photo of a {}.\r\n", encoding="utf-8")  # a byte-order mark, as Windows editors save
    assert load_templates(str(good)) == ["a photo of a {}."]
    bad = tmp_path / "bad.txt"
    bad.write_text("no slot here\n")
    with pytest.raises(ValueError, match="bad.txt"):
        load_templates(str(bad))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("cli") / "models", "vit")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clipmodel.cli", *args], capture_output=True, text=True)


def test_cli_classify_prints_topk_with_probabilities(model_dir, tmp_path):
    img = tmp_path / "red.png"
    Image.new("RGBA", (40, 30), (220, 30, 30, 255)).save(img)
    out = run_cli("classify", "--model", str(model_dir), str(img), "--labels", "red circle, blue square,green star",
                  "--top", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == str(img) and len(lines) == 3
    probs = [float(line.split()[0]) for line in lines[1:]]  # fractions, as clip-onnx prints them
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
    assert {line.split(maxsplit=1)[1] for line in lines[1:]} <= {"red circle", "blue square", "green star"}


def test_cli_embed_writes_normalised_npy_and_names_bad_files(model_dir, tmp_path):
    out_file = tmp_path / "text.npy"
    out = run_cli("embed", "--model", str(model_dir), "--texts", "a red circle", "a blue star", "--out", str(out_file))
    assert out.returncode == 0, out.stderr
    emb = np.load(out_file)
    assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = run_cli("embed", "--model", str(model_dir), "--images", str(broken), "--out", str(tmp_path / "x.npy"))
    assert out.returncode != 0 and "broken.png" in out.stderr and "Traceback" not in out.stderr
    truncated = tmp_path / "truncated.png"  # the decoder's own message does not name the file: the CLI must
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[:-200])
    good = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 30)).save(good)
    out = run_cli("classify", "--model", str(model_dir), str(truncated), str(good), "--labels", "red,blue")
    assert out.returncode == 1 and "Traceback" not in out.stderr  # the readable image is still classified
    assert out.stdout.splitlines()[0] == str(good) and len(out.stdout.splitlines()) == 3
    assert out.stderr.splitlines() == [f"clipmodel classify: skipped corrupt_image: {truncated}: OSError: image file is truncated",
                                       "clipmodel classify: 1 of 2 images could not be read (skipped above)"]


@pytest.mark.parametrize("text, ok", [("a photo of a {}.", True), ("{}", True), ("a {x} of {}", False),
                                      ("{0} and {}", False), ("a { of {}", False), ("no field", False),
                                      ("{} and {}", False), ("{!r}", False)])
def test_a_template_is_exactly_one_plain_field(text, ok):
    from clipmodel.templates import is_template
    assert is_template(text) is ok


def test_cli_usage_errors_are_argparse_lines_with_exit_2(model_dir, tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    (tmp_path / "bad.txt").write_text("a {x} of {}\n")
    for args, message in [(("classify", "--model", str(model_dir), str(image), "--labels", "a", "--top", "0"), "--top"),
                          (("classify", "--model", str(model_dir), str(image), "--labels", "a",
                            "--templates", str(tmp_path / "bad.txt")), "--templates"),
                          (("classify", "--model", str(model_dir), str(image), "--labels", "a",
                            "--templates", str(tmp_path / "missing.txt")), "--templates"),
                          (("embed", "--model", str(model_dir), "--texts", "a", "--out", str(tmp_path / "emb")), ".npy")]:
        out = run_cli(*args)
        assert out.returncode == 2 and message in out.stderr.splitlines()[-1] and "Traceback" not in out.stderr, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "bad.txt"]  # no stray temporary
    for folder, message in ((tmp_path / "nope", f"model folder {tmp_path / 'nope'} not found"),
                            (tmp_path, f"{tmp_path} has no config.json: not a model folder")):
        out = run_cli("classify", "--model", str(folder), str(image), "--labels", "a")
        assert out.returncode == 1 and out.stderr.strip() == f"clipmodel: {message}", out.stderr
