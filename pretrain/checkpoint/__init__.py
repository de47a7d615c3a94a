"""What a run leaves on disk, and how it comes back: sharded.py (every rank's shards, written atomically
with a manifest; `latest`; the checks on load), reshard.py (a checkpoint of one layout loaded on another,
through DeepSpeed's universal form), weights.py (any checkpoint to full-size tensors under canonical
names, and back), huggingface.py (Hugging Face's GPT-2 directory format).

May import: model, parallel."""
