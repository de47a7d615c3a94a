"""The GPT-2 trainer: model (pretrain.model), parallelism (pretrain.parallel)."""

import warnings

# megatron-core announces at import that Transformer Engine and Apex are absent; the
# layers we use from it need neither, so the message is noise in every log.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
