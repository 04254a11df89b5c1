"""Chimera's heterogeneous transformer: pure PyTorch, single-device, nothing at import time.

    from models import ModelConfig, LLM
"""
from models.config import AttnConfig, BlockConfig, ConfigError, FFNConfig, ModelConfig
from models.model import LLM, ParamCount

__all__ = ["AttnConfig", "BlockConfig", "ConfigError", "FFNConfig", "LLM", "ModelConfig", "ParamCount"]
