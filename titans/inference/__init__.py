"""Inference: memory sessions (save / load / offload), batched generation, memory tracing, and the
long-context evaluation grid."""

from titans.inference.memory_management import (
    MemorySession,
    MemoryStateError,
    SessionStore,
    load_state,
    save_state,
)
from titans.inference.predictor import Predictor, trace_memory

__all__ = ["MemorySession", "MemoryStateError", "Predictor", "SessionStore", "load_state", "save_state",
           "trace_memory"]
