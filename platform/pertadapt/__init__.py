"""pertadapt: ablation and hyperparameter platform for perturbation-response models."""

__version__ = "0.1.0"
