"""Infrastructure: command lines, flags and recipes, checkpoints, distributed set-up, planning, tracking, provenance, weight files, the Hub, precision."""
