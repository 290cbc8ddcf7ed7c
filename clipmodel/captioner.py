"""The paper's captioning baselines: CLIP's image encoder feeding a Transformer that writes the caption.

Two ways to give the decoder the image, sharing one decoder (CLIP's causal text Transformer,
sized by the config's text_* fields):
  decoder-only (`encoder_layers=0`): the pooled image feature, projected to the decoder width,
    is a pseudo-token at position 0 before the caption tokens;
  encoder-decoder (`encoder_layers>0`): the encoder's spatial grid (ResNet feature map or ViT
    patch tokens) plus 2-D positional embeddings goes through a Transformer encoder, and a
    cross-attention layer after every decoder block reads it.
Trained with next-token cross-entropy; zero-shot scores a class prompt by its log-likelihood
given the image, and `generate` writes captions by greedy or beam search.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipmodel.checkpoint import load_state_dict_file
from clipmodel.model import CLIPConfig, LayerNorm, Transformer, attention, vision_tower
from clipmodel.tokenizer import EOT_ID, PAD_ID, SOT_ID


class CrossAttention(nn.Module):
    """Pre-norm residual attention from the caption positions to the encoded image."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln = LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.kv_proj = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        nn.init.zeros_(self.out_proj.weight)  # starts as the identity, like the ResNet blocks
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Caption states [B, L, width] attending over memory [B, M, width] -> [B, L, width]."""
        B, L, D = x.shape
        q = self.q_proj(self.ln(x)).view(B, L, self.heads, -1).transpose(1, 2)
        k, v = self.kv_proj(memory).view(B, memory.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v)
        return x + self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class Captioner(nn.Module):
    """The paper's image-caption language model baseline (Radford et al. 2021, sec. 2.3, Figure 2, after
    VirTex, Desai & Johnson 2020): CLIP's image encoder conditioning a causal text Transformer.

    `encoder_layers=0` is decoder-only (the pooled image feature as a prefix token); more adds a
    Transformer encoder over the image grid and cross-attention in every decoder block.
    """

    def __init__(self, cfg: CLIPConfig, encoder_layers: int = 0):
        super().__init__()
        self.cfg, self.encoder_layers = cfg, encoder_layers
        width = cfg.text_width
        self.visual = vision_tower(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, width) * 0.01)
        self.transformer = Transformer(width, cfg.text_layers, cfg.text_heads, causal=True, quick_gelu=cfg.quick_gelu)
        self.ln_final = LayerNorm(width)
        self.head = nn.Linear(width, cfg.vocab_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        if encoder_layers == 0:
            self.image_proj = nn.Linear(cfg.embed_dim, width)
            return
        resnet = cfg.vision == "resnet"
        side = cfg.image_size // (32 if resnet else cfg.vision_patch_size)
        self.grid_proj = nn.Linear(cfg.vision_width * (32 if resnet else 1), width)
        self.row_embedding = nn.Parameter(torch.randn(side, width) * 0.01)  # 2-D: row + column embedding
        self.col_embedding = nn.Parameter(torch.randn(side, width) * 0.01)
        self.encoder = Transformer(width, encoder_layers, cfg.text_heads, causal=False, quick_gelu=cfg.quick_gelu)
        self.ln_memory = LayerNorm(width)
        self.cross = nn.ModuleList(CrossAttention(width, cfg.text_heads) for _ in range(cfg.text_layers))

    def memory(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised pixels (S = cfg.image_size) -> float [B, M, text_width]: what the
        decoder conditions on. M = 1 decoder-only, else the grid's cells ((S/32)**2 for a ResNet,
        (S/patch)**2 for a ViT)."""
        if self.encoder_layers == 0:
            return self.image_proj(self.visual(images))[:, None]
        x = self.grid_proj(self.visual.grid(images).flatten(2).transpose(1, 2))  # [B, H*W, width]
        x = x + (self.row_embedding[:, None] + self.col_embedding[None]).flatten(0, 1)
        return self.ln_memory(self.encoder(x))

    def logits(self, memory: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """float [B, T, vocab_size]: the next-token logits after each of tokens int [B, T] (causal),
        given memory [B, M, text_width] from `memory`. T <= context_length, and T < context_length
        decoder-only (the image takes position 0)."""
        x = self.token_embedding(tokens)
        if self.encoder_layers == 0:
            x = torch.cat([memory.to(x.dtype), x], 1) + self.positional_embedding[: x.shape[1] + 1]
            x = self.transformer(x)[:, 1:]
        else:
            x = x + self.positional_embedding[: x.shape[1]]
            for block, cross in zip(self.transformer.resblocks, self.cross):
                x = cross(block(x), memory)
        return self.head(self.ln_final(x))

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Scalar float32, nats per token: teacher-forced next-token cross-entropy of captions int [B, L]
        given images [B, 3, S, S], over the tokens after SOT (EOT included, so the model learns where
        to stop), PAD ignored."""
        tokens = trim(tokens)
        logits = self.logits(self.memory(images), tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD_ID)

    @torch.no_grad()
    def log_likelihood(self, images: torch.Tensor, prompts: torch.Tensor, max_pairs: int = 4096) -> torch.Tensor:
        """float32 [B, P], nats: log p(prompt | image) for images [B, 3, S, S] and prompts int [P, L],
        summed over each prompt's tokens after SOT, EOT included: a proper distribution over whole
        strings, so prompts of different lengths compare fairly. `max_pairs` bounds the image-prompt
        pairs per forward pass (memory)."""
        prompts = trim(prompts)
        memory = self.memory(images)
        target, real = prompts[:, 1:], (prompts[:, 1:] != PAD_ID).float()
        chunk = max(1, max_pairs // len(prompts))
        out = []
        for s in range(0, len(memory), chunk):
            m = memory[s:s + chunk]
            logp = self.logits(m.repeat_interleave(len(prompts), 0), prompts[:, :-1].repeat(len(m), 1))
            logp = logp.float().log_softmax(-1).view(len(m), len(prompts), target.shape[1], -1)
            out.append((logp.gather(-1, target.expand(len(m), -1, -1)[..., None])[..., 0] * real).sum(-1))
        return torch.cat(out)

    @torch.no_grad()
    def generate(self, images: torch.Tensor, max_len: int | None = None, beam: int = 1) -> torch.Tensor:
        """int64 [B, T], T <= max_len tokens (default and cap: context_length): SOT, the caption, EOT,
        then PAD, for images [B, 3, S, S]. beam=1 is greedy."""
        memory = self.memory(images)
        max_len = min(max_len or self.cfg.context_length, self.cfg.context_length)
        return beam_search(lambda rows, toks: self.logits(memory[rows], toks)[:, -1].float().log_softmax(-1),
                           len(memory), max_len, beam, device=memory.device)

    @classmethod
    def load(cls, folder: str | Path) -> tuple[Captioner, dict[str, Any]]:
        """The model (eval mode) and config.json of a captioner folder written by the efficiency stage
        (weights, config.json, tokenizer.json).

        Raises: SystemExit when config.json's objective is not a captioner's; FileNotFoundError when
        config.json or the weights file is missing; RuntimeError when the weights do not fit the config.
        """
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        if config.get("objective") not in ("decoder", "encoder_decoder"):
            raise SystemExit(f"clipmodel: {folder}/config.json: objective {config.get('objective')!r} is not a captioner")
        model = cls(CLIPConfig.from_dict(config["model"]), config["encoder_layers"])
        model.load_state_dict(load_state_dict_file(folder / config["weights"]), strict=True)
        return model.eval(), config


def trim(tokens: torch.Tensor) -> torch.Tensor:
    """int [B, L] -> [B, L'] (a view, L' >= min(2, L)): the all-PAD columns at the end dropped, as captions
    are much shorter than the context."""
    return tokens[:, : max(2, int((tokens != PAD_ID).sum(1).max()))]


def beam_search(next_logprobs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], n: int, max_len: int,
                beam: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The most likely token sequences (SOT ... EOT) under `next_logprobs`, for n items.

    next_logprobs(rows, tokens) -> [len(rows), vocab]: log-probabilities of the token that follows
    `tokens` [len(rows), t] for items `rows`. Keeps the `beam` best prefixes per item; a finished
    one (EOT emitted) carries its score unchanged and continues with PAD. Scores are plain sums
    of log-probabilities, the same quantity zero-shot ranks prompts by; beam=1 is greedy.
    Returns int64 [n, t] ids on `device`, t <= max_len, PAD after EOT where captions differ in length.
    """
    tokens = torch.full((n, 1, 1), SOT_ID, dtype=torch.long, device=device)  # [n, k, t]
    scores = torch.zeros(n, 1, device=device)
    for _ in range(max_len - 1):
        k, t = tokens.shape[1], tokens.shape[2]
        done = (tokens[..., -1] == EOT_ID) | (tokens[..., -1] == PAD_ID)
        if done.all():
            break
        rows = torch.arange(n, device=device).repeat_interleave(k)
        logp = next_logprobs(rows, tokens.view(n * k, t)).view(n, k, -1)
        logp = torch.where(done[..., None], torch.full_like(logp, float("-inf")), logp)
        logp[..., PAD_ID] = torch.where(done, 0.0, float("-inf"))  # finished prefixes only extend with PAD
        top = (scores[..., None] + logp).view(n, -1).topk(min(beam, logp.shape[1] * logp.shape[2]), dim=-1)
        parent, word = top.indices // logp.shape[2], top.indices % logp.shape[2]
        tokens = torch.cat([tokens.gather(1, parent[..., None].expand(-1, -1, t)), word[..., None]], -1)
        scores = top.values
    return trim(tokens[torch.arange(n, device=device), scores.argmax(1)])  # PAD columns of other beams dropped
