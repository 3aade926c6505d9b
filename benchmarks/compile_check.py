"""Does ``torch.compile`` change a training step?  Loss and every gradient, compiled against eager, per variant.

``training.compile`` (and the harness's ``--compile``) hand the model to ``torch.compile``; a compiler that
computes something else trains a different model without saying so.  This runs one forward + backward of a small
model per variant eagerly and compiled (the whole model, or each block on its own with ``--scope blocks``) on the
same weights and batch, and reports the loss difference and the worst relative gradient error per parameter
(float64 on the CPU: exact up to rounding, so anything above ~1e-10 is a different computation)::

    python benchmarks/compile_check.py --variants mac mag mal lmm --backend inductor \\
        --out benchmarks/results/compile_check_cpu.json

``--backend aot_eager`` (tracing and autograd only) and ``aot_eager_decomp_partition`` (plus inductor's
decompositions and partitioner) tell which stage a difference comes from.  Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import torch

from titans.core.models import build_model
from titans.utils.compiling import compile_fn
from titans.utils.io import atomic_write_text


def check(variant: str, backend: str, scope: str, device: str, dtype: torch.dtype, seq: int,
          memory_backend: str, dim: int = 32, heads: int = 2, window: int = 8, chunk: int = 4,
          raw: bool = False, batched_readouts: bool = False, wavefront: bool = False,
          batched_queries: bool | None = False) -> dict:
    """One training step's loss and gradients, eager vs compiled; returns the errors and the worst parameters.
    ``raw``: plain ``torch.compile`` instead of the project's :func:`~titans.utils.compiling.compile_fn` (which
    turns off inductor's in-place buffers).  ``wavefront``: the compiled side is the training step the wavefront
    runs (regional compilation, :func:`compile_blocks`; steps of four segments; MAC's deferred weight gradients
    with their per-token stand-ins), with MAC's batched read-outs if ``batched_readouts`` and its segment inputs
    made once a call if ``batched_queries`` (either implies it; None: as ``TITANS_WAVEFRONT_BATCHED_QUERIES`` says,
    on by default); the eager side the one-pass forward."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = dict(variant=variant, vocab_size=64, dim=dim, depth=3, heads=heads, window=window, persistent_tokens=2,
               memory_depth=2, memory_chunk_size=chunk, memory_layers=[1], memory_backend=memory_backend)
    ref = build_model(cfg).to(device=device, dtype=dtype)
    model = build_model(cfg).to(device=device, dtype=dtype)
    model.load_state_dict(ref.state_dict())
    compile_ = torch.compile if raw else compile_fn
    if wavefront or batched_readouts or batched_queries:
        from titans.training.wavefront import wavefront_loss
        from titans.utils.compiling import compile_blocks
        from titans.utils.switches import switch_on

        if batched_queries is None:
            batched_queries = switch_on("TITANS_WAVEFRONT_BATCHED_QUERIES")
        compile_blocks(model, backend=backend)
        scope = (f"regions (compile_blocks), the wavefront{', batched read-outs' if batched_readouts else ''}"
                 f"{', batched queries' if batched_queries else ''}")

        def run(ids, labels, use_cache):  # the same call as the model's below
            return types.SimpleNamespace(loss=wavefront_loss(model, ids, segment=4 * window,
                                                             batched_readouts=batched_readouts,
                                                             batched_queries=batched_queries))
    elif scope == "blocks":
        for i, block in enumerate(model.blocks):
            model.blocks[i] = compile_(block, backend=backend, fullgraph=True, dynamic=False)
        run = model
    else:
        run = compile_(model, backend=backend, fullgraph=True, dynamic=False)
    ids = torch.randint(0, 64, (2, seq), device=device, generator=torch.Generator(device).manual_seed(1))
    ref_loss = ref(ids, labels=ids, use_cache=False).loss
    ref_loss.backward()
    t0 = time.perf_counter()
    loss = run(ids, labels=ids, use_cache=False).loss
    loss.backward()
    seconds = time.perf_counter() - t0
    errors = {}
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        if p.grad is None and q.grad is None:
            continue
        if p.grad is None or q.grad is None:
            errors[name] = float("inf")
            continue
        errors[name] = ((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    return {"variant": variant, "backend": backend, "compile": "torch.compile" if raw else "compile_fn",
            "scope": scope, "seq": seq, "segments": seq // cfg["window"],
            "loss_error": abs(loss.item() - ref_loss.item()), "worst_grad_error": worst[0][1] if worst else 0.0,
            "worst_parameters": dict(worst), "compile_and_step_s": seconds}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["mac", "mag", "mal", "lmm"])
    ap.add_argument("--backend", nargs="+", default=["inductor"], help="torch.compile backends, one or more")
    ap.add_argument("--scope", choices=["model", "blocks"], default="model")
    ap.add_argument("--raw", action="store_true", help="plain torch.compile, without the project's inductor options "
                    "(titans.utils.compiling: in-place buffers off)")
    ap.add_argument("--seq", type=int, default=32, help="tokens per row (MAC gets seq / window segments)")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--memory-chunk", type=int, default=4)
    ap.add_argument("--memory-backend", default="chunked")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--wavefront", action="store_true",
                    help="compiled: the wavefront's step (compile_blocks), against the eager one-pass forward")
    ap.add_argument("--batched-readouts", action="store_true",
                    help="compiled: the wavefront's step with MAC's batched read-outs (compile_blocks)")
    ap.add_argument("--batched-queries", action=argparse.BooleanOptionalAction, default=None,
                    help="with --wavefront: MAC's segment inputs once a call, or not (default: as "
                         "TITANS_WAVEFRONT_BATCHED_QUERIES says, on); --batched-queries alone implies --wavefront")
    ap.add_argument("--out", default="benchmarks/results/compile_check.json")
    args = ap.parse_args(argv)
    rows = []
    for backend in args.backend:
        for variant in args.variants:
            r = check(variant, backend, args.scope, args.device, getattr(torch, args.dtype), args.seq,
                      args.memory_backend, args.dim, args.heads, args.window, args.memory_chunk, args.raw,
                      args.batched_readouts, args.wavefront, args.batched_queries)
            print(json.dumps(r), flush=True)
            rows.append(r)
    result = {"args": vars(args), "torch": torch.__version__, "rows": rows}
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print("\n| variant | backend | compile | scope | segments | loss error | worst gradient error (parameter) |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = next(iter(r["worst_parameters"]), "-")
        print(f"| {r['variant']} | {r['backend']} | {r['compile']} | {r['scope']} | {r['segments']} | "
              f"{r['loss_error']:.1e} | "
              f"{r['worst_grad_error']:.1e} ({name}) |")
    return rows


if __name__ == "__main__":
    main()
