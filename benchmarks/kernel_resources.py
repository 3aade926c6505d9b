"""Static resources of every pass of the Triton memory kernels, built for a Hopper GPU on any machine (issue 7).

Registers per thread, spilled stack bytes per thread (local memory: the backward's main cost, RESULTS.md section 6),
shared memory and tensor-core instruction counts of each launch the kernels make (forward passes, the two-pass and
three-stage backward), from a cross-compilation for ``sm_90a`` with Triton's own toolchain: no GPU needed, so
kernel restructurings can be compared before any device time is spent.  Numbers come from this machine's Triton
(the GPU may run another version, whose code generation differs somewhat); timings still need the GPU
(``memory_kernels.py --parts``).

    python benchmarks/kernel_resources.py --shape 64x128x64x2 --warps 8 --out benchmarks/results/kernel_resources.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path


def _kernels():
    from titans.core.memory import triton_kernels as tk

    if not tk.triton_available():
        raise SystemExit(f"Triton is not installed here ({tk._TRITON_ERROR})")
    return tk


def launches(D: int, E: int, C: int, L: int, N: int, residual: bool) -> list[tuple[str, object, dict]]:
    """(name, kernel, compile-time arguments) of each launch of one forward and one backward, as the launcher
    makes them (``triton_kernels._launch`` / ``_launch_stages``)."""
    tk = _kernels()
    base = dict(N=N, C=C, D=D, E=E, RESIDUAL=residual, DOT_BF16=1)
    # (the defaulted constexprs named too: a cross-compilation takes an unnamed one for a pointer argument)
    out = [(f"forward pass {m}", tk._memory_fwd_kernel, dict(base, L=L, SAVE=True, MODE=m, INNER=False))
           for m in (1, 2)]
    if L == 2:
        out += [(f"backward stage {s}", tk._memory_bwd3_kernel, dict(base, STAGE=s, RECOMPUTE=False, ACCUMULATE=True,
                                                                    INNER=False, EB=0)) for s in (0, 1, 2)]
        out.append(("backward, stages overlapped", tk._memory_bwd3_overlap_kernel, dict(base, INNER=False, EB=0)))
        # with its stage 2 by 32 hidden units (TITANS_TRITON_STAGE2_BLOCK=32; session 44, not timed)
        out += [(f"backward, stages overlapped, stage 2 by {eb} units", tk._memory_bwd3_overlap_kernel,
                 dict(base, INNER=False, EB=eb)) for eb in (E // 4,) if eb >= 16]
        # "inner saved": with TITANS_TRITON_SAVE_INNER=1 the forward's walk stores each chunk's inner forward and no
        # backward stage recomputes it (triton_kernels._save_inner)
        out.append(("forward pass 1, inner saved", tk._memory_fwd_kernel, dict(base, L=L, SAVE=True, MODE=1,
                                                                               INNER=True)))
        out.append(("backward stage 0, inner saved", tk._memory_bwd3_kernel, dict(base, STAGE=0, RECOMPUTE=False,
                                                                                  ACCUMULATE=True, INNER=True, EB=0)))
        # the core split in a walk and a read-out (the wavefront's readout_streams): stages 1 and 2 store their
        # dk / dv alone and recompute the chunk's inner forward, unless the forward saved it
        out += [(f"backward stage {s}, split core{', inner saved' if inner else ''}", tk._memory_bwd3_kernel,
                 dict(base, STAGE=s, RECOMPUTE=not inner, ACCUMULATE=False, INNER=inner, EB=0))
                for inner in (False, True) for s in (1, 2)]
        # stage 2 over the hidden units a block at a time (TITANS_TRITON_STAGE2_BLOCK, session 43; by 32 the
        # default since session 44), as the split core's walk op launches it when the forward saved the inner forward
        # (the wavefront's default)
        out += [(f"backward stage 2, split core, inner saved, {eb} units at a time", tk._memory_bwd3_kernel,
                 dict(base, STAGE=2, RECOMPUTE=False, ACCUMULATE=False, INNER=True, EB=eb))
                for eb in (E // 2, E // 4) if eb >= 16]
        # stage 0 so too (TITANS_TRITON_STAGE0_BLOCK): computing the chunk's inner forward (the read-out op's, as the
        # wavefront runs it) or reading the forward's
        out += [(f"backward stage 0{', inner saved' if inner else ''}, {eb} units at a time", tk._memory_bwd3_kernel,
                 dict(base, STAGE=0, RECOMPUTE=False, ACCUMULATE=True, INNER=inner, EB=eb))
                for inner in (False, True) for eb in (E // 2, E // 4) if eb >= 16]
    out += [(f"two-pass backward pass {m}", tk._memory_bwd_kernel, dict(base, L=L, MODE=m)) for m in (1, 2)]
    # the walks over P programs a head (TITANS_TRITON_WALK_PARTS, triton_kernels._walk_parts); 4 parts of hidden 128
    # (32 units a program) are below what the launcher takes on a GPU (MIN_WALK_UNITS), listed for comparison
    if L == 2:
        walk = dict(CLOCK=False, **tk.walk_sync_mode())  # the walks' compile-time arguments as launched
        no_res = {k: v for k, v in base.items() if k != "RESIDUAL"}
        for parts in (2, 4):
            if E // parts >= 16:
                out.append((f"forward pass 1, {parts} parts", tk._memory_walk_parts_kernel,
                            dict(base, P=parts, INNER=False, **walk)))
                out.append((f"backward stage 1, {parts} parts", tk._memory_walk_bwd_parts_kernel,
                            dict(no_res, P=parts, **walk)))
        # the walks with their programs stamped (TITANS_TRITON_WALK_CLOCK=1, a diagnostic): what the stamps cost;
        # with their flags side by side, polled with acquire reads (TITANS_TRITON_WALK_FLAGS=packed, _POLL=atomic)
        if E // 2 >= 16:
            for what, extra in (("walk clock", dict(walk, CLOCK=True)),
                                ("flags packed, polled with acquire reads",
                                 dict(walk, FS=1, POLL_LOADS=False))):
                out.append((f"forward pass 1, 2 parts, {what}", tk._memory_walk_parts_kernel,
                            dict(base, P=2, INNER=False, **extra)))
                out.append((f"backward stage 1, 2 parts, {what}", tk._memory_walk_bwd_parts_kernel,
                            dict(no_res, P=2, **extra)))
    return out


def only(rows: list, pattern: str | None) -> list:
    """The launches whose name contains ``pattern`` (all without one)."""
    return [r for r in rows if pattern is None or pattern in r[0]]


def _signature(kernel, const: dict) -> dict:
    """Pointer types of the kernels' arguments: float32 buffers, the saved chunk starts in bf16 (what the
    launcher passes with bf16 matmul operands)."""
    sig = {}
    for p in kernel.params:
        if p.name in const:
            sig[p.name] = "constexpr"
        elif p.name in ("SW1", "SW2", "SS1", "SS2") and const.get("ACCUMULATE", True):
            sig[p.name] = "*bf16"  # (the split core keeps its chunk starts in float32)
        elif p.name in ("TICKET", "FLAGS", "F"):
            sig[p.name] = "*i32"
        elif p.name == "CLK":  # the walk clock's stamps
            sig[p.name] = "*i64"
        elif p.name.startswith("DY_"):  # dy's heads and strides
            sig[p.name] = "i32"
        else:
            sig[p.name] = "*fp32"
    return sig


_SASS_AT = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)")
_SASS_LABEL = re.compile(r"\s*(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def sass_shape(sass: str) -> dict:
    """The machine code's size from a kernel's disassembly (``nvdisasm -c``): ``instructions`` in all,
    ``loop_instructions`` in the largest loop body (a label to the last branch back to it: a walk's chunk step),
    ``ldl`` / ``stl`` the local-memory loads and stores in the code (spill traffic; inside that loop as
    ``loop_ldl`` / ``loop_stl``), ``ldg`` / ``ldg_wide`` the global loads in all and of those the 64- or 128-bit
    ones (vectorised).  Why it matters: a program fetches its loop body once a turn and a straight-line
    kernel all of its code once, so a body larger than the SM's instruction cache streams its code from L2."""
    at, labels, pending = [], {}, []
    for line in sass.splitlines():
        label = _SASS_LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        ins = _SASS_AT.match(line)
        if ins:
            addr = int(ins.group(1), 16)
            labels.update((name, addr) for name in pending)
            pending = []
            at.append((addr, ins.group(2)))
    loop = (0, -1)
    for addr, text in at:
        branch = _SASS_BRANCH.search(text)
        if branch and labels.get(branch.group(1), addr + 1) <= addr:  # backward: a loop's closing branch
            start = labels[branch.group(1)]
            if addr - start > loop[1] - loop[0]:
                loop = (start, addr)
    body = [text for addr, text in at if loop[0] <= addr <= loop[1]]

    def count(op, texts):
        return sum(bool(re.search(rf"\b{op}\b", t)) for t in texts)

    texts = [t for _, t in at]
    return {"instructions": len(at), "loop_instructions": len(body), "ldl": count("LDL", texts),
            "stl": count("STL", texts), "loop_ldl": count("LDL", body), "loop_stl": count("STL", body),
            "ldg": count("LDG", texts), "ldg_wide": sum(bool(re.search(r"\bLDG\S*\.(64|128)\b", t)) for t in texts)}


def resources(kernel, const: dict, warps: int, stages: int = 1, arch: int = 90, aligned: bool = True) -> dict:
    """Cross-compile one launch and read its resource usage from the cubin (``cuobjdump -res-usage``) and its
    machine code's size from the disassembly (:func:`sass_shape`; ``code_kb`` / ``loop_kb``: 16 bytes an
    instruction on sm_90).

    ``aligned``: every pointer argument marked 16-byte aligned, as Triton's launcher specialises a kernel for the
    buffers it is given (torch's allocations are aligned), so these are the GPU's kernels.  Without it (sessions
    16-41 measured so) the compiler cannot vectorise a load: the backward walk over 2 parts had 379 scalar global
    loads a chunk step instead of 97 + 82 of 128 bits, a 79.4 KB loop body instead of 60.5, 1,240 spilled bytes
    a thread instead of 1,016 (this CPU's Triton 3.9, sm_90a)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = _signature(kernel, const)
    attrs = ({(names.index(k),): [["tt.divisibility", 16]] for k, kind in signature.items() if kind.startswith("*")}
             if aligned else None)
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps,
                                                                                    num_stages=stages))
    seconds = time.perf_counter() - t0
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tools / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    shape = sass_shape(sass)
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "shared_bytes": int(fields["SHARED"]), "wgmma": ptx.count("wgmma.mma_async"),
            "mma_sync": ptx.count("mma.sync"), **shape, "code_kb": round(shape["instructions"] * 16 / 1024, 1),
            "loop_kb": round(shape["loop_instructions"] * 16 / 1024, 1), "compile_s": round(seconds, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x128x64x2", help="DxExCxL: head dim, hidden, chunk, memory depth")
    ap.add_argument("--chunks", type=int, default=8, help="chunks per call (N; MAC's 512-token segment: 8)")
    ap.add_argument("--warps", type=int, nargs="+", default=[8])
    ap.add_argument("--residual", action="store_true")
    ap.add_argument("--only", default=None, help="the launches whose name contains this (e.g. 'parts')")
    ap.add_argument("--unaligned", action="store_true",
                    help="no pointer marked 16-byte aligned (how sessions 16-41 measured; the GPU's launcher marks "
                         "them)")
    ap.add_argument("--out", default=None, help="JSON file (a markdown table is printed)")
    args = ap.parse_args(argv)
    import triton

    D, E, C, L = (int(x) for x in args.shape.split("x"))
    rows = []
    for warps in args.warps:
        for name, kernel, const in only(launches(D, E, C, L, args.chunks, args.residual), args.only):
            rows.append({"launch": name, "warps": warps,
                         **resources(kernel, const, warps, aligned=not args.unaligned)})
            print(f"{name:28s} warps {warps:2d}: {rows[-1]}", flush=True)
    print("\n| launch | warps | registers | spilled stack B/thread | shared B | wgmma | code KB | loop body KB | "
          "local loads / stores (in the loop) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['launch']} | {r['warps']} | {r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} | "
              f"{r['wgmma']} | {r['code_kb']} | {r['loop_kb']} | {r['ldl']} / {r['stl']} ({r['loop_ldl']} / "
              f"{r['loop_stl']}) |")
    if args.out:
        record = {"date": date.today().isoformat(), "triton": triton.__version__, "target": "sm_90a",
                  "pointers_aligned": not args.unaligned,
                  "shape": {"D": D, "E": E, "C": C, "L": L, "N": args.chunks, "residual": args.residual},
                  "rows": rows}
        from titans.utils.io import atomic_write_text

        atomic_write_text(Path(args.out), json.dumps(record, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    main()
