"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture
def fused_call_lengths(monkeypatch) -> list[int]:
    """The token count of every call to the fused memory path during the test (a spy that still runs it)."""
    import titans.core.memory.fused_update as fu

    lengths: list[int] = []
    real = fu.neural_memory_update_fused

    def spy(q, *args, **kwargs):
        lengths.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(fu, "neural_memory_update_fused", spy)
    return lengths
