"""Training: the run, checkpoints, pre-flight checks, metrics, lint, estimate, sweep, preview."""
