"""The eager operations of a compiled MAC training step: what runs outside inductor's graphs (issue 7's chain glue).

With its blocks compiled (``compile_blocks``: MAC's memory blocks as per-segment regions), a training step still runs
PyTorch operations between the compiled graphs: residual sums, autograd's gradient sums and casts, the copies
AOTAutograd makes of gradients that arrive with other strides than it traced, the custom memory ops' own copies.  On a
GPU each is a kernel on the stream of the block it belongs to, and at batch 1 a memory block's stream is the step's
critical path (a chain of segments; benchmarks/RESULTS.md section 6).  This counts them on any device from the
profiler's event tree, one training step after a warm-up (compiling) step: every ATen operation that no other ATen
operation, compiled graph or custom op called, split into forward and backward (with the autograd node that ran it),
and per memory-block segment.  On the CPU the memory's Triton kernels run under ``TRITON_INTERPRET=1`` (set here when
no GPU is present), small shapes::

    python benchmarks/eager_glue.py --out benchmarks/results/eager_glue_cpu.json

Writes JSON and prints a markdown table of the operations that repeat at least once a memory-block segment.  On the
CPU the wavefront runs each block whole (no feed-forward streams): the GPU's wavefront adds what its stream hand-offs
need.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch

if __name__ == "__main__" and not torch.cuda.is_available():  # before Triton is imported (it reads it then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from titans.core.models import build_model  # noqa: E402
from titans.training.wavefront import wavefront_loss  # noqa: E402
from titans.utils.compiling import compile_blocks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_model_arguments, model_config  # noqa: E402 - the harness's model from the same arguments
from op_census import VIEWS  # noqa: E402 - one list of the operations that launch no kernel


def eager_ops(events) -> Counter:
    """``(phase, op, autograd node)`` -> count over profiler ``events`` (``FunctionEvent``s with ``cpu_parent``):
    the ATen operations called by no other ATen operation, compiled graph (``## Call CompiledFxGraph``, inductor's
    wrapper) or custom op (a ``namespace::`` name other than ``aten::``); ``phase`` is ``backward`` under the autograd
    engine, else ``forward``; ``node`` the autograd function that ran it (backward) or ``""``."""
    counts: Counter = Counter()
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        parents, p = [], e.cpu_parent
        while p is not None:
            parents.append(p.name)
            p = p.cpu_parent
        if any(n.startswith("aten::") or "CompiledFxGraph" in n or ("::" in n and not n.startswith(("aten::",
               "autograd::", "torch::autograd::"))) for n in parents):
            continue
        node = next((n.split("evaluate_function: ")[-1] for n in parents if "evaluate_function" in n), "")
        counts[("backward" if any(n.startswith("autograd::engine") for n in parents) else "forward", e.name,
                node)] += 1
    return counts


def compiled_graph_calls(events) -> dict[str, int]:
    """How many times the step ran a compiled graph (inductor's ``## Call CompiledFxGraph`` wrapper event), forward
    and backward (under the autograd engine): on a GPU each call launches its graph's kernels."""
    out = {"forward": 0, "backward": 0}
    for e in events:
        if "CompiledFxGraph" not in e.name:
            continue
        p, backward = e.cpu_parent, False
        while p is not None:
            backward = backward or p.name.startswith("autograd::engine")
            p = p.cpu_parent
        out["backward" if backward else "forward"] += 1
    return out


# operations that launch no kernel: op_census's views and metadata, the metadata queries the profiler also lists, and
# what the profiler shows above the dispatcher's decomposition into those (an allocation, a view)
NO_KERNEL = VIEWS | {"result_type", "size", "stride", "new_empty", "new_empty_strided", "view_as"}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    add_model_arguments(ap, dim=64, depth=3, heads=2, window=64, memory_chunk=16, memory_layers=[1],
                        memory_backend="triton")
    ap.add_argument("--one-pass", dest="wavefront", action="store_false",
                    help="the one-pass forward instead of the wavefront's segment-major one")
    ap.add_argument("--wavefront-step", type=int, default=None, metavar="TOKENS",
                    help="tokens per wavefront step (default: 4 segments, as the GPU rows' 2048 of MAC's 512)")
    ap.add_argument("--batched-readouts", action="store_true",
                    help="the wavefront's batched read-outs (TITANS_WAVEFRONT_BATCHED_READOUTS=1)")
    ap.add_argument("--batched-queries", action=argparse.BooleanOptionalAction, default=None,
                    help="the wavefront's batched segment inputs, or not (default: as TITANS_WAVEFRONT_BATCHED_QUERIES "
                         "says, on)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    ap.add_argument("--out", default="benchmarks/results/eager_glue.json")
    args = ap.parse_args(argv)
    if args.batched_queries is None:  # recorded as it ran
        from titans.utils.switches import switch_on

        args.batched_queries = switch_on("TITANS_WAVEFRONT_BATCHED_QUERIES")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = compile_blocks(build_model(model_config(args, "mac")).to(device).train())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with amp:
            loss = (wavefront_loss(model, ids, segment=args.wavefront_step or 4 * args.window,
                                   batched_readouts=args.batched_readouts,
                                   batched_queries=args.batched_queries) if args.wavefront
                    else model(ids, labels=ids, use_cache=False).loss)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # compiles
    kernels: Counter = Counter()  # the memory's Triton launches (the custom ops run them, outside the graphs)
    tk = sys.modules.get("titans.core.memory.triton_kernels")
    run = tk._run if tk is not None else None
    if tk is not None:
        tk._run = lambda kernel, grid, a, meta: (kernels.update([kernel.fn.__name__]), run(kernel, grid, a, meta))[1]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
    finally:
        if tk is not None:
            tk._run = run
    counts = eager_ops(prof.events())
    graphs = compiled_graph_calls(prof.events())
    memory_blocks = sum(b.memory is not None for b in model.blocks)
    segments = -(-args.seq // args.window)
    per = max(1, memory_blocks * segments)
    launches = {k: v for k, v in counts.items() if k[1].removeprefix("aten::") not in NO_KERNEL}
    phase_total = {ph: sum(v for k, v in launches.items() if k[0] == ph) for ph in ("forward", "backward")}
    rows = sorted(((k, v) for k, v in launches.items() if v >= per), key=lambda kv: (kv[0][0], -kv[1], kv[0]))
    result = {"args": vars(args), "device": str(device), "memory_blocks": memory_blocks, "segments": segments,
              "launching_ops": phase_total, "all_ops": sum(counts.values()), "compiled_graph_calls": graphs,
              "memory_kernel_launches": dict(kernels.most_common()),
              "per_memory_block_segment": [{"phase": k[0], "op": k[1], "node": k[2], "count": v,
                                            "per_segment": v / per} for k, v in rows],
              "ops": [{"phase": k[0], "op": k[1], "node": k[2], "count": v} for k, v in counts.most_common()]}
    print(f"eager operations that launch kernels: {phase_total['forward']} forward, {phase_total['backward']} "
          f"backward ({memory_blocks} memory block(s) x {segments} segments); compiled graphs called: "
          f"{graphs['forward']} forward, {graphs['backward']} backward; the memory's Triton launches: "
          f"{sum(kernels.values())} ({dict(kernels.most_common())})")
    print("| phase | operation | autograd node | count | per memory-block segment |\n| --- | --- | --- | --- | --- |")
    for k, v in rows:
        print(f"| {k[0]} | {k[1]} | {k[2]} | {v} | {v / per:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
