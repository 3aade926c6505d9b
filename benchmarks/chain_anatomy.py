"""The anatomy of one period of a CUDA stream's chain: which kernels a repeating step runs, in order, how long each
takes and how long the stream waits before it.

At MAC 65536 x 1 each memory block's backward is a chain of 128 segment steps on one stream (issue 7's flat-scaling
target; benchmarks/RESULTS.md section 6).  ``benchmarks/harness.py --profile N --profile-trace PREFIX`` writes the
busiest streams' kernels in launch order; this script cuts a stream into periods at each launch of an anchor kernel
(default: the memory's backward walk), keeps the periods whose kernel sequence is the most common one, and reports
per position the median kernel time and the median gap before it (the stream idle: launch latency, or waiting on
another stream), then the period's totals by kind of kernel.

    python benchmarks/chain_anatomy.py TRACE.json.gz [--stream ID] [--anchor NAME] --out anatomy.json

Writes JSON and a markdown table (``--out`` with ``.md``).  ``--merged``: the anchor's launches on every stream
together, the interval from one to the next (with one chain in the step, its period even where a replayed CUDA
graph spread its kernels over many streams).  ``--phases``: the step cut at the first launch of the backward's
anchor into forward and backward, each phase's span, kernel time by kind and concurrency (kernel time / span), and
how many anchor launches start in each window of ``--window`` us (the three chains' joint pace: a rate that stays
flat from the backward's first window, where one chain runs alone, to its middle, where all three do, says the
chains share the GPU's throughput rather than wait on each other; session 43).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
from collections import Counter
from pathlib import Path

from titans.utils.io import atomic_write_text

# kinds of kernels, first match wins (substring of the kernel's name)
KINDS = (
    ("memory (Triton)", ("_memory_", "_coeff")),
    ("attention (flash / cuDNN)", ("flash", "sdpa", "fmha", "compute_dot_do_o", "cudnn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas")),
    ("inductor (Triton)", ("triton_",)),
    ("aten elementwise / reduction", ("at::native", "elementwise", "reduce_kernel")),
)


def kind_of(name: str) -> str:
    for kind, patterns in KINDS:
        if any(p in name for p in patterns):
            return kind
    return "other"


def load_trace(path: str) -> tuple[list[str], dict[str, list[list]], list[list[int]]]:
    """``(names, streams, configs)`` of a ``--profile-trace`` file: streams map id -> [[start_us, end_us, name
    index(, config index)], ...]; configs are the launch configurations ([blocks, threads a block, registers a
    thread, shared bytes a block]), empty for traces written before session 43."""
    try:
        data = json.loads(gzip.decompress(Path(path).read_bytes()))
        return data["names"], data["streams"], data.get("configs", [])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a harness --profile-trace file ({e})") from e


# what one Hopper SM holds at most (CUDA occupancy limits, compute capability 9.0)
SM_BLOCKS, SM_THREADS, SM_REGISTERS, SM_SHARED, BLOCK_RESERVED_SHARED = 32, 2048, 65536, 233472, 1024


def blocks_per_sm(threads: int, registers: int, shared: int) -> int:
    """How many blocks of this launch configuration fit on one SM at once (registers allocated 256 a warp at a
    time, 1 KB of shared memory reserved a block), at least 1."""
    warps = -(-max(threads, 1) // 32)
    by_regs = SM_REGISTERS // max(warps * -(-max(registers, 1) * 32 // 256) * 256, 1)
    by_shared = SM_SHARED // (shared + BLOCK_RESERVED_SHARED)
    return max(1, min(SM_BLOCKS, SM_THREADS // (warps * 32), by_regs, by_shared))


def sms_held(config: list[int], sms: int) -> float:
    """SMs a kernel of ``config`` holds while it runs: its blocks over the blocks an SM fits, at most every SM (a
    block of 8 warps at 255 registers a thread fills an SM's register file alone: the memory kernels' blocks)."""
    blocks, threads, registers, shared = config
    per_sm = blocks_per_sm(threads, registers, shared)
    return min(blocks, sms * per_sm) / per_sm


def sm_time_shared(spans: list[list], demands: list[float], sms: int) -> tuple[list[float], float]:
    """The SM time (SM-us) each span got with ``sms`` SMs shared: over every interval between two kernel starts or
    ends, the running kernels hold what they demand (span i: ``demands[i]``, :func:`sms_held`) while the demands
    fit, and shares of the SMs in proportion to their demands when they exceed them; plus the SM time no kernel
    held.  The shares add up to ``sms`` x the spans' extent, unlike ``sms_held`` x duration summed, which counts
    every kernel of an oversubscribed interval as holding its whole demand (session 44: 1.3-1.65x the SMs at MAC
    65536 x 1).  How the GPU really splits its SMs between concurrent kernels is not in the trace; this is the
    even-handed reading."""
    events = sorted([(sp[0], 1, i) for i, sp in enumerate(spans)] + [(sp[1], 0, i) for i, sp in enumerate(spans)])
    got = [0.0] * len(spans)
    idle = 0.0
    running: dict[int, float] = {}
    t_prev = events[0][0] if events else 0.0
    for t, starts, i in events:
        if t > t_prev:
            total = sum(running.values())
            scale = min(1.0, sms / total) if total else 0.0
            for j, d in running.items():
                got[j] += d * scale * (t - t_prev)
            idle += (sms - min(total, sms)) * (t - t_prev)
            t_prev = t
        if starts:
            running[i] = demands[i]
        else:
            running.pop(i, None)
    return got, idle


def periods(spans: list[list], anchor: int) -> list[list[list]]:
    """``spans`` cut before each launch of name index ``anchor``; what precedes the first one is dropped, and the
    last period (cut short by the end of the step) too."""
    starts = [i for i, sp in enumerate(spans) if sp[2] == anchor]
    return [spans[a:b] for a, b in zip(starts, starts[1:])]


def anatomy(names: list[str], spans: list[list], anchor: str) -> dict:
    """One period of ``spans`` (one stream, start order) at the anchor kernel whose name contains ``anchor``.

    Returns the modal period's kernels (position, name, kind, median us, median gap before it in us), how many
    periods matched it out of how many, the medians of the period's span, kernel time and gap time, and the sums
    by kind of kernel (median over periods per position, summed)."""
    hits = [i for i, n in enumerate(names) if anchor in n]
    counts = Counter(sp[2] for sp in spans if sp[2] in hits)
    if not counts:
        raise SystemExit(f"no kernel whose name contains {anchor!r} on this stream")
    anchor_id = counts.most_common(1)[0][0]
    cut = periods(spans, anchor_id)
    if not cut:
        raise SystemExit(f"{names[anchor_id]!r} runs once on this stream: no whole period")
    modal, matched = Counter(tuple(sp[2] for sp in p) for p in cut).most_common(1)[0]
    same = [p for p in cut if tuple(sp[2] for sp in p) == modal]
    rows = []
    for pos, name_id in enumerate(modal):
        dur = statistics.median(p[pos][1] - p[pos][0] for p in same)
        # the gap before the period's first kernel is the previous period's tail: taken from the next kernel after
        gap = statistics.median(p[pos][0] - p[pos - 1][1] for p in same) if pos else None
        rows.append({"pos": pos, "name": names[name_id], "kind": kind_of(names[name_id]), "us": dur, "gap_us": gap})
    # a period's span: its first kernel's start to the next period's first start (the gaps at its end included)
    nxt = {id(p): q for p, q in zip(cut, cut[1:])}
    spans_us = [nxt[id(p)][0][0] - p[0][0] for p in same if id(p) in nxt]
    kernel_us = [sum(sp[1] - sp[0] for sp in p) for p in same]
    by_kind: dict[str, dict] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {"kernels": 0, "us": 0.0, "gap_us": 0.0})
        k["kernels"] += 1
        k["us"] += r["us"]
        k["gap_us"] += r["gap_us"] or 0.0
    period_us = statistics.median(spans_us) if spans_us else None
    kernel_med = statistics.median(kernel_us)
    return {"anchor": names[anchor_id], "periods": len(cut), "matched": matched, "kernels": len(modal),
            "period_us": period_us, "kernel_us": kernel_med,
            "gap_us": period_us - kernel_med if period_us is not None else None,
            "by_kind": by_kind, "rows": rows}


def anchor_intervals(names: list[str], streams: dict[str, list[list]], anchor: str) -> dict:
    """The launches of every kernel whose name contains ``anchor``, on any stream, in start order: how many, and the
    median and quartiles of the time from one launch's start to the next's, us.  With one chain in the step (one MAC
    memory block) that interval is the chain's period, wherever a replayed graph put its kernels."""
    ids = {i for i, n in enumerate(names) if anchor in n}
    starts = sorted(sp[0] for spans in streams.values() for sp in spans if sp[2] in ids)
    if len(starts) < 2:
        raise SystemExit(f"fewer than two launches of a kernel whose name contains {anchor!r}: no interval")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    q1, median, q3 = statistics.quantiles(gaps, n=4) if len(gaps) > 1 else (gaps[0],) * 3
    return {"anchor": anchor, "launches": len(starts), "median_us": median, "q1_us": q1, "q3_us": q3,
            "first_us": starts[0], "last_us": starts[-1]}


def step_phases(names: list[str], streams: dict[str, list[list]], anchor: str = "_memory_walk_bwd",
                forward_anchor: str = "_memory_walk_parts", window_us: float = 2000.0,
                configs: list[list[int]] | None = None, sms: int = 132) -> dict:
    """The step's kernels on every stream cut at the first launch of a kernel whose name contains ``anchor`` (the
    backward's first memory walk): per phase its span (first start to last end, us), kernels, kernel time (ms) by
    kind and all told, and concurrency (kernel time / span); and per phase the launches of its anchor (the forward's:
    ``forward_anchor``) starting in each window of ``window_us`` from the phase's first one.  With the trace's launch
    ``configs``: also the SM time the kernels held (:func:`sms_held` x duration, ms) by kind and for the eight
    kernels holding most, and its share of the phase's span x ``sms`` (an upper bound: concurrent kernels each
    counted with their whole demand); and the SM time shared out (:func:`sm_time_shared`, ms) by kind and for the
    top eight, with the share no kernel held (``sm_idle_share``)."""
    spans = sorted(sp for sps in streams.values() for sp in sps)
    bwd_ids = {i for i, n in enumerate(names) if anchor in n}
    fwd_ids = {i for i, n in enumerate(names) if forward_anchor in n}
    cut = next((sp[0] for sp in spans if sp[2] in bwd_ids), None)
    if cut is None:
        raise SystemExit(f"no kernel whose name contains {anchor!r}: no backward to cut the step at")
    phases = []
    for phase, part, ids in (("forward", [sp for sp in spans if sp[0] < cut], fwd_ids),
                             ("backward", [sp for sp in spans if sp[0] >= cut], bwd_ids)):
        if not part:
            continue
        start, end = part[0][0], max(sp[1] for sp in part)
        by_kind: Counter = Counter()
        for sp in part:
            by_kind[kind_of(names[sp[2]])] += (sp[1] - sp[0]) / 1e3
        kernel_ms = sum(by_kind.values())
        starts = [sp[0] for sp in part if sp[2] in ids]
        counts = []
        if starts:
            t = starts[0]
            while t <= starts[-1]:
                counts.append(sum(t <= s < t + window_us for s in starts))
                t += window_us
        phases.append({"phase": phase, "start_us": start, "end_us": end, "span_ms": (end - start) / 1e3,
                       "kernels": len(part), "kernel_ms": kernel_ms, "concurrency": kernel_ms * 1e3 / (end - start),
                       "by_kind_ms": dict(by_kind.most_common()), "anchor_launches": len(starts),
                       "launches_per_window": counts})
        with_config = [sp for sp in part if len(sp) > 3] if configs else []
        if with_config:
            demands = [sms_held(configs[sp[3]], sms) for sp in with_config]
            shared, idle = sm_time_shared(with_config, demands, sms)
            held_kind: Counter = Counter()
            held_name: Counter = Counter()
            shared_kind: Counter = Counter()
            shared_name: Counter = Counter()
            for sp, demand, got in zip(with_config, demands, shared):
                held = (sp[1] - sp[0]) / 1e3 * demand
                held_kind[kind_of(names[sp[2]])] += held
                held_name[names[sp[2]]] += held
                shared_kind[kind_of(names[sp[2]])] += got / 1e3
                shared_name[names[sp[2]]] += got / 1e3
            total = sum(held_kind.values())
            phases[-1].update({"sm_ms_held": total, "sm_share": total * 1e3 / ((end - start) * sms),
                               "sm_ms_by_kind": dict(held_kind.most_common()),
                               "sm_ms_top": dict(held_name.most_common(8)),
                               "sm_ms_shared_by_kind": dict(shared_kind.most_common()),
                               "sm_ms_shared_top": dict(shared_name.most_common(8)),
                               "sm_idle_share": idle / ((end - start) * sms)})
    return {"anchor": anchor, "forward_anchor": forward_anchor, "window_us": window_us, "phases": phases}


def markdown(result: dict, stream: str) -> str:
    a = result
    # a stream with one whole period (the anchor twice, e.g. one of a replayed graph's streams) has no next period
    # to end its span at
    period = (f"median period {a['period_us']:.1f} us = kernels {a['kernel_us']:.1f} + gaps {a['gap_us']:.1f}"
              if a["period_us"] is not None else f"kernels {a['kernel_us']:.1f} us a period (its span unknown: no "
              "later period)")
    lines = [f"stream {stream}: anchor `{a['anchor'][:60]}`, {a['matched']} of {a['periods']} periods alike, "
             f"{a['kernels']} kernels a period; {period}", "",
             "| kind | kernels | us | gaps before them, us |", "| --- | --- | --- | --- |"]
    for kind, k in sorted(a["by_kind"].items(), key=lambda kv: -kv[1]["us"] - kv[1]["gap_us"]):
        lines.append(f"| {kind} | {k['kernels']} | {k['us']:.1f} | {k['gap_us']:.1f} |")
    lines += ["", "| # | kernel | kind | us | gap before, us |", "| --- | --- | --- | --- | --- |"]
    for r in a["rows"]:
        gap = "" if r["gap_us"] is None else f"{r['gap_us']:.1f}"
        lines.append(f"| {r['pos']} | `{r['name'][:90]}` | {r['kind']} | {r['us']:.1f} | {gap} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a harness --profile-trace file (.json.gz)")
    ap.add_argument("--stream", default=None,
                    help="stream id (default: the busiest stream that runs the anchor kernel)")
    ap.add_argument("--anchor", default="_memory_walk_bwd",
                    help="a period starts at each launch of the kernel whose name contains this")
    ap.add_argument("--merged", action="store_true",
                    help="the anchor's launches on every stream together: the interval from one to the next (one "
                         "chain in the step: its period), instead of one stream's kernels")
    ap.add_argument("--phases", action="store_true",
                    help="the step's forward and backward (cut at the anchor's first launch): span, kernel time by "
                         "kind, concurrency, and the anchor's launches a window")
    ap.add_argument("--window", type=float, default=2000.0, help="with --phases: the window, us")
    ap.add_argument("--forward-anchor", default="_memory_walk_parts",
                    help="with --phases: the forward's kernel to count a window (MAC 4096 x 8, one program a head: "
                         "_memory_fwd_kernel; its backward anchor then _memory_bwd3_overlap)")
    ap.add_argument("--sms", type=int, default=132, help="with --phases: the GPU's SMs (H100 SXM / H200: 132)")
    ap.add_argument("--out", default=None, help="JSON path; the table goes beside it as .md")
    args = ap.parse_args(argv)
    names, streams, configs = load_trace(args.trace)
    if args.phases:
        got = {"trace": args.trace, **step_phases(names, streams, args.anchor, args.forward_anchor, args.window,
                                                  configs=configs, sms=args.sms)}
        for ph in got["phases"]:
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in ph["by_kind_ms"].items())
            print(f"{ph['phase']}: {ph['span_ms']:.1f} ms span, {ph['kernels']} kernels, {ph['kernel_ms']:.1f} ms of "
                  f"kernel time (concurrency {ph['concurrency']:.2f}; {kinds}); anchor launches a "
                  f"{args.window:.0f} us window: {' '.join(map(str, ph['launches_per_window']))}")
            if "sm_ms_held" in ph:
                held = ", ".join(f"{k} {v:.0f}" for k, v in ph["sm_ms_by_kind"].items())
                print(f"  SM time held: {ph['sm_ms_held']:.0f} SM-ms, {100 * ph['sm_share']:.0f}% of {args.sms} SMs x "
                      f"the span ({held})")
                span_sm = ph["span_ms"] * args.sms
                shared = ", ".join(f"{k} {100 * v / span_sm:.0f}%" for k, v in ph["sm_ms_shared_by_kind"].items())
                print(f"  SM time shared out: {shared}, idle {100 * ph['sm_idle_share']:.0f}%")
        if args.out:
            atomic_write_text(args.out, json.dumps(got, indent=1))
        return
    if args.merged:
        got = {"trace": args.trace, **anchor_intervals(names, streams, args.anchor)}
        print(f"{got['launches']} launches of `{args.anchor}` on any stream: median interval {got['median_us']:.1f} "
              f"us (quartiles {got['q1_us']:.1f} / {got['q3_us']:.1f})")
        if args.out:
            atomic_write_text(args.out, json.dumps(got, indent=1))
        return
    if args.stream is not None:
        if args.stream not in streams:
            raise SystemExit(f"stream {args.stream} not in {args.trace} (it has {', '.join(streams)})")
        stream = args.stream
    else:
        # a chain is a stream that runs the anchor again and again; a CUDA graph's replay may instead spread one
        # chain's kernels over many streams of the driver's choosing (session 33: 986 streams), and then none does
        with_anchor = [st for st, sp in streams.items() if sum(args.anchor in names[s[2]] for s in sp) >= 2]
        if not with_anchor:
            raise SystemExit(f"no stream in {args.trace} runs a kernel whose name contains {args.anchor!r} twice: "
                             "no chain to cut into periods (the replay spread it over several streams?)")
        stream = with_anchor[0]  # the trace lists the busiest stream first
    result = {"trace": args.trace, "stream": stream, **anatomy(names, streams[stream], args.anchor)}
    table = markdown(result, stream)
    print(table)
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))
        atomic_write_text(str(Path(args.out).with_suffix(".md")), table)


if __name__ == "__main__":
    main()
