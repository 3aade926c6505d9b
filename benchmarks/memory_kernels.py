"""Benchmark and check the memory-update implementations against each other (issue 7).

For each shape: forward and forward+backward time of ``neural_memory_update`` with the ``chunked``
(autograd), ``fused`` (hand-written backward, PyTorch loop) and ``triton`` (fused kernels) backends,
achieved TFLOP/s of the Triton kernels (a fixed count: the matmul FLOPs of the equations as the first, single-pass
kernels computed them, with the backward's recomputation; the three-stage backward recomputes less since session 16,
so its rate is of equation work, not executed instructions), the measured bf16 / tf32 matmul peak of the same GPU, and
the relative error of Triton's outputs and of every gradient against the float32 PyTorch core (the ``fused`` backend,
run for the check even when only ``triton`` is timed); the script fails when that error exceeds bf16 tolerance.

    python benchmarks/memory_kernels.py --out benchmarks/results/memory_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import date
from pathlib import Path

import torch

from titans.core.memory.functional import neural_memory_update
from titans.utils.io import atomic_write_text


def kernel_flops(B, H, T, D, E, C, L) -> tuple[float, float]:
    """Matmul FLOPs of the fused forward and backward kernels (see triton_kernels.py), whole sequence."""
    n = B * H * (T // C)
    if L == 1:
        fwd = C * D * D * 2 * 5 + C * C * D * 2 * 2
        bwd = C * D * D * 2 * 12 + C * C * D * 2 * 5
    else:
        fwd = 22 * C * D * E + 4 * C * C * (D + E)
        bwd = 62 * C * D * E + C * C * (10 * D + 12 * E)
    return n * fwd, n * bwd


def matmul_peak(dtype, n=8192, iters=20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        a @ b
    e.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (s.elapsed_time(e) / 1e3) / 1e12


def make_inputs(B, H, T, D, E, C, L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    q = torch.nn.functional.normalize(r(B, H, T, D), dim=-1)
    k = torch.nn.functional.normalize(r(B, H, T, D), dim=-1)
    v = r(B, H, T, D)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, H, T, device="cuda", generator=g)  # noqa: E731
    lr, eta, alpha = u(0.0, 1.0 / C), u(0.5, 0.99), u(0.0, 0.05)
    dims = [D] + [E] * (L - 1) + [D]
    W = [r(B, H, dims[i], dims[i + 1]) / dims[i] ** 0.5 for i in range(L)]
    S = [torch.zeros_like(w) for w in W]
    return [t.requires_grad_() for t in (q, k, v, lr, eta, alpha, *W, *S)]



def run(backend, ins, L, C, grad=True):
    q, k, v, lr, eta, alpha = ins[:6]
    y, W, S = neural_memory_update(q, k, v, lr, eta, alpha, tuple(ins[6:6 + L]), tuple(ins[6 + L:]),
                                   chunk_size=C, backend=backend)
    outs = [y, *W, *S]
    if not grad:
        return outs, None
    g = torch.Generator(device=q.device).manual_seed(1)
    loss = sum((o * torch.randn(o.shape, device=q.device, generator=g)).sum() for o in outs)
    return outs, list(torch.autograd.grad(loss, ins))


def timed(fn, iters):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


def parts(ins, L, C, iters) -> dict:
    """Where the Triton backend's forward+backward time goes: each kernel pass timed with CUDA events
    (passes 1 and 2 share a kernel name, so a profiler cannot tell them apart) and the device time of the
    whole call per kernel name (torch.profiler), which includes the PyTorch glue (gate coefficients,
    dtype copies)."""
    from torch.profiler import ProfilerActivity, profile

    from titans.core.memory import triton_kernels as tk

    times: dict[str, list] = {}
    original = tk._run

    def timed_run(kernel, grid, args, meta):  # every launch goes through _run: time each, keyed by its pass
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        original(kernel, grid, args, meta)
        e.record()
        key = f"{tk.kernel_name(kernel)} {tk.pass_name(kernel, meta)} grid {'x'.join(map(str, grid))}"
        times.setdefault(key, []).append((s, e))

    tk._run = timed_run
    try:
        for _ in range(iters):
            run("triton", ins, L, C)
        torch.cuda.synchronize()
    finally:
        tk._run = original
    passes = {k: sum(s.elapsed_time(e) for s, e in v) / len(v) for k, v in times.items()}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run("triton", ins, L, C)
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    kernels = [{"name": e.key[:100], "ms": e.device_time_total / 1e3, "calls": e.count} for e in ev[:15]]
    return {"pass_ms": passes, "kernels": kernels, "total_kernel_ms": sum(e.device_time_total for e in ev) / 1e3}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["8x8x4096x64x128x64x2", "8x8x512x64x128x64x2",
                                                     "1x8x65536x64x128x64x2", "8x8x4096x64x64x64x1",
                                                     "8x8x4096x128x128x64x1"],
                    help="BxHxTxDxExCxL entries")
    ap.add_argument("--backends", nargs="+", default=["chunked", "fused", "triton"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--parts", action="store_true", help="also break the triton backend's time down by pass and kernel")
    ap.add_argument("--out", default="benchmarks/results/memory_kernels.json")
    args = ap.parse_args(argv)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "tf32": None}
    torch.backends.cuda.matmul.allow_tf32 = True
    peaks["tf32"] = matmul_peak(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps({"matmul_peak_tflops": peaks}), flush=True)
    rows = []
    for shape in args.shapes:
        B, H, T, D, E, C, L = (int(x) for x in shape.split("x"))
        ins = make_inputs(B, H, T, D, E, C, L)
        row = {"shape": shape, "B": B, "H": H, "T": T, "D": D, "E": E, "C": C, "L": L, "ms": {}}
        ref = None
        for be in args.backends:
            if be == "chunked" and B * H * T > 8 * 8 * 4096 * 2:
                row["ms"][be] = None  # autograd over 1000+ chunks: minutes, skipped at the long shape
                continue
            try:
                with torch.no_grad():
                    f_ms = timed(lambda be=be, ins=ins, L=L, C=C: run(be, ins, L, C, grad=False), args.iters)
                fb_ms = timed(lambda be=be, ins=ins, L=L, C=C: run(be, ins, L, C), args.iters)
                torch.cuda.reset_peak_memory_stats()
                outs, grads = run(be, ins, L, C)
                peak = torch.cuda.max_memory_allocated() / 2**30
            except Exception as e:  # noqa: BLE001 - recorded, the other backends still run
                row["ms"][be] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(json.dumps({"shape": shape, "backend": be, "error": row["ms"][be]["error"]}), flush=True)
                continue
            row["ms"][be] = {"forward": f_ms, "forward_backward": fb_ms, "peak_gb": peak}
            if be == "fused":
                ref = [t.detach() for t in outs + grads]
            if be == "triton" and ref is None:  # Triton timed alone: still checked against the PyTorch core
                ref = [t.detach() for t in sum(run("fused", ins, L, C), [])]
            if be == "triton":
                names = ["y"] + [f"W{i}" for i in range(L)] + [f"S{i}" for i in range(L)] + \
                    ["dq", "dk", "dv", "dlr", "deta", "dalpha"] + [f"dW{i}" for i in range(L)] + \
                    [f"dS{i}" for i in range(L)]
                row["triton_rel_err"] = {
                    n: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                    for n, a, b in zip(names, outs + grads, ref)}
            if be == "triton":  # achieved rate: needs no reference run
                ff, bf = kernel_flops(B, H, T, D, E, C, L)
                row["triton_tflops"] = {"forward": ff / (f_ms / 1e3) / 1e12,
                                        "forward_backward": (ff * 2 + bf) / (fb_ms / 1e3) / 1e12}
            if be == "triton" and args.parts:
                row["triton_parts"] = parts(ins, L, C, args.iters)
                print(json.dumps({"shape": shape, "parts": row["triton_parts"]}), flush=True)
            print(json.dumps({"shape": shape, "backend": be, **row["ms"][be]}), flush=True)
        rows.append(row)
        ins = ref = None
        torch.cuda.empty_cache()
    from titans.core.memory import triton_kernels as tk

    result = {"date": str(date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "backward": tk.backward_mode(), "warps": os.environ.get("TITANS_TRITON_WARPS"),
              "pass_warps": os.environ.get("TITANS_TRITON_PASS_WARPS"),
              "walk_parts": os.environ.get("TITANS_TRITON_WALK_PARTS"),  # None: the default (tk._walk_parts)
              "triton_autotune": tk.tuning_report(), "matmul_peak_tflops": peaks, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    lines = ["| B x H x T, D, E, C, L | backend | fwd ms | fwd+bwd ms | peak GB | Triton TFLOP/s fwd / fwd+bwd |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for be, m in r["ms"].items():
            if not m or "error" in m:
                lines.append(f"| {r['shape']} | {be} | {(m or {}).get('error', 'skipped')} | | | |")
                continue
            tf = r.get("triton_tflops") if be == "triton" else None
            tfs = f"{tf['forward']:.1f} / {tf['forward_backward']:.1f}" if tf else ""
            lines.append(f"| {r['shape']} | {be} | {m['forward']:.2f} | {m['forward_backward']:.2f} | "
                         f"{m['peak_gb']:.2f} | {tfs} |")
    table = "\n".join(lines)
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    bad = []
    for r in rows:
        if "triton_rel_err" in r:
            worst = max(r["triton_rel_err"].values())
            print(r["shape"], "max rel err", worst)
            if not worst <= 5e-2:  # the bf16-operand bound of tests/test_fused_memory.py (NaN fails too)
                bad.append(f"{r['shape']}: {worst}")
    if bad:
        raise SystemExit(f"Triton kernels differ from the PyTorch core beyond bf16 tolerance: {bad}")
    return result


if __name__ == "__main__":
    main()
