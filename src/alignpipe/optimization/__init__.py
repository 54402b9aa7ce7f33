"""Stage 4: optimization. Sequence log-probs, objectives (a registry of pure loss functions), the trainer."""
