"""The paper's baselines: bag-of-words prediction and caption generation (losses, zero-shot scores,
greedy and beam search), each checked against hand-computed values on toy inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from clipmodel import cli
from clipmodel.bow import BagOfWords, bow_loss, bow_targets, score_prompts
from clipmodel.captioner import Captioner, beam_search
from clipmodel.model import CLIPConfig
from clipmodel.tokenizer import EOT_ID, PAD_ID, SOT_ID, encode, train_tokenizer
from pipeline.efficiency import save_folder
from pipeline.params import Params


def config(vocab: int = 8, vision: str = "vit", image_size: int = 32) -> CLIPConfig:
    resnet = vision == "resnet"
    return CLIPConfig(embed_dim=16, image_size=image_size, vision=vision, vision_width=8 if resnet else 32,
                      vision_layers=(1, 1, 1, 1) if resnet else 1, vision_heads=4 if resnet else 2,
                      vision_patch_size=None if resnet else 8, context_length=8, vocab_size=vocab,
                      text_width=32, text_heads=2, text_layers=1)


def test_bow_targets_and_loss_by_hand():
    tokens = torch.tensor([[SOT_ID, 5, 7, 5, EOT_ID, PAD_ID]])
    targets = bow_targets(tokens, 8)
    assert targets.tolist() == [[0, 0, 0, 0, 0, 1, 0, 1]]  # 5 once, 7; no PAD, SOT, EOT
    logits = torch.zeros(1, 8)
    logits[0, 5] = 2.0
    # word 5 present with logit 2: -log sigmoid(2); the 7 other entries have logit 0: log 2 each
    assert bow_loss(logits, tokens).item() == pytest.approx(math.log1p(math.exp(-2)) + 7 * math.log(2))


def test_bow_zero_shot_score_is_the_mean_word_log_probability():
    logits = torch.tensor([[0.0, 0.0, 0.0, math.log(3), math.log(1 / 3), 0.0]])  # p(3)=.75, p(4)=.25, p(5)=.5
    prompts = torch.tensor([[SOT_ID, 3, 4, 3, EOT_ID, PAD_ID], [SOT_ID, 5, EOT_ID, PAD_ID, PAD_ID, PAD_ID]])
    scores = score_prompts(logits, prompts)
    assert scores[0].tolist() == pytest.approx([(math.log(0.75) + math.log(0.25)) / 2, math.log(0.5)])
    model = BagOfWords(config())
    assert score_prompts(model(torch.randn(3, 3, 32, 32)), prompts).shape == (3, 2)


@pytest.mark.parametrize("encoder_layers,vision,size", [(0, "vit", 32), (1, "resnet", 64), (1, "vit", 32)])
def test_caption_loss_and_log_likelihood_by_hand(encoder_layers, vision, size):
    model = Captioner(config(vision=vision, image_size=size), encoder_layers)
    bias = torch.randn(8)
    with torch.no_grad():  # every position then predicts softmax(bias), whatever the image and prefix
        model.head.weight.zero_()
        model.head.bias.copy_(bias)
    logp = bias.log_softmax(-1)
    images = torch.randn(2, 3, size, size)
    tokens = torch.tensor([[SOT_ID, 4, 5, EOT_ID, PAD_ID, PAD_ID]] * 2)
    assert model.loss(images, tokens).item() == pytest.approx(-(logp[4] + logp[5] + logp[EOT_ID]).item() / 3)
    prompts = torch.tensor([[SOT_ID, 4, EOT_ID, PAD_ID], [SOT_ID, 4, 6, EOT_ID]])
    expected = [(logp[4] + logp[EOT_ID]).item(), (logp[4] + logp[6] + logp[EOT_ID]).item()]
    ll = model.log_likelihood(images, prompts, max_pairs=2)  # one image per chunk
    assert ll.tolist() == [pytest.approx(expected, abs=1e-5)] * 2


def test_vision_grids():
    vit, resnet = Captioner(config(), 1).visual, Captioner(config(vision="resnet", image_size=64), 1).visual
    assert vit.grid(torch.randn(2, 3, 32, 32)).shape == (2, 32, 4, 4)
    assert resnet.grid(torch.randn(2, 3, 64, 64)).shape == (2, 8 * 32, 2, 2)


def markov(table: torch.Tensor):
    """next_logprobs of a toy model: the next token depends on the item and the last token only."""
    return lambda rows, tokens: table[rows, tokens[:, -1]].log()


def greedy(table: torch.Tensor, n: int, max_len: int) -> list[list[int]]:
    out = []
    for row in range(n):
        seq = [SOT_ID]
        while seq[-1] != EOT_ID and len(seq) < max_len:
            seq.append(int(table[row, seq[-1]].argmax()))
        out.append(seq)
    return out


def test_beam_one_is_greedy():
    g = torch.Generator().manual_seed(0)
    table = torch.rand(3, 6, 6, generator=g) ** 4  # peaked random transitions, 3 items
    table[..., [PAD_ID, SOT_ID]] = 0
    table /= table.sum(-1, keepdim=True)
    ids = beam_search(markov(table), 3, 7, beam=1)
    assert [[t for t in row if t != PAD_ID] for row in ids.tolist()] == greedy(table, 3, 7)


def test_beam_search_finds_a_likelier_caption_than_greedy():
    a, b = 3, 4
    table = torch.zeros(1, 5, 5)
    table[0, SOT_ID, [a, b]] = torch.tensor([0.6, 0.4])
    table[0, a, [EOT_ID, a, b]] = torch.tensor([0.4, 0.3, 0.3])   # greedy: SOT a EOT, p = 0.24
    table[0, b, [EOT_ID, a, b]] = torch.tensor([0.9, 0.05, 0.05])  # best:   SOT b EOT, p = 0.36
    assert beam_search(markov(table), 1, 5, beam=1).tolist() == [[SOT_ID, a, EOT_ID]]
    assert beam_search(markov(table), 1, 5, beam=2).tolist() == [[SOT_ID, b, EOT_ID]]


def fit_one_caption(model: Captioner, images: torch.Tensor, tokens: torch.Tensor, steps: int = 60) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model.loss(images, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("encoder_layers", [0, 1])
def test_tiny_captioner_learns_to_write_its_caption(encoder_layers):
    torch.manual_seed(0)
    model = Captioner(config(vocab=12), encoder_layers)
    caption = [SOT_ID, 5, 9, 7, EOT_ID]
    fit_one_caption(model, torch.randn(4, 3, 32, 32), torch.tensor([caption + [PAD_ID] * 3] * 4))
    image = torch.randn(1, 3, 32, 32)
    assert model.generate(image).tolist() == [caption]
    assert model.generate(image, beam=3).tolist() == [caption]


def test_caption_cli(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    monkeypatch.chdir(tmp_path)
    tok = train_tokenizer(["a red circle", "a blue square", "two green stars"], vocab_size=300, context_length=8)
    (tmp_path / "data").mkdir()
    tok.save(str(tmp_path / "data/tokenizer.json"))
    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(tmp_path / "red.png")
    p = Params.model_validate({"data": {"image_size": 32}})
    images = cli.load_pixels([str(tmp_path / "red.png")], {"background": [255] * 3, "image_size": 32})
    cfg = config(vocab=tok.get_vocab_size())
    model = Captioner(cfg, 0)
    fit_one_caption(model, images, torch.from_numpy(encode(tok, ["a red circle"])[0]).long())
    save_folder(tmp_path / "captioner", model, "decoder", {"model": cfg.to_dict(), "encoder_layers": 0}, p, "test")

    cli.main(["caption", "--model", str(tmp_path / "captioner"), str(tmp_path / "red.png"), "--beam", "2"])
    assert capsys.readouterr().out == f"{tmp_path / 'red.png'}\ta red circle\n"
    with pytest.raises(SystemExit, match="not a captioner"):
        save_folder(tmp_path / "bow", BagOfWords(cfg), "bow", {"model": cfg.to_dict()}, p, "test")
        cli.main(["caption", "--model", str(tmp_path / "bow"), str(tmp_path / "red.png")])
