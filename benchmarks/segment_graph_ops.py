"""What one MAC segment step puts on the chain of segments: the ops of its compiled forward and backward graphs.

At batch 1 a MAC memory block's segments form a chain (each segment's retrieval reads the memory its predecessor
wrote), and the training step waits for it: per segment the backward's graph (one autograd node) runs as a whole
before the previous segment's can start (benchmarks/RESULTS.md section 6, sessions 21-24).  This script compiles
``TitansBlock.mac_segment`` through AOTAutograd with a backend that only records the graphs, runs one training step,
and counts each graph's ops: matmuls, the matmuls whose output has a weight's shape (weight gradients: the chain does
not need them, a candidate to defer off it), reductions, dtype copies and the memory's custom ops.  Op counts do not
depend on sizes, so the default model is small; on the CPU the memory kernels need ``TRITON_INTERPRET=1`` to enter
the graph as the custom ops the GPU runs (else the PyTorch core is traced instead).

    TRITON_INTERPRET=1 python benchmarks/segment_graph_ops.py --out benchmarks/results/segment_graph_ops.json
    TRITON_INTERPRET=1 python benchmarks/segment_graph_ops.py --defer-weight-grads   # the graphs with deferral
    TRITON_INTERPRET=1 python benchmarks/segment_graph_ops.py --defer-weight-grads --by-source  # where ops come from
    TRITON_INTERPRET=1 python benchmarks/segment_graph_ops.py --defer-weight-grads --readouts-apart  # chain / read-out
"""

from __future__ import annotations

import argparse
import collections
import json
import os
from datetime import date
from pathlib import Path

import torch

MATMULS = ("mm", "bmm", "addmm", "baddbmm")


def count_ops(gm: torch.fx.GraphModule, weight_shapes: set[tuple[int, ...]]) -> dict:
    """Op counts of an FX graph (by aten name), its matmuls and those with a weight-shaped output."""
    ops: collections.Counter = collections.Counter()
    weight_grads, shapes = 0, []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        short = name.rsplit(".", 1)[0] if name.startswith("titans.") else name.removeprefix("aten.").split(".")[0]
        ops[short] += 1
        val = node.meta.get("val")
        if short in MATMULS and isinstance(val, torch.Tensor) and tuple(val.shape) in weight_shapes:
            weight_grads += 1
            shapes.append(tuple(val.shape))
    return {"ops": sum(ops.values()), "matmuls": sum(ops[m] for m in MATMULS), "weight_shaped_matmuls": weight_grads,
            "reductions": ops["sum"] + ops["mean"], "dtype_copies": ops["_to_copy"],
            "weight_shaped": shapes, "custom_ops": sorted(k for k in ops if k.startswith("titans")),
            "by_op": dict(ops.most_common())}


def by_source(gm: torch.fx.GraphModule, top: int = 40) -> list[tuple[int, str]]:
    """The graph's ops counted by the line of this package's source they were traced from (the innermost
    ``titans/`` frame of each node's stack trace; a backward node carries its forward op's): where a graph's ops
    come from, most first."""
    import re

    import titans

    package = str(Path(titans.__file__).resolve().parent) + os.sep
    where: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.*)', node.meta.get("stack_trace") or "")
        loc = next((f"{f.removeprefix(package)}:{line} {fn}: {code.strip()[:80]}"
                    for f, line, fn, code in reversed(frames) if f.startswith(package)), "(no source line)")
        where[loc] += 1
    return [(n, loc) for loc, n in where.most_common(top)]


def _spanned_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor's elements span in memory: its size for a dense tensor, less for a broadcast view (zero
    strides: a deferred segment's parameter stand-ins span the parameter)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))) * t.element_size()


def saved_tensors(gm: torch.fx.GraphModule, top: int = 8) -> dict:
    """What a backward graph reads from its forward: its inputs that are not incoming gradients (AOTAutograd names
    those ``tangents_*``): the activations the forward kept for it (and the parameters / inputs it reads, which live
    anyway).  Their total bytes (what their elements span: a broadcast view counts as what it views) and the largest
    few (shape, dtype, MB), largest first.  Sizes scale with the model:
    compare runs of one configuration (session 31: the fused coefficients add M, G, Bc, Ml, m, Gl, Bl, Pl, which the
    PyTorch path's recomputation rebuilds in the backward)."""
    rows = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op != "placeholder" or node.name.startswith("tangents") or not isinstance(val, torch.Tensor):
            continue
        rows.append((_spanned_bytes(val), tuple(val.shape), str(val.dtype).removeprefix("torch.")))
    rows.sort(key=lambda r: -r[0])
    return {"saved": len(rows), "saved_bytes": sum(r[0] for r in rows),
            "saved_largest": [{"shape": list(shape), "dtype": dtype, "mb": round(n / 2**20, 4)}
                              for n, shape, dtype in rows[:top]]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    # a segment of 48 tokens: no activation (48 or 96 rows with the retrieved tokens) has a weight's shape by chance
    ap.add_argument("--window", type=int, default=48, help="MAC's segment")
    ap.add_argument("--memory-chunk", type=int, default=16)
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--memory-backend", default="triton" if os.environ.get("TRITON_INTERPRET") == "1" else "auto",
                    help="default: triton under TRITON_INTERPRET=1 (the custom ops the GPU runs), else auto")
    ap.add_argument("--defer-weight-grads", action="store_true",
                    help="TITANS_DEFER_WEIGHT_GRADS=1: the projections' weight gradients leave the segment graphs "
                         "(titans.utils.weight_grads)")
    ap.add_argument("--by-source", action="store_true",
                    help="also print a later segment's backward ops by the source line they come from")
    ap.add_argument("--readouts-apart", action="store_true",
                    help="the wavefront with MAC's read-outs apart (TITANS_WAVEFRONT_READOUT_STREAMS=1): the segment "
                         "step as two compiled regions, the chain's (mac_chain) and the read-out's (mac_readout)")
    ap.add_argument("--batched-queries", action="store_true",
                    help="the wavefront with MAC's retrieval inputs made once a call "
                         "(TITANS_WAVEFRONT_BATCHED_QUERIES=1), the segments in one call: the segment step's region "
                         "(or with --readouts-apart the chain's and the read-out's) and the queries' region")
    ap.add_argument("--out", default=None, help="JSON file (a summary is printed)")
    args = ap.parse_args(argv)
    os.environ["TITANS_DEFER_WEIGHT_GRADS"] = "1" if args.defer_weight_grads else "0"
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from titans.core.models.model import build_model
    from titans.utils.config import ModelConfig

    graphs: dict[str, list] = {}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, []).append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    def compiled(fn, region=""):
        return torch.compile(fn, backend=aot_autograd(fw_compiler=keep(f"{region}forward"),
                                                      bw_compiler=keep(f"{region}backward")))

    torch.manual_seed(0)
    cfg = ModelConfig(variant="mac", dim=args.dim, depth=3, heads=args.heads, window=args.window, persistent_tokens=4,
                      memory_layers=[1], memory_chunk_size=args.memory_chunk, memory_depth=2,
                      memory_backend=args.memory_backend)
    model = build_model(cfg)
    block = model.blocks[1]
    weight_shapes = {s for mod in block.modules() if isinstance(mod, torch.nn.Linear)
                     for s in (tuple(mod.weight.shape), tuple(mod.weight.shape)[::-1])}
    ids = torch.randint(0, cfg.vocab_size, (1, args.segments * args.window))
    if args.batched_queries:
        block.mac_queries = compiled(block.mac_queries, "queries ")
    if args.readouts_apart:
        from titans.training.wavefront import wavefront_loss

        block.mac_chain = compiled(block.mac_chain, "chain ")
        block.mac_readout = compiled(block.mac_readout, "readout ")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wavefront_loss(model, ids, readout_streams=True, batched_queries=args.batched_queries)
    elif args.batched_queries:  # the wavefront, all segments in one call (one queries region for them)
        from titans.training.wavefront import wavefront_loss

        block.mac_segment = compiled(block.mac_segment)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = wavefront_loss(model, ids, segment=ids.shape[1], batched_queries=True)
    else:
        block.mac_segment = compiled(block.mac_segment)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
    loss.backward()
    # one graph per distinct segment position (the first segment, any later one): the later one is the chain's
    result = {"date": str(date.today()), "torch": torch.__version__, "config": vars(args),
              "graphs": {kind: [dict(count_ops(gm, weight_shapes), by_source=by_source(gm),
                                     **(saved_tensors(gm) if kind.endswith("backward") else {})) for gm in gms]
                         for kind, gms in graphs.items()}}
    for kind, rows in result["graphs"].items():
        for i, r in enumerate(rows):
            print(f"{kind} graph {i}: {r['ops']} ops, {r['matmuls']} matmuls ({r['weight_shaped_matmuls']} with a "
                  f"weight's shape), {r['reductions']} reductions, {r['dtype_copies']} dtype copies, custom ops "
                  f"{r['custom_ops']}" + (f"; reads {r['saved']} saved tensors, {r['saved_bytes'] / 2**20:.3f} MB"
                                          if kind.endswith("backward") else ""))
    if args.by_source:  # the chain's graph: the backward of a later segment
        chain = "chain backward" if args.readouts_apart else "backward"
        print(f"{chain} graph of a later segment, ops by source line:")
        for n, loc in result["graphs"][chain][-1]["by_source"]:
            print(f"{n:5d}  {loc}")
    if args.out:
        from titans.utils.io import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
