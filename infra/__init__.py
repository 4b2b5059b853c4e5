"""Infrastructure around the training core: command lines, flags and recipes, checkpoints, distributed set-up,
memory plans, tracking, provenance, weight files, Hub downloads, precision."""
