"""Byte-level BPE for captions, trained from scratch with HF `tokenizers`.

Everything needed to encode (normalisation, SOT/EOT template, truncation that keeps EOT
as the last real token, padding to the context length) lives inside tokenizer.json, so a
downstream app that loads that one file with `tokenizers` encodes exactly as training did, once it
sets `encode_special_tokens = True` (not kept in the file; `load_tokenizer` does it).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, SOT, EOT = "<pad>", "<start_of_text>", "<end_of_text>"
PAD_ID, SOT_ID, EOT_ID = 0, 1, 2  # trainer assigns ids in this order; the model relies on pad == 0


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(),
    ])


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words, numbers and punctuation runs are split apart (spaces dropped) and each gets the byte-level
    # space mark, as CLIP's BPE marks every word's end: a word then has one spelling wherever it stands.
    # GPT-2's byte-level split (a word carries its leading space) gives a word at the start of a caption
    # or after "(" other tokens than the same word after a space: in the real emoji captions 66 of the
    # unseen labels' 972 words had only been trained in their other form (docs/real-data.md).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
    ])


def train_tokenizer(texts: Iterable[str], vocab_size: int, context_length: int) -> Tokenizer:
    """Byte-level BPE (Sennrich et al. 2016; GPT-2's byte-level alphabet) over words split as CLIP's
    tokenizer splits them (letters, digits and punctuation runs apart, each word marked the same way
    wherever it stands), of at most `vocab_size` entries, the three special tokens included, trained
    on `texts`. Encodings are SOT ... EOT, truncated and padded to `context_length` tokens.

    Raises: AssertionError if the trainer did not give PAD, SOT and EOT the ids 0, 1 and 2.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = _normalizer()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, SOT, EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk>
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    assert (tok.token_to_id(PAD), tok.token_to_id(SOT), tok.token_to_id(EOT)) == (PAD_ID, SOT_ID, EOT_ID)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, SOT_ID), (EOT, EOT_ID)])
    tok.enable_truncation(max_length=context_length)  # room for SOT/EOT is reserved by the template
    tok.enable_padding(pad_id=PAD_ID, pad_token=PAD, length=context_length)
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """tokenizer.json with `encode_special_tokens` on, which the file format does not keep: a caption
    that contains the text "<pad>" or "<end_of_text>" is then encoded as text, instead of putting a
    pad or EOT id mid-caption where the text tower's EOT pooling would stop.

    Raises: Exception (tokenizers' own) when the file is missing or not a tokenizer.
    """
    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return tok


def context_length(tok: Tokenizer) -> int:
    """The padded length of every encoding, in tokens (SOT and EOT included).

    Raises: TypeError for a tokenizer without padding, i.e. not one of `train_tokenizer`'s.
    """
    return tok.padding["length"]


def normalize(tok: Tokenizer, text: str) -> str:
    """`text` as the tokenizer sees it before BPE: NFC, lower-case, whitespace runs as one space, stripped.
    Equal results encode to equal token rows (the caption ids of `data.Corpus.caption_ids`)."""
    return tok.normalizer.normalize_str(text)


def encode(tok: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids int32 [N, context_length] and, per text, whether it was truncated: bool [N]."""
    encodings = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int32).reshape(len(texts), context_length(tok))
    truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
    return ids, truncated


def trim_padding(ids: np.ndarray) -> np.ndarray:
    """int [N, L] -> [N, L'] (a view, L' >= 1): the pad columns that every row has dropped. Exact for the
    causal text tower (no position attends to a later one, so the feature at EOT is unchanged) and it
    makes the tower's cost follow the batch's longest caption rather than the context length."""
    return ids[:, :max(1, int((ids != PAD_ID).sum(1).max(initial=0)))]


def length_order(ids: np.ndarray) -> np.ndarray:
    """int64 [N]: the rows of token ids [N, L] from the fewest tokens to the most (stable). Batches taken
    in this order and trimmed by `trim_padding` carry almost no padding, where batches in file order
    pay for their longest caption (the evaluate stage's timing: docs/performance.md#pipeline-time)."""
    return np.argsort((ids != PAD_ID).sum(1), kind="stable")


def decode(tok: Tokenizer, ids: Iterable[int]) -> str:
    """The text of token ids, special tokens (PAD, SOT, EOT) dropped: normalised (lower-case), with one
    space between words and around punctuation, since the pre-tokenizer drops spaces, as CLIP's does
    ("a cat (tabby)" decodes to "a cat ( tabby )", which encodes back to the same ids)."""
    return tok.decode(list(ids), skip_special_tokens=True)
