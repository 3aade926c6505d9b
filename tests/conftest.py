"""Fixtures shared by the test modules."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _switches_now() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("TITANS_")}


@pytest.fixture(autouse=True)
def switches_left_as_found():
    """A test that sets a ``TITANS_*`` switch for the process (not through ``monkeypatch``, or a benchmark's ``main``
    run in-process) would change every test after it: the environment is put back and the leaking test fails."""
    before = _switches_now()
    yield
    after = _switches_now()
    if after != before:
        for k in after:
            os.environ.pop(k)
        os.environ.update(before)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        pytest.fail(f"the test left TITANS_* switches changed: {changed} (use monkeypatch.setenv)")


@pytest.fixture(autouse=True)
def hardware_queues_left_as_found():
    """``CUDA_DEVICE_MAX_CONNECTIONS`` put back as it was after every test: the trainer and the harness set it for
    the process when a wavefront run asks for CUDA's hardware queues (``titans.utils.tensors.widen_hardware_queues``),
    so a test may set it without meaning to."""
    name = "CUDA_DEVICE_MAX_CONNECTIONS"
    before = os.environ.get(name)
    yield
    if before is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = before


@pytest.fixture
def queues_at_cuda_check(monkeypatch):
    """A function that, once called, records ``CUDA_DEVICE_MAX_CONNECTIONS`` at every ``torch.cuda.is_available()``
    (which starts CUDA's driver: the variable must be set before it) and returns that list."""
    import torch

    def watch() -> list:
        seen, available = [], torch.cuda.is_available
        monkeypatch.setattr(torch.cuda, "is_available",
                            lambda: seen.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")) or available())
        return seen

    return watch


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
def benchmark_module(monkeypatch):
    """``load(name) -> module``: ``benchmarks/<name>.py`` (a script, not part of the package) imported as a module,
    registered in ``sys.modules`` for the test only (a dataclass with string annotations looks its module up there,
    and a script may import another by name)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def autograd_nodes():
    """``nodes(tensor) -> list``: every node of the autograd graph behind ``tensor`` (its grad_fn and all it reaches),
    each once; for tests that check how a computation is recorded (e.g. which backward ops a loss has)."""

    from titans.utils.tensors import autograd_nodes as nodes

    return nodes
