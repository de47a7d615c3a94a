#!/usr/bin/env python
"""`make demo`: the main job, end to end on CPU, on real text that ships with a pip package.

1. real English text: gensim's ABC news articles and Wikipedia pages, plus a "mirror" file
   holding exact and lightly edited copies of a fifth of them, as a crawl would;
2. curation with FineWeb's recipe (configs/data/fineweb.yaml): language ID, quality filters,
   exact and MinHash dedup across the files;
3. GPT-2 BPE -> Megatron .bin/.idx shards, read back with megatron-core's IndexedDataset;
4. a tiny GPT-2 trained on 8 local processes, TP=2 x PP=2 x DP=2 under ZeRO-1 (gloo);
5. interrupted with SIGTERM midway (it saves a sharded checkpoint and exits), then the same
   command again, which resumes from that checkpoint;
6. the last steps on half the processes (TP=1 x PP=2 x DP=2), as after a requeue onto a smaller
   allocation: the checkpoint is resharded on load and the curve goes on;
7. the loss curve, and the TensorBoard command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.curation.pipeline import curate, load_curation_config, summary_table  # noqa: E402
from data_pipeline.preprocess import preprocess  # noqa: E402
from data_pipeline.sample_text import news_articles, wikipedia_pages, write_jsonl  # noqa: E402
from data_pipeline.shards import indexed_dataset_module  # noqa: E402
from data_pipeline.tokenizers import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ.get("DEMO_OUT") or REPO / "demo_out")
TRAIN_STEPS = 30
INTERRUPT_AFTER = 12  # steps
RESHARD_AT = 20  # the last steps run on another layout
WORKERS = max(1, len(os.sched_getaffinity(0)))


def write_corpus() -> list[Path]:
    import random

    import zstandard

    news, wiki = list(news_articles()), list(wikipedia_pages())
    news_file = write_jsonl(OUT / "raw" / "news.jsonl", news)
    wiki_lines = "".join(json.dumps(page) + "\n" for page in wiki).encode()
    wiki_file = OUT / "raw" / "wikipedia.jsonl.zst"
    wiki_file.write_bytes(zstandard.ZstdCompressor(level=10).compress(wiki_lines))
    rng, mirror = random.Random(0), []
    for i, document in enumerate(news + wiki):
        if i % 10 == 0:
            mirror.append({**document, "id": document["id"] + "-copy"})
        elif i % 10 == 5:
            words = document["text"].split()
            words[rng.randrange(len(words))] = "indeed"
            mirror.append({**document, "id": document["id"] + "-edited", "text": " ".join(words)})
    return [news_file, wiki_file, write_jsonl(OUT / "raw" / "mirror.jsonl", mirror)]


def curate_corpus(inputs: list[Path]) -> list[Path]:
    config = REPO / "configs" / "data" / "fineweb.yaml"
    print(f"\ncurating with {config.relative_to(REPO)} (as tools/curate.py --config ... --input ... --output ...):")
    stats = curate([str(p) for p in inputs], OUT / "curated", load_curation_config(config), workers=WORKERS)
    print(summary_table(stats))
    print(f"removed documents, each with its reason: {OUT / 'curated' / 'removed'}")
    return sorted((OUT / "curated" / "documents").glob("*.jsonl.zst"))


def show_shards(summary: dict, prefix: Path) -> None:
    IndexedDataset = indexed_dataset_module().IndexedDataset
    print(f"\n{'shard':<14}{'documents':>10}{'tokens':>10}")
    for shard in summary["shards"]:
        print(f"{shard['name']:<14}{shard['documents']:>10}{shard['tokens']:>10}")
    print(f"{'total':<14}{summary['documents']:>10}{summary['tokens']:>10}   ({summary['dtype']} ids, "
          f"tokenizer {summary['tokenizer']['name']} sha256 {summary['tokenizer']['sha256'][:12]})")
    last_shard = IndexedDataset(str(prefix.parent / summary["shards"][-1]["name"]))
    ids = last_shard[len(last_shard) - 1]
    tokenizer = load_tokenizer("gpt2")
    print(f"\nlast document of the last shard, read back with megatron-core's IndexedDataset "
          f"({len(ids)} tokens, ends with end-of-document id {ids[-1]}):")
    print("  " + repr(tokenizer.decode(ids[:60]))[:300] + " ...")


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    indexed_dataset_module()  # megatron-core's import takes seconds; keep it out of the timing below
    raw = write_corpus()
    print(f"raw corpus: {', '.join(f'{p.name} ({p.stat().st_size / 1e6:.1f} MB)' for p in raw)}")
    inputs = curate_corpus(raw)
    prefix = OUT / "tokens" / "demo"
    began = time.monotonic()
    print("\ntokenizing the curated documents:")
    summary = preprocess([str(p) for p in inputs], str(prefix), "gpt2", workers=WORKERS, shard_size_tokens=220_000)
    print(f"tokenized in {time.monotonic() - began:.1f} s; {summary['skipped']['total']} records skipped")
    show_shards(summary, prefix)
    print(f"\nsummary: {prefix}.json")
    return train(prefix)


def train(prefix: Path) -> int:
    run_dir = OUT / "run"
    command = [sys.executable, "-m", "pretrain.launch", "--nproc", "8", "--config", str(REPO / "configs" / "gpt2-tiny.yaml"),
               "--set", f"data.prefixes=[{prefix}]", f"run.dir={run_dir}", "parallel.tensor_parallel_size=2",
               "parallel.pipeline_parallel_size=2", "parallel.zero_stage=1", f"train.max_steps={RESHARD_AT}",
               f"schedule.decay_end={TRAIN_STEPS}",  # one learning-rate schedule across the three runs
               # Half the preset's window and learning rate: at 3e-3 one ordinary update around step 20
               # overshoots (loss 8.2 -> 12.3, with or without the interruption), which reads like a bad resume.
               "model.n_positions=128", "optim.lr=1.5e-3",
               "eval.interval=10"]
    print(f"\ntraining gpt2-tiny to step {RESHARD_AT} on 8 processes (TP=2 x PP=2 x DP=2, ZeRO-1, gloo):")
    print("  " + " ".join(command[1:]))
    # The demo runs on CPU even where a GPU is present: NCCL cannot put 8 ranks on one GPU.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    first = subprocess.Popen(command, cwd=REPO, env=env)
    wait_for_steps(run_dir / "metrics.jsonl", INTERRUPT_AFTER, first)
    print(f"\n--- sending SIGTERM after step {INTERRUPT_AFTER}, as a Slurm preemption would ---\n", flush=True)
    first.send_signal(signal.SIGTERM)
    if first.wait() != 0:
        return failed("the interrupted run", first.returncode)
    print("\n--- the same command again: it resumes from the sharded checkpoint ---\n", flush=True)
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    if code != 0:
        return failed("the resumed run", code)
    smaller = [*command[:4], "4", *command[5:], "parallel.tensor_parallel_size=1", f"train.max_steps={TRAIN_STEPS}"]
    print(f"\n--- steps {RESHARD_AT + 1}-{TRAIN_STEPS} on 4 processes (TP=1 x PP=2 x DP=2): "
          "the checkpoint is resharded on load ---\n  " + " ".join(smaller[1:]) + "\n", flush=True)
    code = subprocess.run(smaller, cwd=REPO, env=env).returncode
    if code != 0:
        return failed("the run on the new layout", code)
    show_loss_curve(run_dir)
    return 0


def failed(what: str, code: int) -> int:
    print(f"{what} failed with exit code {code}", file=sys.stderr)
    return code


def wait_for_steps(metrics: Path, steps: int, process: subprocess.Popen) -> None:
    while process.poll() is None:
        if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.1)


def show_loss_curve(run_dir: Path) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    top = max(row["loss"] for row in steps)
    print(f"\nloss curve ({run_dir / 'metrics.jsonl'}):")
    for row in steps:
        if row["step"] == 1 or row["step"] % 5 == 0:
            bar = "#" * int(40 * row["loss"] / top)
            print(f"  step {row['step']:>3}  {row['loss']:7.4f}  {bar}")
    for row in (r for r in rows if "valid_loss" in r):
        print(f"  validation at step {row['step']}: loss {row['valid_loss']:.4f}, perplexity {row['valid_perplexity']:.0f}")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    print(f"\ncheckpoints: {', '.join(checkpoints)} in {run_dir / 'checkpoints'}")
    print(f"TensorBoard: .venv/bin/tensorboard --logdir {run_dir}")


if __name__ == "__main__":
    sys.exit(main())
