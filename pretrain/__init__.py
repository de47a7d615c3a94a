"""The GPT-2 trainer, one package per responsibility, in the order a run uses them:

    config.py     the one config tree (YAML presets + dotted overrides), validated at load
    model/        the model math in one process: GPT-2 blocks, the loss, shapes and presets
    parallel/     parallelism applied from outside the model: the layout, process groups, DeepSpeed
    training/     the loop and what feeds it: data, optimizer, schedule, metrics, signals, distillation,
                  tasks scored mid-run, the torch-free start-up check (`--check`)
    checkpoint/   what a run leaves on disk and how it comes back: sharded checkpoints, resharding,
                  consolidated weights, the Hugging Face format
    inference/    a trained model in one process: loading, generation, zero-shot evaluation
    planner/      memory and step time of a layout before a run is submitted

Entry points: `python -m pretrain` (__main__.py, one rank) and `python -m pretrain.launch` (N local
ranks). Lower packages never import higher ones: model <- parallel <- checkpoint <- inference <-
training; config and planner stand beside them (each package's docstring lists its exceptions).
"""

import warnings

# megatron-core announces at import that Transformer Engine and Apex are absent; the
# layers we use from it need neither, so the message is noise in every log.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
