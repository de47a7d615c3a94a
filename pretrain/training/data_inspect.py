"""The samples the trainer feeds at a global step and data-parallel rank, and where each comes from.

The datasets are built by the trainer's own `build_datasets` from the same config (seed,
split, blend, sizes for the whole run) and the sequences are taken by its own
`micro_batches`, so what is shown is what the trainer reads. Only the index cache
differs: megatron-core's sample indices are a deterministic function of the seed, the
blend, the split and the sizes, so they are rebuilt in a private directory rather than
read from the run's; megatron-core writes missing index files in place and without a
lock, and a run starting at the same time could read one half-written.

Where a sequence comes from (shard, document, offset) is read from megatron-core's
public index arrays (BlendedDataset.dataset_index / dataset_sample_index, GPTDataset
shuffle_index / sample_index / document_index) and checked against the tokens the
trainer is fed: a megatron-core whose indices mean something else fails loudly
instead of naming the wrong documents.
"""

from __future__ import annotations

import dataclasses
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.tokenizers import Tokenizer, load_tokenizer
from pretrain.config import Config, ConfigError
from pretrain.training.blend import resolve_blend
from pretrain.training.data import build_datasets, micro_batches, sample_range
from pretrain.parallel.layout import ParallelLayout

SPLITS = ("train", "valid")


class InspectError(ValueError):
    """An inspection request that cannot be answered; names the option or setting to change."""


@dataclass
class Piece:
    """A run of consecutive tokens of one document inside a sequence."""

    shard: str
    document: int
    """The document's number within its shard."""
    offset: int
    """Where in the document the run begins."""
    length: int
    document_length: int
    position: int
    """Where in the sequence it begins; the last run may reach one past the sequence: the last label."""


@dataclass
class SequenceView:
    sample: int
    """Index into the split's (blended) dataset: step x global batch + rank's offset + i."""
    tokens: list[int]
    """(T,) what the model reads."""
    labels: list[int]
    """(T,) what it is asked to predict: the tokens shifted by one."""
    pieces: list[Piece]
    eod_positions: list[int]
    """Positions in `tokens` holding the end-of-document id."""


@dataclass
class StepView:
    split: str
    step: int
    data_rank: int
    layout: ParallelLayout
    micro_batches: list[list[SequenceView]]
    tokenizer: Tokenizer


def inspection_layout(config: Config, world_size: int | None) -> ParallelLayout:
    """The trainer's layout for `world_size` ranks (default: one replica, tensor x pipeline ranks),
    validated as the trainer validates it. Precision and DeepSpeed settings are not checked:
    they do not change the data order."""
    tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
    world_size = world_size if world_size is not None else tp * pp
    if world_size < 1:
        raise InspectError(f"--world-size={world_size} must be at least 1")
    return ParallelLayout(world_size, tp, pp, config.parallel.zero_stage, config.parallel.micro_batch_size,
                          config.parallel.global_batch_size).validate(config.model.gpt_config(tp))


def check_request(config: Config, layout: ParallelLayout, split: str, step: int, data_rank: int) -> None:
    """Refuse a step, rank or split the trainer never reads, naming the option."""
    if split not in SPLITS:
        raise InspectError(f"--split={split!r} must be one of {', '.join(SPLITS)}")
    if split == "valid" and not config.eval.interval:
        raise InspectError("--split valid: the config has eval.interval=0, so the trainer builds no validation "
                           "set; add --set eval.interval=N to inspect the one it would build")
    batches, setting = ((config.train.max_steps, "train.max_steps") if split == "train"
                        else (config.eval.iterations, "eval.iterations"))
    if not 0 <= step < batches:
        raise InspectError(f"--step={step} must be in [0, {batches}): the {split} split has {setting}={batches} "
                           "global batches")
    if not 0 <= data_rank < layout.data_parallel_size:
        raise InspectError(f"--data-rank={data_rank} must be in [0, {layout.data_parallel_size}): the data-parallel "
                           f"size is {layout.data_parallel_size} ({layout.describe()}); change --data-rank or "
                           "--world-size")


@contextmanager
def process_group(directory: Path):
    """megatron-core's blended dataset asks torch.distributed for the rank while it builds
    its indices: a one-process gloo group, unless one exists already (kept then)."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{directory / 'process_group'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _tokenizer_for(config: Config) -> Tokenizer:
    try:
        tokenizer = load_tokenizer(config.data.tokenizer)
    except (ValueError, OSError) as error:
        raise ConfigError(f"data.tokenizer: {error}") from None
    if tokenizer.vocab_size != config.model.vocab_size:  # as plan_run refuses it
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} but data.tokenizer {config.data.tokenizer!r} "
                          f"has {tokenizer.vocab_size} tokens; set model.vocab_size={tokenizer.vocab_size}")
    return tokenizer


def samples_at_step(config: Config, step: int, data_rank: int = 0, world_size: int | None = None,
                    split: str = "train", cache_dir: str | Path | None = None) -> StepView:
    """What the trainer feeds data-parallel rank `data_rank` at global step `step` (for the
    valid split: validation batch `step`), micro-batch by micro-batch.

    `cache_dir` keeps megatron-core's sample indices for another call; by default they are
    built in a temporary directory and removed."""
    layout = inspection_layout(config, world_size)
    check_request(config, layout, split, step, data_rank)
    tokenizer = _tokenizer_for(config)
    blend = resolve_blend(config.data.prefixes, tokenizer, sample_tokens=config.model.n_positions + 1)
    with tempfile.TemporaryDirectory(prefix="inspect_data_") as scratch:
        cache = Path(cache_dir) if cache_dir else Path(scratch) / "data_cache"
        private = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_dir=str(cache)))
        with process_group(Path(scratch)):
            train, valid = build_datasets(private, tokenizer, blend, Path(scratch), layout.data_parallel_size)
        dataset = train if split == "train" else valid
        batches = micro_batches(dataset, step, layout, data_rank)
        samples = iter(sample_range(step, layout, data_rank))  # the numbers micro_batches read, in order
        views = [[_sequence_view(dataset, next(samples), row_tokens, row_labels, tokenizer.eod_id)
                  for row_tokens, row_labels in zip(tokens.tolist(), labels.tolist())] for tokens, labels in batches]
    return StepView(split, step, data_rank, layout, views, tokenizer)


def _sequence_view(dataset, sample: int, tokens: list[int], labels: list[int], eod_id: int) -> SequenceView:
    pieces = sample_pieces(dataset, sample)
    _check_pieces(pieces, dataset, sample, tokens + labels[-1:])
    return SequenceView(sample, tokens, labels, pieces, [i for i, token in enumerate(tokens) if token == eod_id])


def _part_and_index(dataset, sample: int):
    """(GPTDataset, its sample number) behind `sample` of a blended or a plain GPT dataset."""
    if hasattr(dataset, "dataset_index"):  # BlendedDataset
        return dataset.datasets[int(dataset.dataset_index[sample])], int(dataset.dataset_sample_index[sample])
    return dataset, sample


def sample_pieces(dataset, sample: int) -> list[Piece]:
    """The document runs that make up `sample` (the T inputs and the one extra label token),
    read as GPTDataset._query_document_sample_shuffle_indices assembles them."""
    part, index = _part_and_index(dataset, sample)
    shuffled = int(part.shuffle_index[index])
    (first, first_offset), (last, last_offset) = part.sample_index[shuffled], part.sample_index[shuffled + 1]
    extra = int(part.config.add_extra_token_to_sequence)
    indexed = part.dataset  # the shard's IndexedDataset; its "documents" for megatron-core are sequences
    sequence_lengths, document_bounds = indexed.sequence_lengths, indexed.document_indices
    pieces, position = [], 0
    for i in range(int(first), int(last) + 1):
        sequence = int(part.document_index[i])
        begin = int(first_offset) if i == first else 0
        end = int(last_offset) + extra if i == last else int(sequence_lengths[sequence])
        document = int(np.searchsorted(document_bounds, sequence, side="right")) - 1
        doc_first = int(document_bounds[document])
        before = int(np.sum(sequence_lengths[doc_first:sequence], dtype=np.int64))  # earlier sequences of it
        doc_length = int(np.sum(sequence_lengths[doc_first:int(document_bounds[document + 1])], dtype=np.int64))
        pieces.append(Piece(part.dataset_path, document, before + begin, end - begin, doc_length, position))
        position += end - begin
    return pieces


def _check_pieces(pieces: list[Piece], dataset, sample: int, fed: list[int]) -> None:
    """The pieces' tokens, read from the shards, must be the tokens the trainer is fed (a padded
    sample is compared over its real tokens)."""
    part, _ = _part_and_index(dataset, sample)
    read = [token for piece in pieces for token in _piece_tokens(part.dataset, piece)]
    if read != fed[:len(read)]:
        raise RuntimeError(f"sample {sample}: the documents megatron-core's indices name do not hold the tokens it "
                           "returns; this megatron-core lays out its indices differently from what "
                           "pretrain/training/data_inspect.py reads (update sample_pieces)")


def _piece_tokens(indexed, piece: Piece) -> list[int]:
    bounds = indexed.document_indices
    sequences = range(int(bounds[piece.document]), int(bounds[piece.document + 1]))
    if len(sequences) == 1:  # our shards: one sequence per document, read only the piece
        return indexed.get(sequences[0], offset=piece.offset, length=piece.length).tolist()
    tokens = np.concatenate([indexed[sequence] for sequence in sequences])
    return tokens[piece.offset:piece.offset + piece.length].tolist()
