"""Check the Triton memory kernels shape by shape on the GPU, each in its own process (a faulting kernel
cannot take the others down): max relative error of outputs and every gradient against the PyTorch core.

    python benchmarks/triton_shapes.py --out benchmarks/results/triton_shapes.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ONE = r"""
import sys, torch
from titans.core.memory.fused_update import neural_memory_update_fused
D, E, L, C = (int(x) for x in sys.argv[1:5])
B, H, T = 2, 4, 4 * C
g = torch.Generator(device="cuda").manual_seed(0)
r = lambda *s: torch.randn(*s, device="cuda", generator=g)
q, k = (torch.nn.functional.normalize(r(B, H, T, D), dim=-1) for _ in range(2))
gates = [torch.rand(B, H, T, device="cuda", generator=g) * s for s in (1 / C, 1.0, 0.05)]
dims = [D] + [E] * (L - 1) + [D]
W = [r(B, H, dims[i], dims[i + 1]) / dims[i] ** 0.5 for i in range(L)]
S = [torch.zeros_like(w) for w in W]
ins = [t.requires_grad_() for t in (q, k, r(B, H, T, D), *gates, *W, *S)]
res = {}
for impl in ("torch", "triton"):
    y, Wf, Sf = neural_memory_update_fused(*ins[:6], ins[6:6 + L], ins[6 + L:], chunk_size=C, residual=True,
                                           impl=impl)
    outs = [y, *Wf, *Sf]
    gg = torch.Generator(device="cuda").manual_seed(1)
    loss = sum((o * torch.randn(o.shape, device="cuda", generator=gg)).sum() for o in outs)
    res[impl] = outs + list(torch.autograd.grad(loss, ins))
torch.cuda.synchronize()
print("ERR", max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(res["triton"], res["torch"])))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["32x64x2x64x4", "32x64x2x64x8", "64x64x2x64x8",
                                                     "64x128x2x32x8", "64x128x2x16x8", "64x64x1x32x4",
                                                     "128x128x1x32x8", "32x32x1x64x4"],
                    help="DxExLxCxWARPS entries")
    ap.add_argument("--out", default="benchmarks/results/triton_shapes.json")
    args = ap.parse_args(argv)
    rows = []
    for shape in args.shapes:
        D, E, L, C, warps = shape.split("x")
        env = {**os.environ, "TITANS_TRITON_WARPS": warps}
        try:
            p = subprocess.run([sys.executable, "-c", ONE, D, E, L, C], env=env, capture_output=True, text=True,
                               timeout=240)
            err = float(p.stdout.split("ERR")[-1]) if "ERR" in p.stdout else None
            note = "" if err is not None else (p.stderr.strip().splitlines() or ["?"])[-1][:200]
        except subprocess.TimeoutExpired:
            err, note = None, "timeout"
        row = {"D": int(D), "E": int(E), "L": int(L), "C": int(C), "num_warps": int(warps), "max_rel_err": err,
               "note": note}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
