"""Neural long-term memory (paper Sections 3.1-3.3)."""

from titans.core.memory.functional import (
    ACTIVATIONS,
    memory_mlp,
    neural_memory_update,
    neural_memory_update_chunked,
    neural_memory_update_naive,
    retrieve,
    validate_memory_inputs,
)
from titans.core.memory.neural_memory import MemoryState, NeuralMemory, causal_depthwise_conv
from titans.core.memory.persistent_memory import PersistentMemory

__all__ = [
    "ACTIVATIONS", "MemoryState", "NeuralMemory", "PersistentMemory", "causal_depthwise_conv",
    "memory_mlp", "neural_memory_update",
    "neural_memory_update_chunked", "neural_memory_update_naive", "retrieve", "validate_memory_inputs",
]
