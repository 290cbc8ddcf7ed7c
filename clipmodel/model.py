"""CLIP: an image encoder (ViT or modified ResNet) and a causal text Transformer, each with a linear
projection into one embedding space, trained so matching pairs have the highest cosine similarity.

Parameter names follow OpenAI's release (and open_clip, which kept them), so their state dicts load
with strict=True and ours load into theirs. Attention runs through scaled_dot_product_attention so
fused kernels are used where available; the text tower needs no mask tensor (is_causal).
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(kw_only=True)
class CLIPConfig:
    """Everything that fixes the architecture; `to_dict()` goes into models/config.json.

    image_size is in pixels (square), widths in channels, context_length in tokens.

    Raises: ValueError when the fields are inconsistent: a ViT without an int vision_layers and a
    vision_patch_size, a ResNet without four stage depths, an unknown `vision`, or a head count that
    does not divide its tower's width.
    """

    embed_dim: int
    image_size: int
    vision: Literal["vit", "resnet"]
    vision_width: int  # ViT width; for ResNet the stem width (stage i has width * 2**i * 4 channels)
    vision_layers: int | tuple[int, int, int, int]  # ViT depth, or the four ResNet stage depths
    vision_heads: int  # ViT heads; for ResNet the attention-pool heads (OpenAI: vision_width * 32 // 64)
    vision_patch_size: int | None = None  # ViT only
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    pad_id: int = 0  # the tokenizer pads after EOT with this id; the text feature is read at the last non-pad token
    quick_gelu: bool = False  # True only to reproduce OpenAI's checkpoints, which were trained with x*sigmoid(1.702x)
    init_logit_scale: float = math.log(1 / 0.07)  # SigLIP starts at log(10)
    init_logit_bias: float | None = None  # None: no bias parameter at all (softmax loss); SigLIP starts at -10
    ensemble: int = 1  # CLIPs of this architecture side by side (CLIPEnsemble); 1: one CLIP

    @property
    def output_dim(self) -> int:
        """Width of the model's embeddings: embed_dim, times the members of an ensemble."""
        return self.embed_dim * self.ensemble

    def __post_init__(self) -> None:
        if self.ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, not {self.ensemble}")
        if isinstance(self.vision_layers, list):  # JSON has no tuples
            self.vision_layers = tuple(self.vision_layers)
        if self.vision == "vit" and not (isinstance(self.vision_layers, int) and self.vision_patch_size):
            raise ValueError("a ViT needs an int vision_layers and a vision_patch_size")
        if self.vision == "resnet" and not (isinstance(self.vision_layers, tuple) and len(self.vision_layers) == 4):
            raise ValueError("a ResNet needs vision_layers as four stage depths")
        if self.vision not in ("vit", "resnet"):
            raise ValueError(f"vision must be 'vit' or 'resnet', not {self.vision!r}")
        vision_dim = self.vision_width * (32 if self.vision == "resnet" else 1)  # ResNet: the attention pool's width
        for name, width, heads in (("vision", vision_dim, self.vision_heads),
                                   ("text", self.text_width, self.text_heads)):
            if heads < 1 or width % heads:
                raise ValueError(f"{name}_heads={heads} must be >= 1 and divide the width {width}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (json writes vision_layers' tuple as a list; `from_dict` restores it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        """The inverse of `to_dict`, e.g. from config.json.

        Raises: TypeError for a missing or unknown field; ValueError as the constructor.
        """
        return cls(**d)


class LayerNorm(nn.LayerNorm):
    """Normalises in fp32 and casts back: CPU autocast would otherwise run it in bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., width] -> same shape and dtype as x."""
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU (Hendrycks & Gimpel 2016, sec. 2) that OpenAI's checkpoints
    were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise x * sigmoid(1.702 x): any shape, same dtype."""
        return x * torch.sigmoid(1.702 * x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """q [B, heads, Lq, head_dim], k and v [B, heads, Lk, head_dim] -> [B, heads, Lq, head_dim].

    scaled_dot_product_attention (softmax(q k^T / sqrt(head_dim)) v, Vaswani et al. 2017), in fp32
    under CPU autocast: torch 2.14's bf16 flash-attention backward on CPU is ~15x slower than its fp32
    one (measured at L=32), which would cost the bf16 text tower more than its bf16 matmuls save. On
    CUDA the bf16 kernels are the fast ones."""
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    with torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal).to(q.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter layout (packed q/k/v)."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, L, width]; position i attends only to positions <= i when causal."""
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        x = attention(q, k, v, self.causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm Transformer block (attention, then a 4x-wide MLP, each on a residual branch): GPT-2's
    layout (Radford et al. 2019), which CLIP's text tower uses (Radford et al. 2021, sec. 2.4), with
    OpenAI's parameter names. Causal for the text tower."""

    def __init__(self, width: int, heads: int, causal: bool, quick_gelu: bool):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads, causal)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, L, width]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Pre-norm blocks, initialised as in CLIP: the residual-branch outputs shrink with depth so the
    residual stream's variance stays bounded however many layers there are."""

    def __init__(self, width: int, layers: int, heads: int, causal: bool, quick_gelu: bool):
        super().__init__()
        self.grad_checkpointing = False  # recompute block activations in backward: memory for compute
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, causal, quick_gelu) for _ in range(layers))
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, L, width]; blocks recomputed in backward when grad_checkpointing is set."""
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) as CLIP has it: patch embedding without bias, a class token, learned
    positional embeddings, and an extra LayerNorm (ln_pre) before the Transformer (Radford et al. 2021,
    sec. 2.4). Inputs must be image_size x image_size pixels (the positional embeddings fix the grid)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 quick_gelu: bool):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, causal=False, quick_gelu=quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised pixels -> [B, 1 + grid*grid, width] (grid = S / patch_size): the
        class token then the patch tokens, before ln_post."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised pixels -> [B, output_dim]: the projected class token."""
        return self.ln_post(self.tokens(x)[:, 0]) @ self.proj

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] -> [B, width, grid, grid]: the patch tokens after ln_post, for decoders that
        attend over space."""
        x = self.ln_post(self.tokens(x)[:, 1:])
        side = round(x.shape[1] ** 0.5)
        return x.transpose(1, 2).reshape(x.shape[0], -1, side, side)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d that normalises a channels-last CPU map in NCHW when its channel count is not a
    multiple of 16: torch 2.14's channels-last CPU kernel is then several times slower (forward and
    backward at [128, 8, 32, 32]: 14.5 ms against 1.1 ms in bf16, 2 Xeon cores), far more than the
    layout copy costs. The default ResNet's stem has 8 channels (docs/performance.md)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        if x.is_cpu and x.shape[1] % 16 and x.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()
        return super().forward(x)


class Bottleneck(nn.Module):
    """ResNet bottleneck that downsamples by average pooling before a stride-1 convolution:
    strided convolutions alias, pooling first is a cheap low-pass filter (Zhang 2019's rect-2 blur
    pooling; the shortcut pools too, as in ResNet-D, He et al. 2019; Radford et al. 2021 sec. 2.4)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = BatchNorm2d(out)
        nn.init.zeros_(self.bn3.weight)  # each block starts as the identity
        self.downsample = None
        if stride > 1 or inplanes != out:
            # "-1" holds no parameters, so the conv and BN keep the reference's names downsample.0 / .1
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, inplanes, H, W] -> [B, 4 * planes, H / stride, W / stride]."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """Pools the final feature map with one attention layer whose query is the mean feature
    (Radford et al. 2021, sec. 2.4): only that query's output is used, so only it is computed."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid ** 2 + 1, width) / width ** 0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(proj.weight, std=width ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, width, grid, grid] feature map -> [B, output_dim]."""
        x = x.flatten(2).transpose(1, 2)  # [B, H*W, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        B, L, C = x.shape
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.heads, -1).transpose(1, 2)
        x = attention(q, k, v)  # [B, heads, 1, head_dim]
        return self.c_proj(x.reshape(B, C))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet (Radford et al. 2021, sec. 2.4): a 3-convolution stem with average pooling,
    anti-aliased bottlenecks and an attention pool instead of global average pooling. Total stride 32;
    inputs must be image_size x image_size pixels (the attention pool's positional embedding fixes the grid)."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, image_size: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, depth in enumerate(layers):
            planes = width * 2 ** i
            blocks = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(1, depth)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes * Bottleneck.expansion
        self.attnpool = AttentionPool2d(image_size // 32, inplanes, heads, output_dim)
        self.to(memory_format=torch.channels_last)  # the kernels too, so no convolution reorders them per call

    def grid(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, H, W] normalised pixels -> [B, width * 32, H / 32, W / 32], channels-last: the last
        stage's map, before attention pooling.

        Channels-last: the ResNet's training step is 1.3x (fp32) to 1.8x (bf16) faster on it on this CPU
        (oneDNN), and it is the layout CUDA's tensor-core convolutions want."""
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised pixels -> [B, output_dim]."""
        return self.attnpool(self.grid(x))


def vision_tower(cfg: CLIPConfig) -> nn.Module:
    """The image encoder alone: CLIP's, and the supervised and captioning baselines' (same architecture).
    Maps float [B, 3, S, S] normalised pixels (S = cfg.image_size) to [B, cfg.embed_dim]."""
    if cfg.vision == "vit":
        return VisionTransformer(cfg.image_size, cfg.vision_patch_size, cfg.vision_width, cfg.vision_layers,
                                 cfg.vision_heads, cfg.embed_dim, cfg.quick_gelu)
    return ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_heads, cfg.image_size, cfg.vision_width)


class CLIP(nn.Module):
    """The two towers plus the learned temperature (and SigLIP's bias, when configured); Radford et al.
    2021, sec. 2.4 and Figure 3.

    The text tower lives at the top level rather than in a submodule only so that state-dict keys
    match OpenAI's (`token_embedding`, `transformer.resblocks.N`, `ln_final`, `text_projection`).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        if cfg.ensemble != 1:
            raise ValueError(f"CLIP is one model; build_model(cfg) makes an ensemble of {cfg.ensemble}")
        self.cfg = cfg
        self.visual = vision_tower(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, causal=True,
                                       quick_gelu=cfg.quick_gelu)
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.tensor(cfg.init_logit_bias))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.text_width ** -0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised pixels -> [B, embed_dim] projected, un-normalised features."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """int [B, L] token ids (L <= context_length) -> [B, embed_dim] projected, un-normalised features.

        The feature is read at EOT, the last non-pad token. Counting non-pad tokens (in int32) rather
        than taking argmax over ids works for any tokenizer that pads after EOT and exports to ONNX,
        where onnxruntime has no ArgMax over int64; for OpenAI's tokens it picks the same position.

        On CUDA, L is padded up to a multiple of 8: cuDNN's attention builds an execution plan for
        every new sequence length, 40-76 ms of host time each on an H200
        (reports/benchmarks/profile_cuda_default.json), and captions trimmed to each batch's longest
        would meet a new length every few steps. Exact, as trimming is: pads come after EOT.
        """
        if tokens.is_cuda and (pad := min(-tokens.shape[1] % 8, self.cfg.context_length - tokens.shape[1])):
            tokens = F.pad(tokens, (0, pad), value=self.cfg.pad_id)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x))
        eot = ((tokens != self.cfg.pad_id).sum(dim=-1, dtype=torch.int32) - 1).long()  # ONNX GatherND: int64 only
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features [B, embed_dim], text features [B, embed_dim]) L2-normalised, and
        exp(logit_scale) as a 0-d tensor: open_clip's contract."""
        image = F.normalize(self.encode_image(images), dim=-1)
        text = F.normalize(self.encode_text(tokens), dim=-1)
        return image, text, self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep exp(logit_scale) in [1, 100] (the paper's cap, Radford et al. 2021 sec. 2.5); call after
        every optimiser step."""
        self.logit_scale.clamp_(0, math.log(100))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute Transformer blocks in backward (text tower, and a ViT image tower): activation
        memory for compute. A ResNet image tower is unaffected."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable


class CLIPEnsemble(nn.Module):
    """`cfg.ensemble` CLIPs, each initialised on its own, side by side: a deep ensemble
    (Lakshminarayanan et al. 2017), with the CLIP interface.

    An embedding is the members' L2-normalised embeddings concatenated and divided by sqrt(k): it is
    unit-length, and the cosine similarity of two is the mean of the members' cosines, so zero-shot
    classification, retrieval and the exported ONNX graphs rank by the members' mean similarity with
    no change downstream. Training gives each member its own loss and temperature on its slice of
    the features (pipeline.objectives.clip_loss): each learns as it would alone, on the same batches.
    On real captions three members raise held-out top-1 where wider or deeper towers with as many
    parameters do not (docs/real-data.md).
    """

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(CLIP(dataclasses.replace(cfg, ensemble=1)) for _ in range(cfg.ensemble))

    @property
    def logit_scale(self) -> torch.Tensor:
        """[k] the members' log temperatures."""
        return torch.stack([m.logit_scale for m in self.members])

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """[k] the members' SigLIP biases, or None (softmax loss)."""
        return None if self.cfg.init_logit_bias is None else torch.stack([m.logit_bias for m in self.members])

    def _joined(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([F.normalize(f, dim=-1) for f in features], -1) / len(features) ** 0.5

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """float [B, 3, S, S] normalised pixels -> [B, k * embed_dim], L2-normalised."""
        return self._joined([m.encode_image(images) for m in self.members])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """int [B, L] token ids -> [B, k * embed_dim], L2-normalised."""
        return self._joined([m.encode_text(tokens) for m in self.members])

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features) [B, k * embed_dim] L2-normalised, and the members'
        exp(logit_scale) [k]."""
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        for m in self.members:
            m.clamp_logit_scale_()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for m in self.members:
            m.set_grad_checkpointing(enable)


def build_model(cfg: CLIPConfig) -> CLIP | CLIPEnsemble:
    """The model `cfg` describes: one CLIP, or an ensemble when cfg.ensemble > 1."""
    return CLIPEnsemble(cfg) if cfg.ensemble > 1 else CLIP(cfg)


def param_groups(model: nn.Module, weight_decay: float, vision_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups for any of our models. Decay only on matrices and kernels: decaying gains, biases,
    embeddings or the temperature just pulls them toward zero with no regularising benefit.

    `vision_lr` gives the image towers (the modules named `visual`, one per ensemble member) their own
    peak learning rate: the BatchNorm ResNet learns shape several times faster at a rate the text
    Transformer and the temperature do not tolerate (docs/experiments.md)."""
    towers = [m for name, m in model.named_modules() if vision_lr is not None and name.split(".")[-1] == "visual"]
    visual = {id(p) for tower in towers for p in tower.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(v, d): [] for v in (False, True) for d in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[id(p) in visual, not (p.ndim < 2 or "embedding" in name)].append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, **({"lr": vision_lr} if vis else {})}
            for (vis, decay), params in groups.items() if params]
