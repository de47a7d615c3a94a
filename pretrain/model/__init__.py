"""The model math, in one process and one readable place: gpt2.py (the blocks, with tensor-parallel
linear layers from megatron-core that are plain layers at TP 1), loss.py (cross-entropy and distillation
over the vocabulary in chunks), shape.py (GPTConfig, torch-free), presets.py (configs/*.yaml by name),
hf_mapping.py (our parameter names against Hugging Face's).

May import: nothing of pretrain but config (presets read the YAML files)."""
