import json

import numpy as np
import pandas as pd
from hypothesis import given, settings, strategies as st

from clipmodel.tokenizer import (EOT_ID, PAD_ID, SOT_ID, decode, encode, length_order, load_tokenizer, normalize,
                                 train_tokenizer, trim_padding)
from conftest import TINY, merge, run_stage, write_params

CORPUS = ["a large red circle on the left", "two blue squares and a yellow star",
          "there is a small green triangle near the top", "Café crème, naïve façade!"] * 20
CONTEXT = 24


def _tok():
    return train_tokenizer(CORPUS, vocab_size=400, context_length=CONTEXT)


TOK = _tok()


def test_layout_sot_tokens_eot_padding():
    ids, truncated = encode(TOK, ["a red circle", ""])
    assert ids.dtype == np.int32 and ids.shape == (2, CONTEXT)
    row = ids[0]
    n = int((row != PAD_ID).sum())
    assert row[0] == SOT_ID and row[n - 1] == EOT_ID and (row[n:] == PAD_ID).all()
    assert list(ids[1, :3]) == [SOT_ID, EOT_ID, PAD_ID]
    assert not truncated.any()


def test_overlong_caption_keeps_eot_last():
    ids, truncated = encode(TOK, ["red " * 100])
    assert truncated.tolist() == [True]
    assert ids[0, 0] == SOT_ID and ids[0, -1] == EOT_ID and (ids[0] != PAD_ID).all()


def test_normalisation_is_nfc_lowercase_collapsed():
    assert normalize(TOK, "  A  Large\tRED\n circle ") == "a large red circle"
    assert normalize(TOK, "Cafe\u0301") == "caf\u00e9"


def test_special_token_text_in_a_caption_is_encoded_as_text(tmp_path):
    TOK.save(str(tmp_path / "tokenizer.json"))
    for tok in (TOK, load_tokenizer(tmp_path / "tokenizer.json")):
        ids = encode(tok, ["a <pad> b <end_of_text> c"])[0][0]
        assert ids[0] == SOT_ID and (ids[1:] != SOT_ID).all()
        real = ids[ids != PAD_ID]
        assert real[-1] == EOT_ID and (real[:-1] != EOT_ID).all() and len(real) == (ids != PAD_ID).sum()
        assert (ids[len(real):] == PAD_ID).all()  # pads only after EOT: pooling reads the true end


def test_trim_padding_keeps_the_longest_row_whole():
    ids = np.array([[1, 5, 2, 0, 0, 0], [1, 5, 6, 7, 2, 0], [1, 2, 0, 0, 0, 0]], dtype=np.int32)
    np.testing.assert_array_equal(trim_padding(ids), ids[:, :5])
    assert trim_padding(np.zeros((0, 6), dtype=np.int32)).shape == (0, 1)


def test_length_order_goes_from_fewest_tokens_to_most_keeping_ties_in_place():
    ids = np.array([[1, 5, 6, 2, 0], [1, 2, 0, 0, 0], [1, 5, 2, 0, 0], [1, 7, 2, 0, 0], [1, 2, 0, 0, 0]], dtype=np.int32)
    assert length_order(ids).tolist() == [1, 4, 2, 3, 0]
    assert length_order(np.zeros((0, 5), dtype=np.int32)).shape == (0,)


def test_save_and_load_encode_identically(tmp_path):
    TOK.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(tmp_path / "tokenizer.json")
    texts = ["a large red circle", "red " * 100]
    assert (encode(again, texts)[0] == encode(TOK, texts)[0]).all()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_decode_keeps_every_character_and_encodes_back_to_the_same_ids(text):
    ids, truncated = encode(TOK, [text])
    if truncated[0]:
        return
    decoded = decode(TOK, ids[0])
    assert decoded.replace(" ", "") == normalize(TOK, text).replace(" ", "")
    assert (encode(TOK, [decoded])[0] == ids).all()


def test_a_word_has_the_same_tokens_wherever_it_stands():
    def word_ids(text):
        ids = encode(TOK, [text])[0][0]
        return ids[(ids != PAD_ID) & (ids != SOT_ID) & (ids != EOT_ID)].tolist()
    circle = word_ids("circle")
    assert word_ids("red circle") == word_ids("red") + circle
    assert word_ids("(circle, circle)") == word_ids("(") + circle + word_ids(",") + circle + word_ids(")")
    assert decode(TOK, encode(TOK, ["A large (red) circle,two"])[0][0]) == "a large ( red ) circle , two"


def test_stage_names_the_captions_it_truncates(workspace):
    """The tokenize stage counts the captions the context length cuts and keeps the first few in full."""
    write_params(workspace, merge(TINY, {"tokenize": {"context_length": 8}}))
    run_stage(workspace, "tokenize")
    report = json.loads((workspace / "reports/tokenize.json").read_text())
    captions = [c for caps in pd.read_parquet(workspace / "data/manifest.parquet").captions for c in caps]
    tok = load_tokenizer(workspace / "data/tokenizer.json")
    cut = [c for c in captions if encode(tok, [c])[1][0]]  # views of a train caption count too: at least these
    assert report["truncated"] >= len(cut) > 10
    assert report["truncated_examples"] == cut[:10]
