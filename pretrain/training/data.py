"""Training samples from .bin/.idx shards through megatron-core's GPT dataset machinery.

megatron-core's BlendedMegatronDatasetBuilder / GPTDataset provide the sample and
shuffle indices (cached on disk), blending of several prefixes by weight, and the
train / validation / test split. On top of that we define the order: global batch
k is samples [k G, (k + 1) G) of the blended training set, G = global batch size,
whatever the parallel layout. A data-parallel rank takes a contiguous slice of
it and cuts that into micro-batches; so the step-k batch never depends on TP, PP
or DP, and resuming at step k continues exactly where training stopped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.tokenizers import Tokenizer
from pretrain.training.blend import DataError
from pretrain.config import Config
from pretrain.parallel.layout import ParallelLayout


@dataclass
class MegatronTokenizerView:
    """What megatron-core's GPTDataset asks of a tokenizer: the end-of-document id,
    the vocabulary size, and identifiers that key its index cache."""

    eod: int
    vocab_size: int
    unique_identifiers: dict

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "MegatronTokenizerView":
        identity = tokenizer.identity()
        return cls(tokenizer.eod_id, tokenizer.vocab_size, {"name": identity["name"], "sha256": identity["sha256"]})


SPLIT_NAMES = ("train", "validation", "test")


def check_splits_have_documents(paths: list[str], split: str, sizes: list[int]) -> None:
    """Refuse a split that gives some part weight but leaves it no document of some shard.

    megatron-core cuts each shard's documents by `split` and builds every part that
    has weight, even one no sample is drawn from (validation with eval.interval=0);
    building a part with no tokens loops forever. Say so instead.
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for path in paths:
        documents = len(IndexedDataset(path).document_indices) - 1
        for name, bounds, wanted in zip(SPLIT_NAMES, matrix, sizes):
            if bounds is None or bounds[0] == bounds[1]:  # a part of weight 0 is not built
                continue
            if int(round(bounds[0] * documents)) == int(round(bounds[1] * documents)):
                use = f"{wanted} {name} samples are needed" if wanted else "megatron-core builds it all the same"
                raise DataError(
                    f"data.split={split!r} leaves the {name} part of {path} ({documents} documents) empty, and "
                    f"{use}; give that part more weight in data.split (or none at all, e.g. 100,0,0 without "
                    "evaluation), or use larger shards (--shard-size-tokens)"
                )


def build_datasets(config: Config, tokenizer: Tokenizer, blend: tuple[list[str], list[float]], run_dir: Path,
                   data_parallel_size: int):
    """(train, valid) blended GPT datasets sized for the whole run; valid is None without evaluation.

    `blend` is `resolve_blend(config.data.prefixes, tokenizer)`, which the trainer also records in checkpoints.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    paths, weights = blend
    global_batch = config.parallel.global_batch_size
    # Every evaluation uses the same first `eval.iterations` global batches of the
    # validation split, so validation losses along a run compare like with like.
    valid_samples = config.eval.iterations * global_batch if config.eval.interval else 0
    sizes = [config.train.max_steps * global_batch, valid_samples, 0]
    check_splits_have_documents(paths, config.data.split, sizes)
    dataset_config = GPTDatasetConfig(
        random_seed=config.train.seed,
        sequence_length=config.model.n_positions,
        blend=(paths, weights),
        split=config.data.split,
        path_to_cache=config.data.cache_dir or str(run_dir / "data_cache"),
        tokenizer=MegatronTokenizerView.of(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        data_parallel_size=data_parallel_size,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, dataset_config).build()
    return train, (valid if valid_samples else None)


def sample_range(step: int, layout: ParallelLayout, data_rank: int) -> range:
    """The sample numbers data-parallel rank `data_rank` reads for global batch `step`."""
    per_rank = layout.global_batch_size // layout.data_parallel_size
    first = step * layout.global_batch_size + data_rank * per_rank
    return range(first, first + per_rank)


def micro_batches(dataset, step: int, layout: ParallelLayout, data_rank: int,
                  pin_memory: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's (tokens, labels) micro-batches of global batch `step`.

    With `pin_memory` (training on GPUs) they sit in page-locked host memory, so that
    copies to the GPU can be non-blocking and overlap the previous micro-batch's work."""
    indices = sample_range(step, layout, data_rank)
    samples = [dataset[index] for index in indices]
    tokens = torch.stack([sample["tokens"] for sample in samples])  # (per_rank, T)
    labels = torch.stack([sample["labels"] for sample in samples])
    if pin_memory:
        tokens, labels = tokens.pin_memory(), labels.pin_memory()
    size = layout.micro_batch_size
    return [(tokens[i:i + size], labels[i:i + size]) for i in range(0, len(indices), size)]


class NextBatch:
    """The training micro-batches of each step, the next step's read in a background thread while this one
    trains: reading and stacking a global batch's samples (megatron-core's index lookups, the memory-mapped
    shards, pinning) then costs the step nothing. The order is the same as reading in place; nothing past
    `steps` is read."""

    def __init__(self, dataset, layout: ParallelLayout, data_rank: int, steps: int, pin_memory: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self._read = lambda step: micro_batches(dataset, step, layout, data_rank, pin_memory=pin_memory)
        self._steps, self._pending = steps, None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="next-batch")

    def __call__(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ahead, self._pending = self._pending, None
        batches = ahead[1].result() if ahead is not None and ahead[0] == step else self._read(step)
        if step + 1 < self._steps:
            self._pending = (step + 1, self._pool.submit(self._read, step + 1))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
