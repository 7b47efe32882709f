"""What the trainer families share: config -> CLI, EMA, checkpoints, schedules, sample metrics."""
