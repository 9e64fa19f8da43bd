"""pertadapt.sweep."""
