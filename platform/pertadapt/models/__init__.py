"""Models: backbones, perturbation encoder, adapter (PA) with GO mask (AM), head, losses, builders."""

from pertadapt.models.build import ModelInputs, build_loss, build_model

__all__ = ["ModelInputs", "build_loss", "build_model"]
