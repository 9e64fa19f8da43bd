"""pertadapt.data."""
