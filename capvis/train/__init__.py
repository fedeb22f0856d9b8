"""Training: optimizers and schedules, the step, checkpoints, distributed set-up and the loop."""
