"""Does the memory op slow down when several run side by side, as the wavefront runs them (issue 7)?

In MAC's 65536 x 1 training step (the wavefront, three memory blocks on three CUDA streams) the backward walk over
parts took 0.386 ms a segment, against 0.271 ms timed alone (benchmarks/RESULTS.md section 6, sessions 24 and 27).
This script separates contention between the memory ops themselves from everything else in the step: it captures
in one CUDA graph the forward and backward of the Triton memory op at MAC's segment shape (batch 1, 8 heads, 512
tokens) on N streams at once (each with its own inputs), replays it, and reports the replay time and each kernel's
mean duration (torch.profiler) for every N.  If three side by side take as long as one, the walks do not contend and
the slowdown in the step comes from the other streams' kernels; if the walk's mean duration grows with N, it is the
walks (SMs, memory, or the parts' all-reduce partners).  ``--background 0 4096`` repeats every row with bf16
matmuls of 4096 x 4096 on one more stream beside the memory ops: how much a throughput kernel next door (the step's
weight-gradient and feed-forward matmuls) stretches them.  Session 28 (H200): the backward walk 0.200 ms alone,
0.247 three side by side, 0.386 in the step.  With ``TITANS_TRITON_WALK_CLOCK=1`` each row also reports what the
walks' programs did (start, partner waits, end: the harness's ``walk_clock_stats``).

``--background-code KB`` asks whether the walks slow down for want of instruction fetches: its rows put beside the
memory ops a kernel of straight-line arithmetic about KB kilobytes of machine code long (each program fetches all of
it once, as the memory backward's stage kernels do with their ~120-210 KB without a loop; the backward walk's loop
body is ~60 KB, cross-compiled for sm_90 by kernel_resources.py), then the same arithmetic as a loop of a few KB:
neither touches memory beyond its own 4 KB a program, so a walk slowed by the first and not by the second waits on
instruction fetches, not on data.

    TITANS_TRITON_BWD=split python benchmarks/memory_contention.py --background 0 4096 \
        --out benchmarks/results/memory_contention.json

Needs CUDA and Triton (it exits with a message naming what is missing otherwise).
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path


def _kernel_means(prof) -> dict[str, dict]:
    """Mean device time (us) and launches per kernel name of a profiled replay."""
    out = {}
    for e in prof.key_averages():
        if e.device_time_total > 0 and e.count:
            out[e.key[:100]] = {"mean_us": e.device_time_total / e.count, "calls": e.count}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["mean_us"] * kv[1]["calls"]))


def _code_kernel():
    """A Triton kernel of ``STEPS`` dependent multiply-adds on each of its program's 1024 floats: with ``UNROLL``
    straight-line code (cross-compiled for sm_90 at 8 warps: 1,000 steps 76 KB, 3,840 steps 291 KB, so ``STEPS`` =
    KB x 13), without it a loop (~7 KB, partly unrolled); the constants differ at every step, so no compiler folds
    the straight line into a loop."""
    import triton
    import triton.language as tl

    @triton.jit
    def _code_neighbour_kernel(X, STEPS: tl.constexpr, UNROLL: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        if UNROLL:
            for i in tl.static_range(STEPS):
                x = x * (1.0 + i * 1e-7) + i * 1e-4
        else:
            for i in range(STEPS):
                x = x * (1.0 + i * 1e-7) + i * 1e-4
        tl.store(X + offs, x)

    return _code_neighbour_kernel


CODE_BLOCK = 1024  # floats a program of the code neighbour (8 warps: four a thread)


def measure(shape: str, counts: list[int], iters: int, make_inputs, timed, background: int = 0,
            background_reps: int = 6, clock_stats=None, copy_mb: int = 0, code_kb: int = 0,
            code_loop: bool = False) -> list[dict]:
    """For each N in ``counts``: the memory op's forward + backward at ``shape`` (BxHxTxDxExCxL) on N streams in one
    CUDA graph; the replay's ms (mean of ``iters``) and the kernels' mean durations in one profiled replay.
    ``background`` > 0: a further stream in the same graph runs ``background_reps`` bf16 matmuls of two
    (background x background) matrices beside them, a throughput kernel that fills every SM (as the step's
    weight-gradient and feed-forward matmuls do next to the memory blocks' chains).  ``copy_mb`` > 0 instead: that
    stream copies a buffer of ``copy_mb`` MB ``background_reps`` times, a bandwidth neighbour (HBM when the buffers
    exceed the L2 cache, the L2 when they fit), as the step's elementwise kernels are.  ``code_kb`` > 0 instead:
    that stream launches ``background_reps`` times the straight-line kernel of :func:`_code_kernel` (about
    ``code_kb`` KB of machine code, two programs an SM), or with ``code_loop`` the same arithmetic as a loop.
    ``make_inputs`` / ``timed``: memory_kernels.py's (the same inputs and timer as its rows).  With
    ``TITANS_TRITON_WALK_CLOCK=1`` one more replay stamps the walks' programs: ``clock_stats`` of them (the
    harness's ``walk_clock_stats``) as the row's ``walk_clock``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from titans.core.memory import triton_kernels as tk
    from titans.core.memory.functional import neural_memory_update

    B, H, T, D, E, C, L = (int(x) for x in shape.split("x"))
    rows = []
    for n in counts:
        inputs = [make_inputs(B, H, T, D, E, C, L, seed=i) for i in range(n)]
        g = torch.Generator(device="cuda").manual_seed(100)
        # the loss weights made before the capture (a generator created inside it would not be registered)
        weights = []
        for ins in inputs:
            with torch.no_grad():
                y, W, S = neural_memory_update(*ins[:6], tuple(ins[6:6 + L]), tuple(ins[6 + L:]), chunk_size=C,
                                               backend="triton")
            weights.append([torch.randn(o.shape, device="cuda", generator=g) for o in (y, *W, *S)])
        streams = [torch.cuda.Stream() for _ in range(n)]
        if copy_mb:
            load = [torch.zeros(copy_mb * 2**20 // 4, device="cuda") for _ in range(2)]
        elif code_kb:
            programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count
            load = [torch.zeros(programs * CODE_BLOCK, device="cuda")]
        else:
            load = ([torch.randn(background, background, device="cuda", dtype=torch.bfloat16, generator=g)
                     for _ in range(3)] if background else [])
        beside = torch.cuda.Stream()

        code = _code_kernel() if code_kb else None

        def step(streams=streams, inputs=inputs, weights=weights, load=load, beside=beside, code=code):
            here = torch.cuda.current_stream()
            if load:
                beside.wait_stream(here)
                with torch.cuda.stream(beside):
                    for _ in range(background_reps):
                        if copy_mb:
                            load[1].copy_(load[0])
                        elif code_kb:
                            code[(load[0].numel() // CODE_BLOCK,)](load[0], STEPS=code_kb * 13,
                                                                   UNROLL=not code_loop, BLOCK=CODE_BLOCK,
                                                                   num_warps=8)
                        else:
                            torch.mm(load[0], load[1], out=load[2])
            for s, ins, w in zip(streams, inputs, weights):
                s.wait_stream(here)
                with torch.cuda.stream(s):
                    y, W, S = neural_memory_update(*ins[:6], tuple(ins[6:6 + L]), tuple(ins[6 + L:]), chunk_size=C,
                                                   backend="triton")
                    loss = sum((o * wo).sum() for o, wo in zip((y, *W, *S), w))
                    torch.autograd.grad(loss, ins)
            for s in streams + ([beside] if load else []):
                here.wait_stream(s)

        warm = torch.cuda.Stream()  # warm-up (kernel compiles, allocator) off the default stream, as capture needs
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(warm)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = timed(graph.replay, iters)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        rows.append({"streams": n, "background": background, "background_copy_mb": copy_mb,
                     "background_code_kb": code_kb, "background_code_loop": code_loop, "replay_ms": ms,
                     "kernels": _kernel_means(prof)})
        if clock_stats is not None and tk.walk_clock_on():  # this graph's stamps only: the others are not replayed
            tk.walk_clocks_reset()
            graph.replay()
            torch.cuda.synchronize()
            rows[-1]["walk_clock"] = clock_stats(tk.WALK_CLOCKS)
        print(json.dumps({"shape": shape, **{k: v for k, v in rows[-1].items() if k != "kernels"}}), flush=True)
    return rows


def _head(row: dict) -> str:
    if row.get("background_code_kb"):
        return (f"{row['streams']} side by side, {row['background_code_kb']} KB of arithmetic "
                + ("as a loop beside" if row.get("background_code_loop") else "in a straight line beside"))
    if row.get("background_copy_mb"):
        return f"{row['streams']} side by side, {row['background_copy_mb']} MB copies beside"
    return f"{row['streams']} side by side" + (f", {row['background']}^2 matmuls beside" if row.get("background")
                                               else "")


def markdown(rows: list[dict], clock_table=None) -> str:
    """A table: one column per row of :func:`measure` (streams, matmuls beside), the replay's ms, then the mean us a
    launch of each row's six longest kernels (by total time); then each row's walk clock, if it has one, through
    ``clock_table`` (the harness's ``walk_clock_table``)."""
    names = sorted({k for r in rows for k in list(r["kernels"])[:6]})
    heads = [_head(r) for r in rows]
    lines = ["| kernel | " + " | ".join(f"{h} (us)" for h in heads) + " |",
             "| --- |" + " --- |" * len(rows),
             "| whole replay (ms) | " + " | ".join(f"{r['replay_ms']:.3f}" for r in rows) + " |"]
    for name in names:
        cells = [f"{r['kernels'][name]['mean_us']:.1f}" if name in r["kernels"] else "-" for r in rows]
        lines.append(f"| `{name[:60]}` | " + " | ".join(cells) + " |")
    for r in rows:
        if r.get("walk_clock") and clock_table is not None:
            lines += ["", f"The walks' programs, {_head(r)} (TITANS_TRITON_WALK_CLOCK=1):", "",
                      clock_table(r["walk_clock"])]
    return "\n".join(lines)


def sibling(name: str):
    """The module of ``benchmarks/<name>.py``, loaded by path (benchmarks/ is not a package) and registered in
    ``sys.modules`` before it runs, as importlib's recipe does: a dataclass with string annotations (the harness's
    ``Row``) looks its module up there, and loading the harness without it failed."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1x8x512x64x128x64x2", help="BxHxTxDxExCxL (default: MAC's segment at batch 1)")
    ap.add_argument("--streams", nargs="+", type=int, default=[1, 2, 3], help="how many ops side by side")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--background", nargs="+", type=int, default=[0],
                    help="matmul sizes to run beside the memory ops on one more stream, one set of rows each "
                         "(0: none)")
    ap.add_argument("--background-copy", nargs="*", type=int, default=[],
                    help="buffer sizes in MB: one more set of rows each, with copies of that size beside the memory "
                         "ops instead of matmuls (a bandwidth neighbour)")
    ap.add_argument("--background-code", nargs="*", type=int, default=[], metavar="KB",
                    help="code sizes in KB: two more sets of rows each, with a kernel of that much straight-line "
                         "arithmetic beside the memory ops, then the same arithmetic as a loop (instruction fetch)")
    ap.add_argument("--background-reps", type=int, default=6,
                    help="matmuls (copies, code kernels) a replay on that stream")
    ap.add_argument("--out", default="benchmarks/results/memory_contention.json")
    args = ap.parse_args(argv)
    import torch

    from titans.core.memory.triton_kernels import triton_available
    from titans.utils.tensors import matmul_sm_carveout

    if not torch.cuda.is_available() or not triton_available():
        raise SystemExit("memory_contention.py needs a CUDA GPU and Triton "
                         f"(CUDA available: {torch.cuda.is_available()}, Triton: {triton_available()})")
    kernels = sibling("memory_kernels")  # its inputs and timer
    harness = sibling("harness")  # run_switches, the walk clock's statistics
    matmul_sm_carveout()  # TITANS_MATMUL_SM_CARVEOUT, when set: the background matmuls leave that many SMs free
    # one set of rows per neighbour: measure's keywords (nothing beside for background 0)
    neighbours = ([dict(background=size) for size in args.background]
                  + [dict(copy_mb=mb) for mb in args.background_copy]
                  + [dict(code_kb=kb, code_loop=loop) for kb in args.background_code for loop in (False, True)])
    rows = [r for beside in neighbours for r in measure(args.shape, args.streams, args.iters, kernels.make_inputs,
                                                        kernels.timed, background_reps=args.background_reps,
                                                        clock_stats=harness.walk_clock_stats, **beside)]
    from titans.core.memory import triton_kernels as tk
    from titans.utils.io import atomic_write_text

    result = {"date": str(date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "shape": args.shape, "backward": tk.backward_mode(),
              "env": harness.run_switches(), "rows": rows}
    out = Path(args.out)
    atomic_write_text(out, json.dumps(result, indent=2))
    table = markdown(rows, harness.walk_clock_table)
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
