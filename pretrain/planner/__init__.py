"""Layout planning: per-GPU memory and step time of a training run, before it is submitted."""
