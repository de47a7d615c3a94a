"""A trained model in one process, for the tools: loading.py (any of a checkpoint of ours, a Hugging Face
directory or a consolidated file, to our GPT2 in evaluation mode), generation.py (sampling with a KV
cache), evaluation.py (zero-shot tasks: LAMBADA-style and multiple choice, scored by log-likelihood).

May import: model, parallel, checkpoint."""
