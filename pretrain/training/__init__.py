"""The training loop and what feeds it: trainer.py (the loop: steps, evaluation, saves, stop signals),
data.py and blend.py (megatron-core datasets over the shards), optim.py and schedule.py, metrics.py
(metrics.jsonl, TensorBoard, MFU), stop_signals.py, distill.py (a teacher's logits), tasks.py
(zero-shot tasks scored mid-run), run_check.py (`python -m pretrain --check`, without torch), and
data_inspect.py (tools/inspect_data.py: the samples the trainer reads).

May import: config, model, parallel, checkpoint, inference (a run may start from a trained model's
weights and distil from a teacher), and planner.hardware (the peak FLOP/s behind MFU)."""
