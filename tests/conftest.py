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


@pytest.fixture
def autograd_nodes():
    """``nodes(tensor) -> list``: every node of the autograd graph behind ``tensor`` (its grad_fn and all it reaches),
    each once; for tests that check how a computation is recorded (e.g. which backward ops a loss has)."""

    from titans.utils.tensors import autograd_nodes as nodes

    return nodes
