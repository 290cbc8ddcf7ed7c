"""The CUDA path: the stages on a GPU under each precision, GPU checkpoints read back on the CPU,
and GPU features against CPU ones. Skipped without CUDA (CI has none); run on a GPU machine with
`pytest tests/test_cuda.py`."""
from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from clipmodel.model import CLIP, CLIPConfig
from conftest import ROOT, TINY, merge, run_stage, write_params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# The ResNet: channels-last convolutions, batch norm and the attention pool on the GPU.
RESNET = {"model": {"vision": "resnet", "embed_dim": 16, "vision_width": 8, "vision_layers": [1, 1, 1, 1],
                    "vision_heads": 4}, "data": {"image_size": 64}}


@pytest.fixture(scope="module")
def gpu_data(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gpu")
    write_params(workdir, merge(TINY, RESNET))
    run_stage(workdir, "ingest")
    run_stage(workdir, "tokenize")
    return workdir


@pytest.mark.parametrize("precision,ensemble", [("bf16", 1), ("fp16", 1), ("bf16", 2)])
def test_stages_on_cuda(gpu_data, tmp_path, precision, ensemble):
    shutil.copytree(gpu_data / "data", tmp_path / "data")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    write_params(tmp_path, merge(TINY, merge(RESNET, {"model": {"ensemble": ensemble},
                                                      "train": {"device": "cuda", "precision": precision, "epochs": 3}})))
    run_stage(tmp_path, "train")
    log = pd.read_csv(tmp_path / "reports/train_log.csv")
    assert log.loss.notna().all() and log.loss.iloc[-3:].mean() < log.loss.iloc[:3].mean()
    summary = json.loads((tmp_path / "reports/train.json").read_text())
    assert summary["peak_gpu_mb"] > 0
    run_id = json.loads((tmp_path / "reports/run.json").read_text())["run_id"]
    params = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.params
    assert params["precision_used"] == precision and params["device_used"] == torch.cuda.get_device_name()

    # the finished checkpoint (CUDA RNG state and, for fp16, the grad scaler) resumes on the GPU
    (tmp_path / "models/clip.safetensors").unlink()
    out = run_stage(tmp_path, "train")
    assert f"resuming at step {summary['steps']}/{summary['steps']}" in out.stdout

    run_stage(tmp_path, "supervised")
    run_stage(tmp_path, "evaluate")
    metrics = json.loads((tmp_path / "reports/metrics.json").read_text())
    assert 0 <= metrics["retrieval"]["image_to_text"]["r1"] <= 1 and "supervised" in metrics
    # the GPU-trained weights on the CPU: export loads them there and checks onnxruntime against torch
    run_stage(tmp_path, "export")
    assert json.loads((tmp_path / "reports/export.json").read_text())["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("vision", ["resnet", "vit"])
def test_cuda_features_match_cpu(vision):
    cfg = CLIPConfig(embed_dim=32, image_size=64, vision=vision, vision_width=16 if vision == "resnet" else 64,
                     vision_layers=(1, 1, 1, 1) if vision == "resnet" else 2, vision_heads=4, vision_patch_size=8,
                     vocab_size=100, context_length=32, text_width=64, text_heads=2, text_layers=2)
    torch.manual_seed(0)
    model = CLIP(cfg).eval()
    images = torch.randn(8, 3, 64, 64)
    # captions of 4..11 tokens trimmed to the longest, 11 columns: CUDA pads them to 16 (encode_text)
    length = torch.arange(4, 12)
    text = torch.randint(1, 98, (8, 11))
    text[torch.arange(8), length - 1] = 99  # the end-of-text token
    text[torch.arange(11) >= length[:, None]] = 0  # pad after it
    with torch.no_grad():
        cpu = [model.encode_image(images), model.encode_text(text)]
        model.cuda()
        gpu = [model.encode_image(images.cuda()).cpu(), model.encode_text(text.cuda()).cpu()]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = [model.encode_image(images.cuda()).float().cpu(), model.encode_text(text.cuda()).float().cpu()]
    for c, g, b in zip(cpu, gpu, bf16):
        assert F.cosine_similarity(c, g).min() > 0.9999  # cuDNN convolutions may use TF32
        assert F.cosine_similarity(c, b).min() > 0.99
