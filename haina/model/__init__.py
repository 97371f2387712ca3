"""The decoder-only Transformer, its config and presets."""

from haina.model.config import PRESETS, ModelConfig
from haina.model.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "Transformer"]
