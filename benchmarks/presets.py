"""What the GPU benchmarks train beside params.yaml's model, and the synthetic data they train on.

Presets override params.yaml's sections. `vitb32` and `vitb16` are CLIP's ViT-B/32 and ViT-B/16
(Radford et al. 2021, appendix: embed 512; vision width 768, 12 layers, 12 heads, patch 32 or 16,
224 px; text width 512, 12 layers, 8 heads, context 77, BPE vocabulary 49,408), with a random
resized crop of 0.9 to 1 of the area (aspect 3/4 to 4/3), open_clip's default training transform. The synthetic
captions train a much smaller BPE vocabulary than 49,408; the token embedding is sized at 49,408
all the same, so parameter counts and optimiser work match the real model (the embedding's FLOPs
are a lookup either way).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLIP_VOCAB = 49408
_VIT_B = {"vision": "vit", "embed_dim": 512, "vision_width": 768, "vision_layers": 12, "vision_heads": 12,
          "text_width": 512, "text_layers": 12, "text_heads": 8}
_224 = {"data": {"image_size": 224}, "tokenize": {"context_length": 77},
        "train": {"crop_scale": [0.9, 1.0], "crop_ratio": [0.75, 1.3333333333333333]}}
PRESETS: dict[str, dict] = {
    "default": {},  # params.yaml as it is: the tiny ResNet at 64 px
    "vitb32": {"model": {**_VIT_B, "vision_patch_size": 32}, **_224},
    "vitb16": {"model": {**_VIT_B, "vision_patch_size": 16}, **_224},
}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out.get(k) or {}, v) if isinstance(v, dict) else copy.deepcopy(v)
    return out


def preset_params(name: str, override: dict | None = None) -> dict:
    """params.yaml with preset `name` and then `override` merged in (nested dicts)."""
    return merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), PRESETS[name]), override or {})


def vocab_size(name: str, tokenizer_vocab: int) -> int:
    """The model's vocabulary: the tokenizer's, or CLIP's 49,408 for the ViT-B presets."""
    return tokenizer_vocab if name == "default" else max(tokenizer_vocab, CLIP_VOCAB)


def make_workspace(root: Path, params: dict, images: int) -> None:
    """Synthetic data in root/data by the real ingest and tokenize stages, at params' image size and
    context length: `images` scenes, 1% each for val and test. Ingest decodes on every core (speed only)."""
    params = merge(params, {"data": {"synthetic": {"num_images": images}, "val_fraction": 0.01,
                                     "test_fraction": 0.01, "workers": len(os.sched_getaffinity(0))}})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for stage in ("ingest", "tokenize"):
        subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def workspace(root: Path, params: dict, images: int) -> Path:
    """root/data made for these data and tokenize params and image count, reused when already there."""
    want = yaml.safe_dump({"data": params["data"], "tokenize": params["tokenize"], "images": images})
    stamp = root / "workspace.yaml"
    if not (stamp.exists() and stamp.read_text() == want and (root / "data" / "tokens.npy").exists()):
        make_workspace(root, params, images)
        stamp.write_text(want)
    return root / "data"
