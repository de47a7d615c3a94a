"""Tokenizers: the real GPT-2 vocabulary offline, a user's own BPE files, SentencePiece."""

from __future__ import annotations

import shutil

import pytest

from data_pipeline.tokenizers import (
    GPT2_VOCAB_SIZE,
    bundled_gpt2_files,
    load_tokenizer,
    padded_vocab_size,
    train_sentencepiece,
)

# The sha256 OpenAI publishes for GPT-2's vocab.bpe and encoder.json (the hashes
# tiktoken checks when it downloads them).
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def test_gpt2_is_the_published_vocabulary(gpt2_tokenizer):
    identity = gpt2_tokenizer.identity()
    assert identity["file_sha256"] == {"vocab_bpe": GPT2_VOCAB_BPE_SHA256, "encoder_json": GPT2_ENCODER_JSON_SHA256}
    assert gpt2_tokenizer.vocab_size == GPT2_VOCAB_SIZE == 50257
    assert gpt2_tokenizer.eod_id == 50256
    # Well-known GPT-2 ids.
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    assert gpt2_tokenizer.encode(" the") == [262]


def test_gpt2_matches_huggingface_bpe_on_real_text(gpt2_tokenizer, real_documents):
    """tiktoken with the r50k regex == Hugging Face's byte-level BPE from the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab_bpe, encoder_json = bundled_gpt2_files()
    reference = Tokenizer(models.BPE.from_file(str(encoder_json), str(vocab_bpe)))
    reference.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = decoders.ByteLevel()
    texts = [doc["text"] for doc in real_documents]
    ours = gpt2_tokenizer.encode_batch(texts)
    theirs = [encoding.ids for encoding in reference.encode_batch(texts)]
    mismatched = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert not mismatched, f"documents {mismatched[:5]} tokenize differently"
    assert sum(map(len, ours)) > 500_000
    assert all(gpt2_tokenizer.decode(ids) == text for ids, text in zip(ours[:50], texts[:50]))


def test_literal_endoftext_in_text_is_not_a_document_boundary(gpt2_tokenizer):
    ids = gpt2_tokenizer.encode("a <|endoftext|> b")
    assert gpt2_tokenizer.eod_id not in ids
    assert gpt2_tokenizer.decode(ids) == "a <|endoftext|> b"


@pytest.mark.parametrize("names", [("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json")])
def test_user_bpe_files_load_from_a_directory(tmp_path, gpt2_tokenizer, real_documents, names):
    vocab_bpe, encoder_json = bundled_gpt2_files()
    shutil.copy(vocab_bpe, tmp_path / names[0])
    shutil.copy(encoder_json, tmp_path / names[1])
    user = load_tokenizer(str(tmp_path))
    text = real_documents[0]["text"]
    assert user.encode(text) == gpt2_tokenizer.encode(text)
    assert user.eod_id == 50256 and user.vocab_size == 50257
    assert user.identity()["file_sha256"] == gpt2_tokenizer.identity()["file_sha256"]


def test_padded_vocab_size_is_a_multiple_of_128_times_tp():
    assert padded_vocab_size(50257, 1) == 50304
    assert padded_vocab_size(50257, 2) == 50432
    assert padded_vocab_size(50257, 8) == 51200
    for tp in (1, 2, 3, 5, 25):
        padded = padded_vocab_size(50257, tp)
        assert padded % (128 * tp) == 0 and 50257 <= padded < 50257 + 128 * tp
    assert padded_vocab_size(256, 1) == 256


def test_unknown_tokenizer_spec_names_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="not 'gpt2'"):
        load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="holds none of"):
        load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory, real_documents):
    directory = tmp_path_factory.mktemp("sp")
    return train_sentencepiece((doc["text"] for doc in real_documents), directory, vocab_size=1000)


def test_sentencepiece_round_trips_any_text(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    assert tok.vocab_size == 1000
    text = "Ein  Bär\n\tsaß — 42 😀 auf\u00a0dem <|endoftext|> Zaun.  "
    ids = tok.encode(text)
    assert tok.decode(ids) == text  # byte fallback covers characters never seen in training
    assert tok.eod_id not in ids
    assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]
    assert tok.padded_vocab_size(2) == 1024
    assert tok.identity()["name"] == "sentencepiece"


def test_sentencepiece_learned_merges_and_marks_documents_with_endoftext(sentencepiece_tokenizer, real_documents):
    import sentencepiece as spm

    tok = sentencepiece_tokenizer
    processor = spm.SentencePieceProcessor(model_file=tok.files["model"])
    assert processor.id_to_piece(tok.eod_id) == "<|endoftext|>"
    text = real_documents[1]["text"]
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2  # real merges, not bytes
