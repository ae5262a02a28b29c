"""Image towers, text towers and the dual encoder that projects both into one latent space."""

from .dual_encoder import DualEncoder, build_dual_encoder, check_model_config

__all__ = ["DualEncoder", "build_dual_encoder", "check_model_config"]
