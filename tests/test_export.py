"""ONNX export of both towers (ViT and ResNet): graph validity, dynamic batch, parity with torch, int8."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL
import onnx
import onnxruntime
import pytest
import torch
from tokenizers import Tokenizer

from clipmodel.checkpoint import save_safetensors
from clipmodel.data import MEAN, STD
from clipmodel.export import batch_dependence, export_onnx, parity, quantize_int8
from clipmodel.model import CLIPConfig, build_model
from clipmodel.runtime import ClipRuntime
from clipmodel.tokenizer import encode, load_tokenizer, train_tokenizer

CAPTIONS = ["a large red circle on the left", "two blue squares and a yellow star",
            "a small green triangle near the top", "a purple heart at the bottom"] * 10
CONTEXT = 16
TEXT = dict(context_length=CONTEXT, text_width=32, text_heads=2, text_layers=1)
CONFIGS = {
    "vit": dict(embed_dim=16, image_size=32, vision="vit", vision_width=32, vision_layers=1, vision_heads=2,
                vision_patch_size=8, **TEXT),
    "resnet": dict(embed_dim=16, image_size=64, vision="resnet", vision_width=8, vision_layers=(1, 1, 1, 1),
                   vision_heads=4, **TEXT),
}
CONFIGS["ensemble"] = {**CONFIGS["resnet"], "ensemble": 2}


def build_model_folder(path: Path, config: str, background=(255, 255, 255), seed: int = 0) -> Path:
    """What the train stage writes, for a tiny randomly initialised model."""
    torch.manual_seed(seed)
    tok = train_tokenizer(CAPTIONS, vocab_size=300, context_length=CONTEXT)
    cfg = CLIPConfig(vocab_size=tok.get_vocab_size(), **CONFIGS[config])
    model = build_model(cfg)
    if cfg.vision == "resnet":  # give batch norm non-trivial statistics so the export has something to fold
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
    path.mkdir(parents=True)
    save_safetensors(model, path / "clip.safetensors")
    tok.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps({
        "model": cfg.to_dict(), "tokenizer": "tokenizer.json",
        "preprocess": {"image_size": cfg.image_size, "resize": "shorter_side_bicubic", "crop": "center",
                       "mean": list(MEAN), "std": list(STD), "background": list(background)},
        "data_fingerprint": "test",
    }))
    return path


@pytest.fixture(scope="module", params=["vit", "resnet", "ensemble"])
def exported(request, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    folder = build_model_folder(root / "models", request.param)
    (root / "onnx").mkdir()
    (root / "onnx" / "stale.txt").write_text("from an earlier export")  # must not survive the export
    return folder, export_onnx(folder, root / "onnx", example_batch=3, metrics={"zero_shot.shape.top1": 0.5},
                               evaluated_templates={"shape": ["a photo of a {}.", "a {} on a plain background"]})


def sample_inputs(folder: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    size = json.loads((folder / "config.json").read_text())["preprocess"]["image_size"]
    images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    texts = ["", "red " * 40] + [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(n - 2)]
    tokens, truncated = encode(load_tokenizer(folder / "tokenizer.json"), texts[:n])
    assert n < 2 or truncated[1]
    return images, tokens


def test_folder_contents_and_graphs(exported):
    folder, onnx_dir = exported
    assert sorted(p.name for p in onnx_dir.iterdir()) == [
        "MODEL.md", "image_encoder.onnx", "preprocess.json", "text_encoder.onnx", "tokenizer.json"]
    assert sorted(p.name for p in onnx_dir.parent.iterdir()) == ["models", "onnx"]  # no temporary left behind
    for name, input_name, dtype in (("image_encoder.onnx", "pixels", onnx.TensorProto.FLOAT),
                                    ("text_encoder.onnx", "tokens", onnx.TensorProto.INT64)):
        graph = onnx.load(onnx_dir / name).graph
        (inp,), (out,) = graph.input, graph.output
        assert inp.name == input_name and inp.type.tensor_type.elem_type == dtype
        assert out.name == "embedding"
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param  # symbolic batch
        if name == "text_encoder.onnx":
            assert dims[1].dim_param  # symbolic sequence: padding can be trimmed
        else:
            assert all(d.dim_value > 0 for d in dims[1:])
    pre = json.loads((onnx_dir / "preprocess.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    assert pre["mean"] == list(MEAN) and pre["std"] == list(STD)
    assert pre["image_size"] == cfg["preprocess"]["image_size"]
    assert (pre["context_length"], pre["pad_id"], pre["sot_id"], pre["eot_id"]) == (CONTEXT, 0, 1, 2)
    assert pre["embed_dim"] == 16 * cfg["model"]["ensemble"] and pre["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert pre["templates"] and pre["image_steps"] and pre["text_steps"]
    for name in ("image_encoder.onnx", "text_encoder.onnx"):  # the graphs carry the same facts
        props = {p.key: p.value for p in onnx.load(onnx_dir / name).metadata_props}
        # and nothing of the machine that exported them: no node notes naming source paths
        assert not any(n.metadata_props for n in onnx.load(onnx_dir / name).graph.node)
        assert str(Path(__file__).resolve().parents[1]).encode() not in (onnx_dir / name).read_bytes()
        assert json.loads(props["image_size"]) == pre["image_size"] and json.loads(props["mean"]) == pre["mean"]
        assert json.loads(props["templates"]) == pre["templates"]
        assert json.loads(props["evaluated_templates"]) == pre["evaluated_templates"]
    card = (onnx_dir / "MODEL.md").read_text()
    assert f"1 <= L <= {CONTEXT}" in card and "antialiased bicubic" in card and "logit_scale" in card
    # The metrics and the templates each was measured with, so a client can reproduce the figure.
    assert "- zero_shot.shape.top1: 0.5000" in card
    assert "- shape: ['a photo of a {}.', 'a {} on a plain background']" in card
    assert "new_long > 8 * S" in card and "Pillow >= 13.0" in card  # the resize is specified, not referenced
    assert "is the model's input as it is, so do not add SOT and EOT again" in card  # tokenizer.json wraps and pads
    assert f"Pillow {PIL.__version__}" in card
    # what runs the graphs: read from the files, not assumed from the opset asked for
    assert pre["onnx"] == {"ir_version": onnx.load(onnx_dir / "text_encoder.onnx").ir_version, "opsets": {"ai.onnx": 18},
                           "checked_with": f"onnxruntime {onnxruntime.__version__}"}
    assert f"- Format: ONNX IR version {pre['onnx']['ir_version']}, operator sets ai.onnx 18; checked" in card
    assert f"## Limitations\nThe encoders see {pre['image_size']}x{pre['image_size']} pixels" in card


def test_tokenizer_file_alone_never_makes_special_tokens(exported):
    """A client that loads tokenizer.json with plain `tokenizers` (encode_special_tokens left off, as in
    the npm ports) encodes exactly as training did, special-token text included."""
    folder, onnx_dir = exported
    texts = ["a <pad> b <end_of_text> c <start_of_text>", "<end_of_text>", "", "red " * 40, "日本 émoji"]
    plain = Tokenizer.from_file(str(onnx_dir / "tokenizer.json"))
    assert not plain.encode_special_tokens
    ours, _ = encode(load_tokenizer(folder / "tokenizer.json"), texts)
    assert np.array_equal(np.array([e.ids for e in plain.encode_batch(texts)]), ours)
    assert not np.isin(ours[:, 1:-1], [1]).any() and (ours[:, 0] == 1).all()


@pytest.mark.parametrize("batch", [1, 7])
def test_onnxruntime_matches_torch(exported, batch):
    folder, onnx_dir = exported
    images, tokens = sample_inputs(folder, batch, seed=batch)
    result = parity(folder, onnx_dir, images, tokens)
    assert result["max_abs_diff"] <= 1e-4 and result["min_cosine"] >= 0.99999, result
    rt = ClipRuntime.load(onnx_dir)  # trimmed pad columns (the runtime's path) change nothing
    full = rt.text.run(None, {"tokens": tokens.astype(np.int64)})[0]
    assert np.abs(rt.embed_tokens(tokens) - full).max() <= 1e-6


def test_int8_is_static_smaller_and_independent_of_the_batch(exported, tmp_path):
    folder, onnx_dir = exported
    calib_images, calib_tokens = sample_inputs(folder, 40, seed=1)
    sizes = quantize_int8(onnx_dir, tmp_path / "int8", calib_images, calib_tokens, batch_size=16)
    assert sizes["image_encoder_int8"] < sizes["image_encoder_fp32"]
    assert sizes["text_encoder_int8"] < sizes["text_encoder_fp32"]
    card = (tmp_path / "int8" / "MODEL.md").read_text()
    assert card.startswith((onnx_dir / "MODEL.md").read_text()) and "## Quantisation" in card and "40 training images" in card
    assert json.loads((tmp_path / "int8" / "preprocess.json").read_text())["onnx"]["opsets"] == {"ai.onnx": 18}  # QDQ only
    images, tokens = sample_inputs(folder, 32, seed=0)
    fp32, int8 = ClipRuntime.load(onnx_dir), ClipRuntime.load(tmp_path / "int8")
    ops = {n.op_type for n in onnx.load(tmp_path / "int8" / "image_encoder.onnx").graph.node}
    assert "QuantizeLinear" in ops and "DynamicQuantizeLinear" not in ops  # scales fixed at export
    for a, b in ((fp32.embed_pixels(images), int8.embed_pixels(images)),
                 (fp32.embed_tokens(tokens), int8.embed_tokens(tokens))):
        assert b.shape == a.shape and np.allclose(np.linalg.norm(b, axis=-1), 1, atol=1e-4)
        assert (a * b).sum(-1).min() > 0.9  # quantised, not broken
    # Batch 1 against batch 32 on the same inputs: equal (dynamic int8 differed, text cosine 0.9993).
    assert max(batch_dependence(int8, images, tokens).values()) <= 1e-6


def test_int8_needs_calibration_data(exported, tmp_path):
    _, onnx_dir = exported
    with pytest.raises(ValueError, match="calibration"):
        quantize_int8(onnx_dir, tmp_path / "int8", np.zeros((0, 8, 8, 3), np.uint8), np.zeros((0, 4), np.int64))
    assert not (tmp_path / "int8").exists()