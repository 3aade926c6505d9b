"""Test-time recall against distance: how long the neural memory keeps one association, by forgetting rate.

No trained model is involved: the memory learns at test time (Eq. 13-14), so its reach can be measured
directly.  One key / value pair (the needle, written for one chunk of tokens) is followed by N distractor
tokens; then the needle's key is read (``M(k*)``, no update) and scored by the cosine with its value (0 is
chance, +-0.13 is the spread of a random direction in 64 dimensions).  Two kinds of distractors:

* ``filler``: a cycle of 20 fixed pairs repeated (like the passkey task's repeated sentences): the memory
  fits them and their surprise fades, so what erases the needle is mainly the forgetting gate;
* ``random``: a fresh random pair every token (like real-text haystack): every write interferes.

Each forgetting rate alpha is a row of one batch; the stream is fed in pieces with the state carried
(streaming == one pass is tested in tests/test_memory.py) and the needle is read after each distance.

    python benchmarks/memory_recall.py --out benchmarks/results/memory_recall.json --plot docs/memory_recall.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from titans.core.memory.functional import memory_mlp, neural_memory_update
from titans.utils.io import atomic_write_text


def unit(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def recall_curve(alphas: list[float], distances: list[int], kind: str, dim: int, hidden: int, chunk: int,
                 theta: float, eta: float, seed: int, depth: int = 2, distractor_lr: float = 1.0) -> dict:
    """Cosine of ``M(k*)`` with ``v*`` after each distance, one row per alpha (float64, batch = alphas), for a
    memory MLP of ``depth`` layers (dims dim -> hidden ... -> dim; depth 1 is a linear memory).  Distractors
    are written with ``distractor_lr`` x theta: what a data-dependent theta (Eq. 13) gains by writing
    unsurprising tokens weakly."""
    g = torch.Generator().manual_seed(seed)
    B = len(alphas)
    dims = [dim] + [hidden] * (depth - 1) + [dim]
    weights = [torch.randn(1, 1, dims[i], dims[i + 1], generator=g, dtype=torch.float64) / math.sqrt(dims[i])
               for i in range(depth)]
    weights = [w.expand(B, 1, *w.shape[2:]).contiguous() for w in weights]
    momentum = [torch.zeros_like(w) for w in weights]
    k_star, v_star = unit(dim, generator=g), unit(dim, generator=g)
    filler_k, filler_v = unit(20, dim, generator=g), unit(20, dim, generator=g)

    def gates(n: int, lr_scale: float = 1.0):
        lr = torch.full((B, 1, n), theta * lr_scale, dtype=torch.float64)
        mom = torch.full((B, 1, n), eta, dtype=torch.float64)
        forget = torch.tensor(alphas, dtype=torch.float64).view(B, 1, 1).expand(B, 1, n).contiguous()
        return lr, mom, forget

    def write(k: torch.Tensor, v: torch.Tensor, lr_scale: float = 1.0) -> None:  # k, v: (n, dim), every row
        nonlocal weights, momentum
        n = k.shape[0]
        kk = k.view(1, 1, n, dim).expand(B, 1, n, dim).contiguous()
        vv = v.view(1, 1, n, dim).expand(B, 1, n, dim).contiguous()
        _, weights, momentum = neural_memory_update(kk, kk, vv, *gates(n, lr_scale), weights, momentum,
                                                    chunk_size=chunk, activation="silu", residual=True)

    def read() -> list[float]:
        out = memory_mlp(k_star.view(1, 1, 1, dim).expand(B, 1, 1, dim), weights, "silu", True)
        return F.cosine_similarity(out.view(B, dim), v_star.view(1, dim), dim=-1).tolist()

    before = read()
    write(k_star.expand(chunk, dim), v_star.expand(chunk, dim))  # the needle: one chunk of the same pair
    rows, seen = {0: read()}, 0
    for d in sorted(distances):
        while seen < d:
            n = min(4096, d - seen)
            if kind == "filler":
                idx = torch.arange(seen, seen + n) % 20
                k, v = filler_k[idx], filler_v[idx]
            else:
                k, v = unit(n, dim, generator=g), unit(n, dim, generator=g)
            write(k, v, distractor_lr)
            seen += n
        rows[d] = read()
    return {"kind": kind, "before_needle": before,
            "recall": {str(d): {str(a): r[i] for i, a in enumerate(alphas)} for d, r in rows.items()}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["curves"]), figsize=(6 * len(result["curves"]), 4), squeeze=False)
    for ax, curve in zip(axes[0], result["curves"]):
        ds = sorted(int(d) for d in curve["recall"])
        for a in result["alphas"]:
            ax.plot([max(d, 1) for d in ds], [curve["recall"][str(d)][str(a)] for d in ds], marker="o",
                    label=f"alpha = {a:g}")
        ax.axhspan(-0.13, 0.13, color="grey", alpha=0.15, label="random direction (+-1 sd)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("distractor tokens after the needle")
        ax.set_ylabel("cos(M(k*), v*)")
        ax.set_title(f"{curve['kind']} distractors")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alphas", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5, 0.0])
    ap.add_argument("--distances", type=int, nargs="+", default=[256, 1024, 4096, 16384, 65536])
    ap.add_argument("--kinds", nargs="+", default=["filler", "random"], choices=["filler", "random"])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--memory-depth", type=int, default=2, help="layers of the memory MLP (1 = linear)")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--theta", type=float, default=0.02, help="inner learning rate per token")
    ap.add_argument("--eta", type=float, default=0.5, help="momentum decay")
    ap.add_argument("--distractor-lr", type=float, default=1.0,
                    help="theta of the distractor tokens as a multiple of --theta (selective writing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/memory_recall.json")
    ap.add_argument("--plot", default=None, help="PNG of recall against distance")
    args = ap.parse_args()
    if any(d % args.chunk for d in args.distances):
        ap.error(f"--distances must be multiples of --chunk {args.chunk}")
    t0 = time.perf_counter()
    curves = [recall_curve(args.alphas, args.distances, kind, args.dim, args.hidden, args.chunk, args.theta,
                           args.eta, args.seed, args.memory_depth, args.distractor_lr) for kind in args.kinds]
    result = {"args": vars(args), "alphas": args.alphas, "seconds": time.perf_counter() - t0, "curves": curves}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    head = "| distractors | alpha | " + " | ".join(f"{d:,}" for d in [0, *sorted(args.distances)]) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in range(len(args.distances) + 1)) + " |"]
    for c in curves:
        for a in args.alphas:
            vals = " | ".join(f"{c['recall'][str(d)][str(a)]:.3f}" for d in [0, *sorted(args.distances)])
            lines.append(f"| {c['kind']} | {a:g} | {vals} |")
    print("\n".join(lines))
    print(f"({result['seconds']:.1f} s; cos before the needle: "
          f"{', '.join(f'{x:.3f}' for x in curves[0]['before_needle'])})")
    if args.plot:
        plot(result, Path(args.plot))


if __name__ == "__main__":
    main()
