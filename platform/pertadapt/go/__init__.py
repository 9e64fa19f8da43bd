"""pertadapt.go."""
