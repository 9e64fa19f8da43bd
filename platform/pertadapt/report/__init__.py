"""pertadapt.report."""
