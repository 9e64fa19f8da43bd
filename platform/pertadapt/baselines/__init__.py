"""pertadapt.baselines."""
