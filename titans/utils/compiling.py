"""``torch.compile`` as this project calls it: one place for the options every compiled graph of it needs.

Inductor's in-place buffers (``inplace_buffers``: an elementwise result written into the buffer of an input that
has no later use) give wrong gradients for the memory's training graphs: in float64 on the CPU (torch 2.13) the
whole compiled model's gradients differed from eager by 3.5% (MAC) to 47% (LMM) of their largest entry, with the
loss equal; tracing, decompositions and partitioning alone (``aot_eager_decomp_partition``) are exact, and so is
inductor with ``inplace_buffers=False``.  Found with ``benchmarks/compile_check.py`` and narrowed with inductor's
``CompilerBisector`` to the lowering of one gradient sum (benchmarks/RESULTS.md section 6, session 13).  The
smallest case is a memory read followed by a write of what was read, twice with the state passed on (MAC's
segment step); ``tests/test_models.py`` holds it.  Off on every device: the GPU was not checked, and the option
costs a few buffers, not kernels.  Not through here: the FlexAttention kernel (``attention_layer._compiled_flex``),
a library op whose backward runs only on CUDA, where this option was not tried.

Inductor's combo kernels (horizontal fusion) are on by default: MAC's batch-1 step is ~140 small kernels a segment
(issue 7), and fusing independent ones saves launches.  ``TITANS_INDUCTOR_OPTIONS`` (a JSON object, e.g.
``'{"combo_kernels": false}'``) changes inductor options for timing experiments; the trainer's
``training.inductor_options`` does the same from the config and wins over it.  Neither can turn ``inplace_buffers``
back on.  Measured opt-ins (MAC on an H200, benchmarks/RESULTS.md section 6, session 30): ``{"triton.enable_pdl":
true}`` (programmatic dependent launch, Hopper+) -0.0 to +2.3% at 65536 x 1 over four same-machine pairs (sessions
30-32, mean +1.1%) and no change at 4096 x 8, its float64 GPU compile check passed (session 31);
``{"coordinate_descent_tuning": true}`` +2.5% at 65536 x 1 for 2.5x the compile time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

from titans.utils.switches import switch_value

# inductor configuration for every graph this project compiles (see the module docstring)
# combo_kernels: inductor's horizontal fusion of independent kernels (one launch for several small ones); MAC on an
# H200, 270.4K vs 261.3K tokens/s at 65536 x 1 and 370.6K vs 365.7K at 4096 x 8 (session 26), compiled == eager
# in float64 on the GPU and the CPU (benchmarks/results/compile_check_*_session26_combo.json)
INDUCTOR_OPTIONS: dict[str, Any] = {"inplace_buffers": False, "combo_kernels": True}
OPTIONS_ENV = "TITANS_INDUCTOR_OPTIONS"


def env_inductor_options() -> dict[str, Any]:
    """The inductor options ``TITANS_INDUCTOR_OPTIONS`` asks for (empty when unset), checked: a JSON object whose
    keys are inductor configuration names, and never ``inplace_buffers`` (wrong gradients, see the module
    docstring).  Raises ``ValueError`` naming the variable and the bad part."""
    text = switch_value(OPTIONS_ENV) or ""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{OPTIONS_ENV}: not JSON ({err}): {text!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"{OPTIONS_ENV}: a JSON object of inductor options, got {type(options).__name__}: {text!r}")
    return check_inductor_options(options, OPTIONS_ENV)


def check_inductor_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """``options`` if every key is an inductor configuration name and ``inplace_buffers`` is not turned on (wrong
    gradients, see the module docstring); else ``ValueError`` naming ``where`` (the environment variable or config
    key they came from) and the bad keys."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown inductor option(s) {unknown}")
    if options.get("inplace_buffers", False):
        raise ValueError(f"{where}: inplace_buffers stays off (it gives wrong gradients for the memory's "
                         "training graphs; titans/utils/compiling.py)")
    return options


def inductor_options(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The inductor options a compile of the project gets: :data:`INDUCTOR_OPTIONS`, then
    :func:`env_inductor_options`, then ``extra`` (the caller's; later ones win)."""
    return {**INDUCTOR_OPTIONS, **env_inductor_options(), **(extra or {})}


def _with_options(backend: str, kwargs: dict) -> dict:
    """``kwargs`` with :func:`inductor_options` under ``options`` for the inductor backend (other backends take no
    inductor options); options the caller brings win."""
    if backend == "inductor":
        kwargs = {**kwargs, "options": inductor_options(kwargs.get("options"))}
    return kwargs


def compile_fn(fn: Callable | torch.nn.Module, backend: str = "inductor", **kwargs) -> Callable:
    """``torch.compile(fn, backend=backend, **kwargs)`` with :data:`INDUCTOR_OPTIONS` for the inductor backend
    (other backends take no inductor options).  ``kwargs`` may bring more ``options``; they win."""
    return torch.compile(fn, backend=backend, **_with_options(backend, kwargs))


def compile_blocks(model: torch.nn.Module, backend: str = "inductor", **kwargs) -> torch.nn.Module:
    """Compile each of ``model.blocks`` in place (parameter names unchanged) with the options of
    :func:`compile_fn`: regional compilation, one graph per block instead of the whole model unrolled over its
    layers and MAC segments (a fraction of the compile time; blocks of the same code share compiled code).  A block
    that names ``compile_regions`` (MAC's memory blocks, which loop over segments) gets those compiled instead of
    its whole forward: submodules through ``nn.Module.compile``, methods replaced by their compiled versions.
    Returns ``model``."""
    kwargs = _with_options(backend, kwargs)
    for block in model.blocks:
        regions = getattr(block, "compile_regions", ())
        if not regions:
            block.compile(backend=backend, **kwargs)
        for name in regions:
            part = getattr(block, name)
            if isinstance(part, torch.nn.Module):
                part.compile(backend=backend, **kwargs)
            else:
                setattr(block, name, torch.compile(part, backend=backend, **kwargs))
    return model


__all__ = ["INDUCTOR_OPTIONS", "check_inductor_options", "compile_blocks", "compile_fn", "env_inductor_options"]
