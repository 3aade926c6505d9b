"""Titans models: MAC / MAG / MAL / LMM and the Transformer++ / SWA baselines (paper Section 4)."""

from titans.core.models.generation import GenerateOutput, SamplingConfig, generate, iter_generate
from titans.core.models.model import (
    LayerState,
    ModelState,
    TitansBlock,
    TitansLM,
    TitansOutput,
    build_model,
    ffn_mult_for_parameters,
    lm_loss,
    parameter_count,
)

__all__ = [
    "GenerateOutput", "LayerState", "ModelState", "SamplingConfig", "TitansBlock", "TitansLM", "TitansOutput",
    "build_model", "ffn_mult_for_parameters", "generate", "iter_generate", "lm_loss", "parameter_count",
]
