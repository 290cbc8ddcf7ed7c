"""Reading CLIP weights from disk (ours, open_clip's, OpenAI's layout) and writing ours.

Loading never unpickles arbitrary objects: safetensors, or torch.load with weights_only=True.
"""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clipmodel.io import atomic_path
from clipmodel.model import CLIP, CLIPConfig, CLIPEnsemble, build_model

# Attributes OpenAI's TorchScript models carry in their state dict; they are config, not weights.
_NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat CPU state dict (tensors in their stored dtypes) from .safetensors or a .pt/.pth/.bin pickle
    (a training checkpoint's `state_dict` entry is unwrapped and DataParallel/DDP `module.` prefixes
    are stripped).

    Raises: FileNotFoundError when `path` is missing; ValueError for a TorchScript archive;
    pickle.UnpicklingError for a pickle holding more than tensors and plain containers (weights_only).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        sd = load_file(path)
    else:
        if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
            raise ValueError(
                f"{path} is a TorchScript archive (OpenAI's original release format), which cannot be read "
                "without running its code. If you trust it, convert it once: safetensors.torch.save_file("
                "torch.jit.load(path, map_location='cpu').state_dict(), 'clip.safetensors')")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd)
    return {k.removeprefix("module."): v for k, v in sd.items() if k not in _NOT_WEIGHTS}


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct indices N in keys matching `pattern` (a regex with one group for N)."""
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def config_from_state_dict(sd: dict[str, torch.Tensor], **overrides: Any) -> CLIPConfig:
    """Infer the architecture of an OpenAI/open_clip-layout state dict.

    Head counts are not stored in the weights; this assumes CLIP's 64-wide heads (for ResNets the
    attention pool has vision_width * 32 // 64). Activation is not stored either: pass
    quick_gelu=True for OpenAI's checkpoints. Any field can be overridden by keyword.

    Raises: KeyError when `sd` lacks a key of that layout (e.g. ln_final.weight); TypeError for an
    override that is not a CLIPConfig field; ValueError when the result is inconsistent (CLIPConfig).
    """
    text_width = sd["ln_final.weight"].shape[0]
    cfg: dict[str, Any] = dict(
        embed_dim=sd["text_projection"].shape[1],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=text_width // 64,
        text_layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
        init_logit_bias=float(sd["logit_bias"]) if "logit_bias" in sd else None,
    )
    if "visual.proj" in sd:
        width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        cfg.update(vision="vit", vision_width=width, vision_heads=width // 64, vision_patch_size=patch,
                   vision_layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."), image_size=grid * patch)
    else:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        cfg.update(vision="resnet", vision_width=width, vision_heads=width * 32 // 64, image_size=grid * 32,
                   vision_layers=tuple(_count(sd, rf"visual\.layer{i}\.(\d+)\.") for i in range(1, 5)))
    return CLIPConfig(**{**cfg, **overrides})


def save_safetensors(model: nn.Module, path: str | Path) -> None:
    """Write the state dict to `path` atomically, on CPU, dtypes kept. safetensors refuses tensors that
    share storage or are views into a larger one, so those are copied out; everything else is written
    without a copy."""
    state, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        storage = v.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != v.nbytes:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        state[k] = v
    with atomic_path(path) as tmp:
        save_file(state, str(tmp))


def load_model(folder: str | Path) -> tuple[CLIP | CLIPEnsemble, dict[str, Any]]:
    """The model a train stage wrote (strictly loaded, eval mode, on CPU) and its config.json.

    Raises: FileNotFoundError when config.json or clip.safetensors is missing; RuntimeError when the
    weights do not fit the config.
    """
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = build_model(CLIPConfig.from_dict(config["model"]))
    model.load_state_dict(load_state_dict_file(folder / "clip.safetensors"), strict=True)
    return model.eval(), config
