"""The fused memory gate (``titans.core.models.fused_gate``) against its PyTorch definition, under the Triton
interpreter (a subprocess: the variable is read when Triton is imported)."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest
import torch
from test_fused_memory import _errors, _interpreted

from titans.core.models.fused_gate import fused_gate_applies, gate_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None

_GATE_SCRIPT = textwrap.dedent("""
    import torch
    from titans.core.models.fused_gate import fused_gate, fused_gate_applies, gate_reference
    from titans.core.models.model_utils import MemoryGate

    def run(fn, y, m, wy, wm, g):
        ins = [t.detach().clone().requires_grad_() for t in (y, m, wy, wm)]
        out = fn(*ins, 1e-6)
        grads = torch.autograd.grad((out * g).sum(), ins)
        return [out, *grads]

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    # rows not a multiple of 16, dims not a power of 2
    for shape in [(2, 7, 48), (3, 16, 64), (1, 33, 512), (1, 1, 24)]:
        y, m = (torch.randn(*shape, generator=gen) * 3 for _ in range(2))
        wy, wm = (1 + 0.3 * torch.randn(shape[-1], generator=gen) for _ in range(2))
        g = torch.randn(*shape, generator=gen)
        assert fused_gate_applies(y, m)
        a, b = run(fused_gate, y, m, wy, wm, g), run(gate_reference, y, m, wy, wm, g)
        worst = max([worst] + [rel(x, z) for x, z in zip(a, b)])
    print("FP32", worst)

    # bf16 inputs under autocast (as MAC / MAG give them): computed in float32 from the inputs as they came, so equal
    # to the definition on the widened values up to the rounding of the output to the dtype the PyTorch gate gives
    # under this autocast (the CPU's keeps the norms in bf16), input gradients in bf16
    y, m = (torch.randn(4, 20, 64, generator=gen).bfloat16() for _ in range(2))
    wy, wm = (1 + 0.3 * torch.randn(64, generator=gen) for _ in range(2))
    g = torch.randn(4, 20, 64, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = run(fused_gate, y, m, wy, wm, g)
        want_dtype = gate_reference(y, m, wy, wm, 1e-6).dtype
    b = run(gate_reference, y.float(), m.float(), wy, wm, g)
    assert a[0].dtype == want_dtype and a[1].dtype == torch.bfloat16 and a[3].dtype == torch.float32, a[0].dtype
    print("AUTOCAST_DTYPE", str(want_dtype).split(".")[-1])
    print("AUTOCAST", max(rel(a[0], b[0]), rel(a[3], b[3]), rel(a[4], b[4])))
    print("AUTOCAST_INPUT_GRADS", max(rel(a[1], b[1]), rel(a[2], b[2])))

    # what the backward keeps: y and m as they came (bf16), no float32 copies of them
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused_gate(y.requires_grad_(), m.requires_grad_(), wy, wm, 1e-6)
    big = [d for d, n in saved if n == y.numel()]
    print("SAVED", ",".join(sorted(str(d).split(".")[-1] for d in big)))

    # the module picks the kernel here, and equals the PyTorch wiring
    torch.manual_seed(1)
    gate = MemoryGate(64)
    with torch.no_grad():
        gate.norm_y.weight.mul_(1.5)
        gate.norm_m.weight.add_(0.2)
    y, m = torch.randn(2, 9, 64), torch.randn(2, 9, 64)
    ref = gate.norm_y(y) * torch.sigmoid(gate.norm_m(m))
    print("MODULE", rel(gate(y, m), ref))
""")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_fused_gate_equals_the_definition_under_interpreter():
    err = _errors(_interpreted(_GATE_SCRIPT))
    assert float(err["FP32"]) <= 1e-5, err  # output and the four gradients, float32
    # output and the weight gradients: float32 where autocast widens the norms, else rounded to bf16 (the output, and
    # the gradient that reaches the kernel in the output's dtype)
    assert float(err["AUTOCAST"]) <= (1e-5 if err["AUTOCAST_DTYPE"] == "float32" else 1e-2), err
    assert float(err["AUTOCAST_INPUT_GRADS"]) <= 1e-2, err  # the kernel's rounded to bf16
    assert err["SAVED"] == "bfloat16,bfloat16", err
    assert float(err["MODULE"]) <= 1e-6, err


def test_fused_gate_is_not_taken_on_the_cpu_outside_the_interpreter(monkeypatch):
    """On the CPU the module runs the PyTorch definition (float64 tests see exactly it)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    y = torch.randn(2, 3, 8, dtype=torch.float64)
    assert not fused_gate_applies(y, y)
    assert not fused_gate_applies(y.float(), y.float())
    w = torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(gate_reference(y, y, w, w, 1e-6),
                               torch.nn.functional.rms_norm(y, (8,), eps=1e-6) *
                               torch.sigmoid(torch.nn.functional.rms_norm(y, (8,), eps=1e-6)))


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and Triton")
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_gate_on_gpu(autocast):
    """The compiled kernel on the GPU against the PyTorch definition: float32 inputs, and bf16 inputs under autocast
    (compared with the definition on the widened values, as in the interpreter test)."""
    from titans.core.models.fused_gate import fused_gate

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (3, 100, 512)
    y, m = (torch.randn(*shape, device="cuda", generator=g) * 3 for _ in range(2))
    wy, wm = (1 + 0.3 * torch.randn(shape[-1], device="cuda", generator=g) for _ in range(2))
    do = torch.randn(*shape, device="cuda", generator=g)
    if autocast:
        y, m = y.bfloat16(), m.bfloat16()

    def run(fn, cast, ctx):
        ins = [t.detach().clone().requires_grad_() for t in (y, m, wy, wm)]
        with ctx:
            out = fn(*(cast(t) for t in ins[:2]), *ins[2:], 1e-6)
        return [out, *torch.autograd.grad((out.float() * do).sum(), ins)]

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cuda", enabled=False)
    got = run(fused_gate, lambda t: t, amp)
    want = run(gate_reference, lambda t: t.float(), torch.autocast("cuda", enabled=False))
    assert fused_gate_applies(y, m)
    with amp:
        assert got[0].dtype == gate_reference(y, m, wy, wm, 1e-6).dtype  # the PyTorch gate's dtype
    for a, b in zip(got, want):
        rel = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        # bf16 values, or values computed from a bf16 output's gradient: bf16 rounding; otherwise float32
        assert rel <= (1e-2 if torch.bfloat16 in (a.dtype, got[0].dtype) else 1e-5), (a.dtype, rel)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_a_failed_gate_launch_warns_and_falls_back_to_the_definition(monkeypatch):
    """A kernel that cannot be built (a Triton without this GPU, say) must not stop training: the call warns, returns
    the PyTorch gate, and the module takes the PyTorch path from then on.  Errors that are not the launch's own pass
    through (a checkpointed region's recomputation stops with an exception raised in save_for_backward)."""
    import titans.core.models.fused_gate as fg

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise RuntimeError("PTX .version 9.9 does not support .target sm_99")
            return launch

    monkeypatch.setattr(fg, "_gate_fwd_kernel", Broken())
    monkeypatch.setattr(fg, "GATE_FAILED", [])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y, m = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    w = 1 + 0.1 * torch.randn(16)
    with pytest.warns(RuntimeWarning, match="fused memory gate failed .*sm_99"):
        out = fg.fused_gate(y, m, w, w, 1e-6)
    torch.testing.assert_close(out, gate_reference(y, m, w, w, 1e-6), rtol=0, atol=0)
    assert fg.GATE_FAILED and not fg.fused_gate_applies(y, m)

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    monkeypatch.setattr(fg, "GATE_FAILED", [])
    monkeypatch.setattr(fg._FusedGate, "apply", stop)  # not a launch error: it is raised, nothing recorded
    with pytest.raises(Stop):
        fg.fused_gate(y, m, w, w, 1e-6)
    assert not fg.GATE_FAILED
