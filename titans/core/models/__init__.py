"""Titans models: MAC / MAG / MAL / LMM and the Transformer++ / SWA baselines (paper Section 4)."""

from titans.core.models.generation import GenerateOutput, SamplingConfig, generate, iter_generate
from titans.core.models.model import LayerState, ModelState, TitansBlock, TitansLM, TitansOutput, build_model, lm_loss

__all__ = [
    "GenerateOutput", "LayerState", "ModelState", "SamplingConfig", "TitansBlock", "TitansLM", "TitansOutput",
    "build_model", "generate", "iter_generate", "lm_loss",
]
