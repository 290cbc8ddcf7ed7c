"""The model against open_clip (random weights, both directions), init, optimiser groups, checkpoints."""
from __future__ import annotations

import json
import math

import pytest
import torch

from clipmodel.checkpoint import config_from_state_dict, load_model, load_state_dict_file, save_safetensors
from clipmodel.model import CLIP, CLIPConfig, CLIPEnsemble, attention, build_model, param_groups

open_clip_model = pytest.importorskip("open_clip.model")

VOCAB, CONTEXT = 100, 16
TEXT = dict(context_length=CONTEXT, vocab_size=VOCAB, text_width=64, text_heads=2, text_layers=2)
VIT = CLIPConfig(embed_dim=32, image_size=32, vision="vit", vision_width=64, vision_layers=2, vision_heads=2,
                 vision_patch_size=8, **TEXT)
# open_clip gives the ResNet attention pool width * 32 // 64 heads: 16 * 32 // 64 = 8
RESNET = CLIPConfig(embed_dim=32, image_size=64, vision="resnet", vision_width=16, vision_layers=(1, 2, 1, 1),
                    vision_heads=8, **TEXT)


def open_clip_twin(cfg: CLIPConfig):
    vision = open_clip_model.CLIPVisionCfg(
        layers=cfg.vision_layers, width=cfg.vision_width, image_size=cfg.image_size,
        head_width=64 if cfg.vision == "resnet" else cfg.vision_width // cfg.vision_heads,
        patch_size=cfg.vision_patch_size or 16)
    text = open_clip_model.CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                       width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers)
    return open_clip_model.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=cfg.quick_gelu,
                                init_logit_bias=cfg.init_logit_bias)


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    """SOT, random ids, EOT (the largest id, so argmax finds it), then pad 0; lengths vary."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(n, CONTEXT, dtype=torch.long)
    for i in range(n):
        length = int(torch.randint(2, CONTEXT + 1, (1,), generator=g))
        out[i, 0], out[i, length - 1] = VOCAB - 2, VOCAB - 1
        out[i, 1:length - 1] = torch.randint(1, VOCAB - 2, (length - 2,), generator=g)
    return out


def assert_same_features(ours: CLIP, theirs, cfg: CLIPConfig) -> None:
    ours, theirs = ours.double().eval(), theirs.double().eval()
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    text = tokens(5)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images.double()), theirs.encode_image(images.double()),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(text), theirs.encode_text(text), rtol=0, atol=1e-5)


def randomise_batchnorm(model: torch.nn.Module) -> None:
    """Fresh BatchNorms are the identity in eval and bn3 gains are zero: give them values that matter."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.weight.data, m.bias.data, m.running_mean):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("cfg", [VIT, CLIPConfig(**{**VIT.to_dict(), "quick_gelu": True}), RESNET],
                         ids=["vit", "vit-quickgelu", "resnet"])
def test_open_clip_state_dict_loads_strictly_and_gives_same_features(cfg):
    torch.manual_seed(0)
    theirs = open_clip_twin(cfg)
    randomise_batchnorm(theirs)
    ours = CLIP(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert_same_features(ours, theirs, cfg)


@pytest.mark.parametrize("cfg", [VIT, RESNET], ids=["vit", "resnet"])
def test_open_clip_loads_ours_strictly(cfg):
    torch.manual_seed(0)
    ours = CLIP(cfg)
    randomise_batchnorm(ours)
    theirs = open_clip_twin(cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert_same_features(ours, theirs, cfg)


def test_forward_contract_matches_open_clip():
    torch.manual_seed(0)
    ours = CLIP(VIT).eval()
    theirs = open_clip_twin(VIT).eval()
    theirs.load_state_dict(ours.state_dict())
    images, text = torch.randn(2, 3, 32, 32), tokens(2)
    with torch.no_grad():
        for a, b in zip(ours(images, text), theirs(images, text), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_logit_bias_only_when_configured():
    assert "logit_bias" not in CLIP(VIT).state_dict() and CLIP(VIT).logit_bias is None
    cfg = CLIPConfig(**{**VIT.to_dict(), "init_logit_bias": -10.0, "init_logit_scale": math.log(10)})
    model = CLIP(cfg)
    assert model.logit_bias.item() == -10.0 and model.logit_scale.exp().item() == pytest.approx(10)
    open_clip_twin(cfg).load_state_dict(model.state_dict(), strict=True)


def test_pooling_reads_last_non_pad_token_not_largest_id():
    """Our tokenizer's EOT is not the largest id: the feature must come from the last real token."""
    torch.manual_seed(0)
    model = CLIP(VIT).eval()
    text = torch.tensor([[1, 50, 60, 2, 0, 0, 0, 0]])
    with torch.no_grad():
        full = model.ln_final(model.transformer(model.token_embedding(text) + model.positional_embedding[:8]))
        torch.testing.assert_close(model.encode_text(text), full[:, 3] @ model.text_projection)
        torch.testing.assert_close(model.encode_text(text[:, :4]), model.encode_text(text))  # causal: pads are unseen


def test_init_statistics():
    torch.manual_seed(0)
    cfg = CLIPConfig(**{**VIT.to_dict(), "text_width": 256, "text_heads": 4, "text_layers": 4, "vocab_size": 1000,
                        "vision_width": 256})
    m = CLIP(cfg)
    w, layers = cfg.text_width, cfg.text_layers
    block = m.transformer.resblocks[0]
    expected = {
        m.token_embedding.weight: 0.02, m.positional_embedding: 0.01, m.text_projection: w ** -0.5,
        block.attn.in_proj_weight: w ** -0.5, block.attn.out_proj.weight: w ** -0.5 * (2 * layers) ** -0.5,
        block.mlp.c_fc.weight: (2 * w) ** -0.5, block.mlp.c_proj.weight: w ** -0.5 * (2 * layers) ** -0.5,
        m.visual.class_embedding: cfg.vision_width ** -0.5, m.visual.positional_embedding: cfg.vision_width ** -0.5,
        m.visual.proj: cfg.vision_width ** -0.5,
    }
    for p, std in expected.items():
        assert p.std().item() == pytest.approx(std, rel=0.1)
    r = CLIP(RESNET).visual
    assert all(b.bn3.weight.abs().sum() == 0 for layer in (r.layer1, r.layer2, r.layer3, r.layer4) for b in layer)
    assert r.attnpool.q_proj.weight.std().item() == pytest.approx(512 ** -0.5, rel=0.1)


def test_logit_scale_init_and_clamp():
    m = CLIP(VIT)
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    m.clamp_logit_scale_()
    assert m.logit_scale.exp().item() == pytest.approx(100)
    with torch.no_grad():
        m.logit_scale.fill_(-1.0)
    m.clamp_logit_scale_()
    assert m.logit_scale.item() == 0


@pytest.mark.parametrize("cfg", [CLIPConfig(**{**VIT.to_dict(), "init_logit_bias": -10.0}), RESNET],
                         ids=["vit", "resnet"])
def test_param_groups_decay_only_matrices_and_kernels(cfg):
    m = CLIP(cfg)
    decay, no_decay = param_groups(m, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    name = {id(p): n for n, p in m.named_parameters()}
    undecayed = {name[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(undecayed) == len(list(m.parameters()))
    assert {"logit_scale", "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "transformer.resblocks.0.attn.in_proj_bias"} <= undecayed
    if cfg.vision == "vit":
        assert {"logit_bias", "visual.class_embedding", "visual.positional_embedding"} <= undecayed
    else:
        assert {"visual.attnpool.positional_embedding", "visual.bn1.weight", "visual.attnpool.c_proj.bias"} <= undecayed
    assert all(p.ndim >= 2 and "embedding" not in name[id(p)] for p in decay["params"])


def test_param_groups_vision_lr_covers_exactly_the_image_tower():
    m = CLIP(RESNET)
    groups = param_groups(m, 0.2, vision_lr=4e-3)
    name = {id(p): n for n, p in m.named_parameters()}
    tower = {name[id(p)] for g in groups if g.get("lr") == 4e-3 for p in g["params"]}
    rest = {name[id(p)] for g in groups if "lr" not in g for p in g["params"]}
    assert tower == {n for n, _ in m.named_parameters() if n.startswith("visual.")}
    assert rest == {n for n, _ in m.named_parameters() if not n.startswith("visual.")}
    assert {(g.get("lr"), g["weight_decay"]) for g in groups} == {(None, 0.2), (None, 0.0), (4e-3, 0.2), (4e-3, 0.0)}


def test_config_json_round_trip_keeps_tuples():
    for cfg in (VIT, RESNET):
        assert CLIPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        CLIPConfig(**{**VIT.to_dict(), "vision_heads": 3})


@pytest.mark.parametrize("cfg", [
    CLIPConfig(**{**VIT.to_dict(), "vision_width": 128, "text_width": 128, "text_heads": 2}),
    CLIPConfig(**{**RESNET.to_dict(), "text_width": 128, "text_heads": 2, "init_logit_bias": -10.0}),
], ids=["vit", "resnet"])
def test_config_from_state_dict_round_trip(cfg):
    assert config_from_state_dict(CLIP(cfg).state_dict()) == cfg


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    images, text = torch.randn(4, 3, 32, 32), tokens(4)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        m = CLIP(VIT).train()
        m.set_grad_checkpointing(enable)
        image, txt, scale = m(images, text)
        (scale * image @ txt.T).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cfg", [VIT, RESNET], ids=["vit", "resnet"])
def test_bf16_autocast_trains(cfg):
    torch.manual_seed(0)
    m = CLIP(cfg).train()
    images, text = torch.randn(4, 3, cfg.image_size, cfg.image_size), tokens(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image, txt, scale = m(images, text)
        loss = (scale * image @ txt.T).logsumexp(-1).mean()
    loss.backward()
    assert image.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with torch.no_grad():
        ref = m.eval()(images, text)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(images, text)[0]
    torch.testing.assert_close(low.float(), ref, rtol=0, atol=0.05)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_under_cpu_autocast_runs_in_fp32_and_returns_the_input_dtype(causal):
    """CPU autocast would run SDPA in bf16, whose backward is slow there: it runs in fp32 instead."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 16, generator=g, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, causal)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(x.grad is not None and x.grad.dtype == torch.bfloat16 for x in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)  # one rounding, at the end


def test_safetensors_save_and_load(tmp_path):
    m = CLIP(RESNET)
    save_safetensors(m, tmp_path / "clip.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["clip.safetensors"]  # no temporary left behind
    sd = load_state_dict_file(tmp_path / "clip.safetensors")
    CLIP(RESNET).load_state_dict(sd, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_save_safetensors_copes_with_shared_tensors(tmp_path):
    m = torch.nn.Module()
    m.a = torch.nn.Linear(4, 4, bias=False)
    m.b = torch.nn.Linear(4, 4, bias=False)
    m.b.weight = m.a.weight  # tied
    save_safetensors(m, tmp_path / "tied.safetensors")
    sd = load_state_dict_file(tmp_path / "tied.safetensors")
    assert torch.equal(sd["a.weight"], sd["b.weight"])


def test_pt_checkpoint_unwrapped_and_prefix_stripped(tmp_path):
    m = CLIP(VIT)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "ck.pt")
    sd = load_state_dict_file(tmp_path / "ck.pt")
    CLIP(config_from_state_dict(sd, vision_heads=2, text_heads=2)).load_state_dict(sd, strict=True)
    torch.save(m.state_dict(), tmp_path / "plain.bin")
    assert load_state_dict_file(tmp_path / "plain.bin").keys() == m.state_dict().keys()


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": CLIPConfig(**VIT.to_dict())}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="weights_only|Unsupported"):
        load_state_dict_file(tmp_path / "evil.pt")


ENSEMBLE = CLIPConfig(**{**RESNET.to_dict(), "ensemble": 3})


def test_ensemble_similarity_is_the_mean_of_its_members():
    torch.manual_seed(0)
    m = build_model(ENSEMBLE).eval()
    assert isinstance(m, CLIPEnsemble) and isinstance(build_model(RESNET), CLIP)
    images, text = torch.randn(4, 3, 64, 64), tokens(5)
    with torch.no_grad():
        image, txt, scale = m(images, text)
        members = [member(images, text) for member in m.members]
    assert image.shape == (4, 96) and txt.shape == (5, 96) and scale.shape == (3,)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    mean_cosine = sum(i @ t.T for i, t, _ in members) / 3
    torch.testing.assert_close(image @ txt.T, mean_cosine)
    assert not torch.allclose(members[0][0], members[1][0])  # each member initialised on its own
    with pytest.raises(ValueError, match="build_model"):
        CLIP(ENSEMBLE)
    with pytest.raises(ValueError, match="ensemble"):
        CLIPConfig(**{**RESNET.to_dict(), "ensemble": 0})


def test_ensemble_vision_lr_covers_every_members_image_tower_and_round_trips(tmp_path):
    m = build_model(ENSEMBLE)
    name = {id(p): n for n, p in m.named_parameters()}
    tower = {name[id(p)] for g in param_groups(m, 0.2, vision_lr=4e-3) if g.get("lr") == 4e-3 for p in g["params"]}
    assert tower == {n for n in name.values() if n.split(".")[2] == "visual"} and len(tower) % 3 == 0
    save_safetensors(m, tmp_path / "clip.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model": ENSEMBLE.to_dict()}))
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded, CLIPEnsemble)
    for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
