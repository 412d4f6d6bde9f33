"""Learning Piggyback masks: scored layers with a straight-through estimator, baselines, data, CLI."""
