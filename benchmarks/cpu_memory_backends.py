"""CPU timing of the PyTorch memory backends (forward + backward of ``neural_memory_update``).

    python benchmarks/cpu_memory_backends.py --out benchmarks/results/cpu_memory_backends.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

from titans.core.memory.functional import neural_memory_update


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["4x4x512x32x64x16", "8x4x256x64x128x32"], help="BxHxTxDxExC")
    ap.add_argument("--backends", nargs="+", default=["chunked", "fused"])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cpu_memory_backends.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes:
        B, H, T, D, E, C = (int(x) for x in shape.split("x"))
        q, k, v = (torch.nn.functional.normalize(torch.randn(B, H, T, D), dim=-1).requires_grad_() for _ in range(3))
        gates = [(torch.rand(B, H, T) * s).requires_grad_() for s in (1 / C, 1.0, 0.05)]
        W = [(torch.randn(B, H, D, E) / D**0.5).requires_grad_(), (torch.randn(B, H, E, D) / E**0.5).requires_grad_()]
        for be in args.backends:
            times = []
            for _ in range(args.iters + 1):
                t = time.perf_counter()
                y, Wf, _ = neural_memory_update(q, k, v, *gates, W, chunk_size=C, backend=be)
                (y.square().sum() + Wf[0].sum()).backward()
                times.append(time.perf_counter() - t)
            row = {"shape": shape, "backend": be, "ms": 1000 * sorted(times[1:])[len(times[1:]) // 2]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": str(date.today()), "cpu": platform.processor() or platform.machine(),
                               "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print("| B x H x T x D x E x C | backend | fwd+bwd ms |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['shape']} | {r['backend']} | {r['ms']:.1f} |")


if __name__ == "__main__":
    main()
