"""The paper's bag-of-words baseline: predict which words a caption contains, not the caption.

CLIP's image encoder, then one linear layer giving a logit per vocabulary entry, trained with
binary cross-entropy against the caption's 0/1 word vector: word order is thrown away, which is
what made it learn zero-shot transfer 3x faster than a caption language model in the paper
(Figure 2). "Words" are the tokenizer's BPE tokens; on the synthetic captions these are whole words.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipmodel.checkpoint import load_state_dict_file
from clipmodel.model import CLIPConfig, vision_tower
from clipmodel.tokenizer import EOT_ID, PAD_ID, SOT_ID


class BagOfWords(nn.Module):
    """The paper's bag-of-words prediction baseline (Radford et al. 2021, sec. 2.3, Figure 2): CLIP's
    image encoder and one linear layer giving a logit per vocabulary entry."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = vision_tower(cfg)
        self.head = nn.Linear(cfg.embed_dim, cfg.vocab_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised pixels (data.to_tensor) -> float [B, vocab_size] word logits."""
        return self.head(self.visual(images))

    @classmethod
    def load(cls, folder: str | Path) -> tuple[BagOfWords, dict[str, Any]]:
        """The model (eval mode) and config.json of a bag-of-words folder written by the efficiency stage.

        Raises: FileNotFoundError when config.json or the weights file is missing; RuntimeError when
        the weights do not fit the config (strict load)."""
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        model = cls(CLIPConfig.from_dict(config["model"]))
        model.load_state_dict(load_state_dict_file(folder / config["weights"]), strict=True)
        return model.eval(), config


def bow_targets(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int [B, L] token ids (each < vocab_size) -> float32 [B, vocab_size] 0/1 on tokens' device: which
    words occur, ignoring PAD, SOT and EOT (every caption has them, so predicting them teaches nothing)."""
    out = torch.zeros(tokens.shape[0], vocab_size, device=tokens.device)
    out.scatter_(1, tokens.long(), 1.0)
    out[:, [PAD_ID, SOT_ID, EOT_ID]] = 0
    return out


def bow_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Scalar float32: binary cross-entropy of logits [B, vocab_size] against the words of tokens [B, L],
    summed over the vocabulary and averaged over captions, in nats per caption.
    (Averaging over the vocabulary too would shrink gradients 1/vocab and leave clipping idle.)"""
    targets = bow_targets(tokens, logits.shape[-1])
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum") / logits.shape[0]


def score_prompts(logits: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """float [B, vocab_size] word logits, int [P, L] prompt tokens -> float32 [B, P]: the mean
    log-probability (nats, <= 0) that each of a prompt's distinct words is in the image's caption.

    The mean, not the sum: class names tokenize to different numbers of words ("hexagon" vs "red
    circle"), and a sum charges every extra word a negative log-probability, so it would favour
    the shortest class names whatever the image. Independent Bernoullis define no distribution
    over word sets of different sizes that could settle this (unlike a captioner's sequence
    likelihood, which zero-shot sums), so the per-word geometric mean is the length-fair choice.
    """
    words = bow_targets(prompts, logits.shape[-1])  # [P, vocab]
    return F.logsigmoid(logits.float()) @ words.T / words.sum(1).clamp(min=1)
