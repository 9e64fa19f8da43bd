"""pertadapt.train."""
