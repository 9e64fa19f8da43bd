"""pertadapt.eval."""
