"""Layout planning: per-GPU memory and step time of a training run, before it is submitted
(tools/plan.py), and measure.py, which checks the memory model against real runs.

May import: config, model, parallel; report.py also runs training.run_check's start-up checks and reads a
teacher's size through inference.loading, so that the planner refuses what the trainer would."""
