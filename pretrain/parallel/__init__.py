"""Parallelism, applied to the model from outside: layout.py (the one validated layout object),
environment.py (launch variables, torch-free), distributed.py (process groups, the rendezvous a launcher
hosts), build.py / pipeline.py / engine.py (the model as DeepSpeed pipeline stages and engine),
deepspeed_config.py (the engine's config, torch-free).

May import: model; and checkpoint.sharded's error type, for work rank 0 does on the others' behalf."""
