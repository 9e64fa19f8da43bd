"""pertadapt.models."""
