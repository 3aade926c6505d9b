"""One benchmark harness for every model of the project (issue 7).

Measures, in one process and one run: training tokens/s (forward + backward + AdamW step, bf16 autocast
on CUDA), peak device memory, prefill tokens/s, and decode latency per token at several context lengths,
for the Titans variants, the Transformer++ / SWA baselines and, when installed, titans-pytorch's
MemoryAsContextTransformer with the same width / depth / heads / window / memory depth and chunk.

Writes JSON and a markdown table.  Example (the issue's setting)::

    python benchmarks/harness.py --dim 512 --depth 8 --heads 8 --window 512 --memory-layers 2 4 6 \\
        --memory-chunk 64 --shapes 4096x8 16384x2 65536x1 --models mac transformer swa \\
        --decode-contexts 1024 1048576 --out bench.json

``--decode-graphs`` times decoding through one replayed CUDA graph (``titans.inference.static_decode``) instead of
``model(ids, state)``; each decode row records ``decode_mode``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from titans.core.memory.triton_kernels import backward_mode as memory_backward_mode
from titans.core.memory.triton_kernels import walk_clock_on
from titans.core.models import build_model
from titans.training.wavefront import readouts_apart_by_default, wavefront_loss
from titans.utils import tensors
from titans.utils.compiling import compile_blocks, compile_fn, inductor_options
from titans.utils.config import ACTIVATION_CHECKPOINTING, TrainingConfig
from titans.utils.io import atomic_write_bytes, atomic_write_text
from titans.utils.switches import warn_unknown_switches
from titans.utils.tensors import matmul_sm_carveout, widen_hardware_queues
from titans.utils.weight_grads import deferral_wanted


@dataclass
class Row:
    model: str
    seq_len: int
    batch: int
    train_tokens_per_s: float | None = None
    train_peak_gb: float | None = None
    prefill_tokens_per_s: float | None = None
    warmup_s: float | None = None  # the warm-up steps, with any compilation and CUDA-graph capture in them
    # the loss of the first warm-up step and of the last timed step (a speed row is also a smoke test: a
    # non-finite loss marks the row as an error; random tokens, so the loss should stay near log(vocab))
    train_loss_first: float | None = None
    train_loss_last: float | None = None
    error: str | None = None
    profile: list[dict] | None = None  # top GPU kernels of one training step (``--profile``)
    # the same step's kernels on a timeline: summed time, time with any kernel running, streams (``--profile``)
    profile_timeline: dict | None = None
    # with TITANS_TRITON_WALK_CLOCK=1: the memory walks' programs in one more step (:func:`walk_clock_stats`)
    walk_clock: dict | None = None
    # with --cuda-graphs: the captured step's loss against the eager warm-up's on the same batch
    # (titans.training.trainer.capture_agreement); a row whose capture disagrees timed another computation
    capture_check: dict | None = None


# environment variables a row's numbers depend on: the project's A/B switches (TITANS_TRITON_*, TITANS_WAVEFRONT_*,
# TITANS_INDUCTOR_OPTIONS, ...) and the number of hardware work queues CUDA maps streams (and a graph's branches) to
SWITCHES = ("TITANS_", "CUDA_DEVICE_MAX_CONNECTIONS")


def run_switches() -> dict[str, str]:
    """The switches of :data:`SWITCHES` set in this process's environment, by name."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(SWITCHES)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        # the previous row's model and CUDA graphs sit in reference cycles: collect them, or their private memory
        # pools stay reserved (MAC 65536 x 1 after the 4096 x 8 rows failed its capture for lack of memory)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def add_model_arguments(ap: argparse.ArgumentParser, *, dim: int = 128, depth: int = 2, heads: int = 4,
                        window: int = 128, memory_chunk: int = 16, memory_layers: list[int] | None = None,
                        memory_backend: str = "auto",
                        memory_backend_help: str = "auto | chunked | compiled | fused | triton | naive") -> None:
    """The model options :func:`model_config` reads, with each script's defaults (the harness: a small model;
    the counting scripts: the issue's shape)."""
    ap.add_argument("--dim", type=int, default=dim)
    ap.add_argument("--depth", type=int, default=depth)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--window", type=int, default=window)
    ap.add_argument("--persistent", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--memory-depth", type=int, default=2)
    ap.add_argument("--memory-chunk", type=int, default=memory_chunk)
    ap.add_argument("--memory-layers", type=int, nargs="*", default=memory_layers)
    ap.add_argument("--memory-backend", default=memory_backend, help=memory_backend_help)
    ap.add_argument("--attention-backend", default="auto", help="auto | sdpa | blocked | flex | reference")


def model_config(args, variant: str) -> dict:
    mem_layers = args.memory_layers if args.memory_layers else None
    return dict(variant=variant, vocab_size=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads,
                window=args.window, persistent_tokens=args.persistent, memory_depth=args.memory_depth,
                memory_chunk_size=args.memory_chunk, memory_layers=mem_layers,
                memory_backend=args.memory_backend, attention_backend=args.attention_backend)


def build(args, name: str, device: torch.device):
    if name == "titans-pytorch":
        from titans_pytorch import MemoryAsContextTransformer  # optional peer, only when installed

        model = MemoryAsContextTransformer(
            num_tokens=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads,
            segment_len=args.window, num_persist_mem_tokens=args.persistent, num_longterm_mem_tokens=16,
            neural_memory_layers=tuple(i + 1 for i in (args.memory_layers or range(args.depth))),
            neural_memory_segment_len=args.memory_chunk)
        return model.to(device), (lambda ids: model(ids, return_loss=True))
    model = build_model(model_config(args, name)).set_activation_checkpointing(args.activation_checkpointing)
    model = model.to(device)
    if args.compile and args.compile_scope == "blocks":
        compile_blocks(model)
    if args.wavefront:
        return model, (lambda ids: wavefront_loss(model, ids, segment=args.wavefront_step))
    run = run_model(args, model)
    return model, (lambda ids: run(ids, labels=ids, use_cache=False).loss)


def run_model(args, model: torch.nn.Module):
    """What the timed step calls: the model compiled as a whole with ``--compile`` (``--compile-scope model``),
    else the model itself (its blocks compiled in place by :func:`build` with ``--compile-scope blocks``)."""
    return compile_fn(model) if args.compile and args.compile_scope == "model" else model


def time_training(args, name: str, seq: int, batch: int, device: torch.device) -> Row:
    row = Row(name, seq, batch)
    try:
        _reset_peak(device)
        model, loss_fn = build(args, name, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        ids = torch.randint(0, args.vocab, (batch, seq), device=device)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        if args.cuda_graphs and name != "titans-pytorch":
            from titans.training.trainer import graphed_loss

            # the step build() made, captured: with --wavefront the segment-major forward (sessions 19-20 captured
            # the one-pass forward here whatever --wavefront said: those "wavefront" rows were one-pass rows)
            graphed = graphed_loss(run_model(args, model), ids, torch.bfloat16, wavefront=args.wavefront,
                                   wavefront_step=args.wavefront_step)
            row.capture_check = graphed.capture_check

            def loss_fn(x):
                return graphed(x, x)
            amp = nullcontext()

        def step():
            with amp:
                loss = loss_fn(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        t0 = time.perf_counter()
        for i in range(args.warmup):
            loss = step()
            if i == 0:
                row.train_loss_first = loss.float().item()
        _sync(device)
        row.warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(args.iters):
            loss = step()
        _sync(device)
        dt = (time.perf_counter() - t0) / args.iters
        row.train_loss_last = loss.float().item()
        if row.train_loss_first is None:  # no warm-up steps
            row.train_loss_first = row.train_loss_last
        if not (math.isfinite(row.train_loss_first) and math.isfinite(row.train_loss_last)):
            row.error = f"non-finite loss ({row.train_loss_first} first, {row.train_loss_last} last)"
        row.train_tokens_per_s = batch * seq / dt
        row.train_peak_gb = _peak_gb(device)
        # before the prefill (under --compile a further compilation): a step killed by its time limit keeps this
        print(f"trained {name} {seq} x {batch}: {row.train_tokens_per_s:,.0f} tokens/s, peak "
              f"{_fmt(row.train_peak_gb, 2)} GB, warm-up {row.warmup_s:.1f} s, loss {row.train_loss_first:.3f} -> "
              f"{row.train_loss_last:.3f}", flush=True)
        if device.type == "cuda" and walk_clock_on():
            row.walk_clock = walk_clock_step(step, device)
        if args.profile:
            trace = f"{args.profile_trace}.{name}_{seq}x{batch}.json.gz" if args.profile_trace else None
            row.profile, row.profile_timeline = profile_step(step, device, args.profile, trace)
        if name != "titans-pytorch" and args.prefill:
            model.eval()
            with torch.no_grad(), amp:
                model(ids[:1], use_cache=True)
                _sync(device)
                t0 = time.perf_counter()
                model(ids[:1], use_cache=True)
                _sync(device)
            row.prefill_tokens_per_s = seq / (time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        row.error = "out of memory"
    except Exception as e:  # noqa: BLE001 - a benchmark row records the failure and goes on
        row.error = f"{type(e).__name__}: {e}"[:200]
        traceback.print_exc()  # the row keeps the message; the log keeps where it came from
    _reset_peak(device)
    return row


# walk_clock_stats's per-program measures, in its table's order
CLOCK_COLUMNS = ("span", "program", "late_partner", "worst_late_partner", "paired", "first_sync", "start_spread",
                 "all_reduce", "outside")


def walk_clock_stats(entries: list[tuple[str, int, torch.Tensor]]) -> dict[str, dict]:
    """What the memory walks' programs did, per walk kind ("forward" / "backward"), from the stamps of
    ``titans.core.memory.triton_kernels.WALK_CLOCKS`` (kind, parts P, (BH * P, 5) int64: each program's start, its
    first all-reduce done, its end - GPU clock, ns - its SM and the ns it spent in all-reduces).  Entries without
    stamps (zeroed by ``walk_clocks_reset`` and not run since) are left out.  Per kind: the launches, and their
    means (us) of ``span`` (a launch's first program start to its last program end), ``program`` (a program's start
    to its end), ``late_partner`` (per head, its last part's start after its first part's: how long the first spun,
    holding an SM, waiting for a partner to be given one), ``worst_late_partner`` (the worst over the launches, not
    a mean), ``paired`` (a program's end after its head's last start: the walk once all its parts run),
    ``first_sync`` (a program's start to its first all-reduce done),
    ``start_spread`` (a launch's last program start after its first), ``all_reduce`` (a program's time in its
    all-reduces: its tile stored, its flag published, its partners' awaited, the slots read), ``outside`` (a
    program's time outside them: its own loads, stores and arithmetic) and ``sms`` (distinct SMs a launch)."""
    out: dict[str, dict] = {}
    for kind in sorted({k for k, _, _ in entries}):
        rows = []
        for _, P, stamps in (e for e in entries if e[0] == kind):
            s = stamps.detach().cpu().double().view(-1, P, 5)
            if not bool((s[..., 0] > 0).all()):
                continue
            start, synced, end = s[..., 0], s[..., 1], s[..., 2]
            late = start.amax(1) - start.amin(1)
            rows.append([float(x) for x in (end.max() - start.min(), (end - start).mean(), late.mean(), late.max(),
                                             (end - start.amax(1, keepdim=True)).mean(), (synced - start).mean(),
                                             start.max() - start.min(), s[..., 4].mean(),
                                             (end - start - s[..., 4]).mean(), s[..., 3].unique().numel())])
        if rows:
            mean = torch.tensor(rows, dtype=torch.float64).mean(0)
            us = {f"{n}_us": float(mean[i]) / 1e3 for i, n in enumerate(CLOCK_COLUMNS)}
            out[kind] = {"launches": len(rows), **us, "worst_late_partner_us": max(r[3] for r in rows) / 1e3,
                         "sms": float(mean[-1])}
    return out


def walk_clock_step(step, device: torch.device) -> dict[str, dict]:
    """One more training ``step`` with the walk clock's earlier stamps zeroed: :func:`walk_clock_stats` of it."""
    from titans.core.memory import triton_kernels

    triton_kernels.walk_clocks_reset()
    _sync(device)
    step()
    _sync(device)
    stats = walk_clock_stats(triton_kernels.WALK_CLOCKS)
    for kind, st in stats.items():
        print(f"walk clock, {kind}: {st['launches']} launches, span {st['span_us']:.1f} us, program "
              f"{st['program_us']:.1f}, late partner {st['late_partner_us']:.1f} (worst "
              f"{st['worst_late_partner_us']:.1f}), paired {st['paired_us']:.1f}, first sync {st['first_sync_us']:.1f},"
              f" start spread {st['start_spread_us']:.1f}, in all-reduces {st['all_reduce_us']:.1f}, outside "
              f"{st['outside_us']:.1f}, {st['sms']:.1f} SMs", flush=True)
    return stats


def walk_clock_table(stats: dict[str, dict]) -> str:
    """:func:`walk_clock_stats` as a markdown table, one row per walk kind."""
    lines = ["| walk | launches | " + " | ".join(f"{c.replace('_', ' ')} us" for c in CLOCK_COLUMNS) + " | SMs |",
             "| --- " * (len(CLOCK_COLUMNS) + 3) + "|"]
    for kind, st in stats.items():
        lines.append(f"| {kind} | {st['launches']} | " + " | ".join(f"{st.get(c + '_us', float('nan')):.1f}"
                                                                   for c in CLOCK_COLUMNS) + f" | {st['sms']:.1f} |")
    return "\n".join(lines)


def profile_step(step, device: torch.device, top: int, trace: str | None = None) -> tuple[list[dict], dict | None]:
    """Device time per kernel name over one training step (torch.profiler), largest first, and the kernels' timeline
    (:func:`kernel_overlap`; None off CUDA).  With torch 2.11 on an H200 the profiler lists the kernels a CUDA graph
    replays one by one too (session 20: 82,310 kernels of a graphed MAC 65536 x 1 step).  ``trace``: also write
    every stream's kernels in launch order to that gzip JSON file (:func:`write_stream_trace`;
    ``benchmarks/chain_anatomy.py`` reads it)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(device)
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0 and
              (device.type != "cuda" or e.device_type.name == "CUDA")]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    kernels = [{"name": e.key[:120], "ms": getattr(e, attr) / 1e3, "calls": e.count,
                "share": getattr(e, attr) / total} for e in events[:top]]
    if device.type != "cuda":
        return kernels, None
    spans = [(e.time_range.start, e.time_range.end, e.device_resource_id, e.name) for e in prof.events()
             if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start]
    timeline = kernel_overlap(spans)
    timeline["beside"] = {pattern: kernels_beside(spans, pattern) for pattern in BESIDE}
    if trace:
        # Kineto's Chrome trace also has each kernel's launch configuration (grid, block, registers, shared memory):
        # the trace keeps it, so that chain_anatomy.py --phases can say how many SMs each kernel held
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            launches = kernel_launches(f"{tmp}/trace.json")
        write_stream_trace(launches or spans, trace)
    return kernels, timeline


def kernel_launches(chrome_trace: str) -> list[tuple]:
    """Every GPU kernel of a ``torch.profiler`` Chrome trace file as (start_us, end_us, stream, name, (blocks,
    threads a block, registers a thread, shared memory bytes a block)): Kineto writes a kernel's launch configuration
    in its ``args`` (``grid``, ``block``, ``registers per thread``, ``shared memory``)."""
    from math import prod

    events = json.loads(Path(chrome_trace).read_text()).get("traceEvents", [])
    out = []
    for ev in events:
        if ev.get("cat") != "kernel" or ev.get("ph") != "X" or not ev.get("dur"):
            continue
        a = ev.get("args", {})
        config = (prod(_dims(a.get("grid"))), prod(_dims(a.get("block"))), int(a.get("registers per thread", 0)),
                  int(a.get("shared memory", 0)))
        out.append((ev["ts"], ev["ts"] + ev["dur"], a.get("stream", ev.get("tid")), ev["name"], config))
    return out


def _dims(value) -> list[int]:
    """A launch dimension of a Chrome-trace kernel event, a list ``[x, y, z]`` or its text ``"[x, y, z]"``."""
    if isinstance(value, str):
        return [int(v) for v in value.strip("[]() ").split(",") if v.strip()]
    return [int(v) for v in value] if value else [0]


def write_stream_trace(spans: list[tuple], path: str) -> None:
    """Every stream's kernels (``spans``: (start, end, stream, name[, launch configuration]), microseconds) as gzip
    JSON: ``{"names": [kernel name, ...], "configs": [[blocks, threads, registers, shared bytes], ...], "streams":
    {stream: [[start, end, name index(, config index)], ...] in start order}}``, busiest stream first (a replayed
    CUDA graph may spread one chain over many streams: session 33, ~990 of them); written atomically."""
    import gzip

    by_stream: dict[int, list[tuple]] = {}
    for sp in spans:
        by_stream.setdefault(sp[2], []).append(sp)
    busiest = sorted(by_stream, key=lambda st: -sum(sp[1] - sp[0] for sp in by_stream[st]))
    names: dict[str, int] = {}
    configs: dict[tuple, int] = {}

    def row(sp: tuple) -> list:
        out = [sp[0], sp[1], names.setdefault(sp[3], len(names))]
        if len(sp) > 4:
            out.append(configs.setdefault(tuple(sp[4]), len(configs)))
        return out

    streams = {str(st): [row(sp) for sp in sorted(by_stream[st], key=lambda sp: sp[:2])] for st in busiest}
    data = gzip.compress(json.dumps({"names": list(names), "configs": [list(c) for c in configs],
                                     "streams": streams}).encode())
    atomic_write_bytes(Path(path), data)


# the busiest streams whose kernels are listed by name (``top_kernels``): the chains of a wavefront step
STREAM_DETAIL, STREAM_TOP = 8, 15


def kernel_overlap(spans: list[tuple]) -> dict:
    """How much the GPU's kernels ran side by side: ``spans`` are (start, end, stream) in microseconds, or
    (start, end, stream, kernel name).

    Returns kernel_ms (summed kernel time), busy_ms (time with at least one kernel running: the union of the
    spans), span_ms (first start to last end), concurrency = kernel_ms / busy_ms (1.0: one kernel at a time),
    idle_share = 1 - busy_ms / span_ms (the device waiting on the host or on nothing), the number of streams, and
    ``per_stream``: for each stream (busiest first) its kernels, kernel_ms and span_ms (its first kernel's start to
    its last kernel's end); a stream whose kernel_ms is close to the step's span_ms is the critical path (its
    kernels run back to back), one far below it spends its span waiting on other streams.  With names, the
    ``STREAM_DETAIL`` busiest streams also list ``top_kernels`` (name, calls, ms; the ``STREAM_TOP`` longest in
    total): what a chain is made of."""
    if not spans:
        return {"kernel_ms": 0.0, "busy_ms": 0.0, "span_ms": 0.0, "concurrency": None, "idle_share": None,
                "streams": 0, "kernels": 0, "per_stream": []}
    busy, end = 0.0, float("-inf")
    for a, b, *_ in sorted(spans, key=lambda sp: sp[:2]):
        if b <= end:
            continue
        busy += b - max(a, end)
        end = b
    kernel = sum(sp[1] - sp[0] for sp in spans)
    span = max(sp[1] for sp in spans) - min(sp[0] for sp in spans)
    by_stream: dict[int, list[tuple]] = {}
    for sp in spans:
        by_stream.setdefault(sp[2], []).append(sp)
    per_stream = sorted(({"stream": st, "kernels": len(v), "kernel_ms": sum(sp[1] - sp[0] for sp in v) / 1e3,
                          "span_ms": (max(sp[1] for sp in v) - min(sp[0] for sp in v)) / 1e3}
                         for st, v in by_stream.items()), key=lambda r: -r["kernel_ms"])
    for row in per_stream[:STREAM_DETAIL]:
        named = [sp for sp in by_stream[row["stream"]] if len(sp) > 3]
        if named:
            totals: dict[str, list[float]] = {}
            for a, b, _, name in named:
                entry = totals.setdefault(name[:120], [0, 0.0])
                entry[0] += 1
                entry[1] += (b - a) / 1e3
            row["top_kernels"] = [{"name": n, "calls": c, "ms": ms} for n, (c, ms) in
                                  sorted(totals.items(), key=lambda kv: -kv[1][1])[:STREAM_TOP]]
    return {"kernel_ms": kernel / 1e3, "busy_ms": busy / 1e3, "span_ms": span / 1e3,
            "concurrency": kernel / busy if busy else None, "idle_share": 1 - busy / span if span else None,
            "streams": len(by_stream), "kernels": len(spans), "per_stream": per_stream}


# the memory kernels whose neighbours a timeline lists (``beside``): the longest kernels of a wavefront step's chains,
# which run 1.4-1.9x longer there than alone (benchmarks/RESULTS.md section 6, session 28)
BESIDE = ("_memory_walk_bwd_parts_kernel", "_memory_bwd3_kernel", "_memory_walk_parts_kernel")


def kernels_beside(spans: list[tuple], pattern: str, top: int = STREAM_TOP) -> dict | None:
    """What ran beside the kernels whose name contains ``pattern``; ``spans`` as for :func:`kernel_overlap`, with
    names.  Returns their launches and summed ms, ``concurrent`` (the other kernels running at the same time,
    averaged over their time: 0 = always alone) and ``neighbours``: per kernel name, how long it overlapped them
    (ms, and as a share of their time; the ``top`` largest).  Their own kind on other streams counts as a neighbour
    (the other memory blocks' walks).  None when no kernel matches."""
    import numpy as np

    hits = [i for i, sp in enumerate(spans) if len(sp) > 3 and pattern in sp[3]]
    if not hits:
        return None
    starts = np.array([sp[0] for sp in spans], dtype=np.float64)
    ends = np.array([sp[1] for sp in spans], dtype=np.float64)
    names = [sp[3][:120] if len(sp) > 3 else "?" for sp in spans]
    overlap: dict[str, float] = {}
    for i in hits:  # a vectorised pass over every span per target: no assumption on how long a neighbour runs
        shared = np.minimum(ends, ends[i]) - np.maximum(starts, starts[i])
        shared[i] = 0.0
        for j in np.nonzero(shared > 0)[0]:
            overlap[names[j]] = overlap.get(names[j], 0.0) + float(shared[j])
    total = float(sum(ends[i] - starts[i] for i in hits))
    return {"launches": len(hits), "ms": total / 1e3, "concurrent": sum(overlap.values()) / total,
            "neighbours": [{"name": n, "ms": o / 1e3, "share": o / total}
                           for n, o in sorted(overlap.items(), key=lambda kv: -kv[1])[:top]]}


@torch.no_grad()
def time_decode(args, name: str, context: int, device: torch.device) -> dict:
    """Per-token decode latency and state size after ``context`` tokens of prefill (streamed in pieces).

    ``--decode-graphs`` times the static step of ``titans.inference.static_decode`` (one CUDA graph replayed per
    token on CUDA, eager elsewhere) instead of ``model(ids, state)``; ``decode_mode`` records which ran."""
    out = {"model": name, "context": context, "decode_mode": "eager"}
    try:
        model = build_model(model_config(args, name)).to(device).eval()
        if args.decode_snapshot and device.type == "cuda":  # allocation stacks, for live_after_prefill below
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        state = None
        piece = args.prefill_piece
        with amp:
            done = 0
            while done < context:
                n = min(piece, context - done)
                state = model(torch.randint(0, args.vocab, (1, n), device=device), state=state).state
                done += n
            tok = torch.randint(0, args.vocab, (1, 1), device=device)
            warm = 5
            if args.decode_graphs:
                from titans.inference.static_decode import GraphedDecoder

                # the ring of full causal attention holds every position the run reaches
                decoder = GraphedDecoder(model, state, max_len=context + warm + args.decode_steps + 1)
                out["decode_mode"] = "cuda-graph" if decoder.use_graphs else "static-eager"

                def step():
                    decoder.step(tok)
                    return decoder.state
            else:
                def step():
                    nonlocal state_w
                    state_w = model(tok, state=state_w).state
                    return state_w
            state_w = state
            for _ in range(warm):
                step()
            if args.decode_snapshot and device.type == "cuda":
                out["live_after_prefill"] = live_allocations(torch.cuda.memory._snapshot())
            _reset_peak(device)
            _sync(device)
            times = []
            for _ in range(args.decode_steps):
                t0 = time.perf_counter()
                st = step()
                _sync(device)
                times.append(time.perf_counter() - t0)
        times.sort()
        out.update(latency_ms=1000 * times[len(times) // 2], state_mb=st.nbytes() / 2**20,
                   peak_gb=_peak_gb(device))
    except torch.OutOfMemoryError:
        out["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    finally:
        if args.decode_snapshot and device.type == "cuda":  # also after a failed context: the next one starts clean
            torch.cuda.memory._record_memory_history(enabled=None)
    return out


def live_allocations(snapshot: dict, top: int = 12) -> list[dict]:
    """The live GPU allocations of a ``torch.cuda.memory._snapshot()``, grouped by where they were allocated (the
    innermost frames under ``titans/``, else the innermost Python frames), largest total first: what a decode step
    keeps from its prefill.  Each entry: MB, count, where (``file:line name`` frames)."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for seg in snapshot.get("segments", []):
        for block in seg.get("blocks", []):
            if block.get("state") != "active_allocated":
                continue
            frames = [f"{_short_path(f.get('filename', '?'))}:{f.get('line', '?')} {f.get('name', '?')}"
                      for f in block.get("frames", []) if str(f.get("filename", "")).endswith(".py")]
            ours = [f for f in frames if f.startswith("titans/")]
            where = tuple((ours or frames)[:3]) or ("(no Python frame recorded)",)
            entry = groups.setdefault(where, [0, 0])
            entry[0] += int(block.get("size", 0))
            entry[1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"mb": size / 2**20, "count": n, "where": list(where)} for where, (size, n) in rows]


def _short_path(path: str) -> str:
    """``.../titans/core/x.py`` -> ``titans/core/x.py``; ``.../site-packages/torch/x.py`` -> ``torch/x.py``."""
    i = path.rfind("/titans/")
    return path[i + 1:] if i >= 0 else path.split("site-packages/")[-1]


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(rows: list[Row], decode: list[dict]) -> str:
    lines = ["| model | seq x batch | train tokens/s | peak GPU GB | prefill tokens/s | note |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        note = r.error or ""
        if r.capture_check is not None and not r.capture_check["agrees"]:
            note = (f"{note}; " if note else "") + (f"capture's loss off the eager one by "
                                                    f"{r.capture_check['rel_diff']:.1e} (relative)")
        lines.append(f"| {r.model} | {r.seq_len} x {r.batch} | {_fmt(r.train_tokens_per_s)} | "
                     f"{_fmt(r.train_peak_gb, 1)} | {_fmt(r.prefill_tokens_per_s)} | {note} |")
    if decode:
        lines += ["", "| model | context | decode mode | decode ms/token | state MB | note |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for d in decode:
            lat = d.get("latency_ms")
            lines.append(f"| {d['model']} | {d['context']:,} | {d.get('decode_mode', 'eager')} | "
                         f"{'-' if lat is None else f'{lat:.2f}'} | {d.get('state_mb', float('nan')):.2f} | "
                         f"{d.get('error', '')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["mac", "mag", "mal", "lmm", "transformer", "swa"])
    ap.add_argument("--shapes", nargs="*", default=["1024x2"], help="SEQxBATCH entries (none: decode only)")
    add_model_arguments(ap)
    ap.add_argument("--cuda-graphs", action="store_true", help="capture forward + backward as CUDA graphs")
    ap.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, default="none",
                    help="what the training step recomputes in its backward (training.activation_checkpointing): "
                         "memory = each memory layer's neural-memory work, full = whole blocks")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the model (with --cuda-graphs the capture failed on the H100 with torch 2.11, "
                         "benchmarks/RESULTS.md section 6)")
    ap.add_argument("--compile-scope", choices=["model", "blocks"],
                    default=TrainingConfig.model_fields["compile_scope"].default,
                    help="with --compile: the whole model as one graph, or each block on its own (regional "
                         "compilation: a fraction of the compile time); default: the trainer's")
    ap.add_argument("--wavefront", action="store_true",
                    help="train segment-major with one CUDA stream per block (titans.training.wavefront: the memory "
                         "layers' segment chains overlap; for batch 1)")
    ap.add_argument("--wavefront-step", type=int, default=None, metavar="TOKENS",
                    help="with --wavefront: tokens each block takes a step (default: the window, MAC's segment); "
                         "several segments a step mean fewer, longer kernels for the attention-only blocks and a "
                         "coarser overlap (the same loss: any piece sizes stream exactly)")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                    help="TF32 tensor cores for float32 matmuls (the trainer's default, training.tf32)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one training step and keep its N most expensive kernels")
    ap.add_argument("--profile-trace", default=None, metavar="PREFIX",
                    help="with --profile: also write every stream's kernels in launch order to "
                         "PREFIX.MODEL_SEQxBATCH.json.gz (benchmarks/chain_anatomy.py reads them)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--decode-contexts", type=int, nargs="*", default=[])
    ap.add_argument("--decode-models", nargs="*", default=None)
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--decode-graphs", action="store_true",
                    help="time decoding through the static step replayed from one CUDA graph (GraphedDecoder)")
    ap.add_argument("--prefill-piece", type=int, default=8192)
    ap.add_argument("--decode-snapshot", action="store_true",
                    help="record allocation stacks during the prefill (CUDA) and list the live allocations before "
                         "the timed decode steps, grouped by where they were made (live_after_prefill)")
    ap.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one no-grad forward of a row (--no-prefill: training only; under --compile the "
                         "prefill is a compilation of its own)")
    ap.add_argument("--device", default=None, help="default: cuda where there is one, else cpu")
    ap.add_argument("--out", default="benchmarks/results/harness.json")
    args = ap.parse_args(argv)
    unknown = warn_unknown_switches()  # a misspelt switch would time the default under another name
    if args.wavefront_step is not None and not args.wavefront:
        ap.error("--wavefront-step is the step of --wavefront: give both")
    if args.wavefront and args.compile and args.compile_scope == "model":
        ap.error("--wavefront calls the blocks one segment at a time: use it with --compile-scope blocks")
    if args.wavefront:  # before CUDA starts (recorded with the switches): the wavefront's streams, a queue each
        widen_hardware_queues()  # (before torch.cuda.is_available(): after it starts the driver, too late)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    matmul_sm_carveout()  # TITANS_MATMUL_SM_CARVEOUT, when set (recorded with the other switches)
    models = list(args.models)
    try:
        import titans_pytorch  # noqa: F401

        models.append("titans-pytorch")
    except ImportError:
        pass
    rows = []
    for shape in args.shapes:
        seq, batch = (int(x) for x in shape.lower().split("x"))
        for name in models:
            r = time_training(args, name, seq, batch, device)
            print(json.dumps(asdict(r)), flush=True)
            rows.append(r)
    decode = []
    for ctx in args.decode_contexts:
        for name in args.decode_models or [m for m in models if m != "titans-pytorch"]:
            d = time_decode(args, name, ctx, device)
            print(json.dumps(d), flush=True)
            decode.append(d)
    result = {
        "date": str(date.today()),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "args": vars(args),
        "env": run_switches(), "unknown_switches": unknown,
        # what the defaults were when this ran (they change between sessions: combo kernels and the deferral in
        # the wavefront became defaults in session 26): inductor's options for --compile, and whether MAC's memory
        # blocks defer their weight gradients in one pass / in the wavefront (the environment included), and the
        # memory backward's launch layout (TITANS_TRITON_BWD; auto since session 32), and whether the memory's cheap
        # regions are recomputed in the backward (TITANS_RECOMPUTE_CHEAP; kept since session 33)
        "defaults": {"inductor_options": inductor_options(),
                     "defer_weight_grads": {"one_pass": deferral_wanted(False), "wavefront": deferral_wanted(True)},
                     "memory_backward": memory_backward_mode(), "recompute_cheap": tensors.RECOMPUTE_CHEAP,
                     # MAC's read-outs apart from the segment chain (TITANS_WAVEFRONT_READOUT_STREAMS; auto since
                     # session 42: on streams with 32 hardware queues)
                     "wavefront_readouts_apart": readouts_apart_by_default(device.type == "cuda")
                     if args.wavefront else None},
        "train": [asdict(r) for r in rows], "decode": decode,
    }
    if device.type == "cuda":
        from titans.core.memory import triton_kernels

        result["triton_autotune"] = triton_kernels.tuning_report()
        # memory shapes whose kernels failed and fell back to the PyTorch loop (a row that lists one did not time
        # the kernels its switches asked for)
        result["memory_fallbacks"] = sorted(triton_kernels.FAILED_SHAPES)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2))
    table = markdown(rows, decode)
    for r in rows:
        if r.profile:
            table += f"\n\nTop kernels, {r.model} {r.seq_len} x {r.batch}, one training step:\n\n" + \
                "| kernel | ms | calls | share |\n| --- | --- | --- | --- |\n" + "\n".join(
                    f"| `{k['name'][:80]}` | {k['ms']:.2f} | {k['calls']} | {100 * k['share']:.1f}% |"
                    for k in r.profile)
        if r.profile_timeline and r.profile_timeline["kernels"]:
            t = r.profile_timeline
            table += (f"\n\nTimeline: {t['kernels']} kernels on {t['streams']} streams, {t['kernel_ms']:.1f} ms of "
                      f"kernel time in {t['busy_ms']:.1f} ms with a kernel running (concurrency "
                      f"{t['concurrency']:.2f}), {t['span_ms']:.1f} ms first to last "
                      f"(idle {100 * t['idle_share']:.0f}%); busiest streams (kernel ms / span ms): " +
                      ", ".join(f"{p['stream']}: {p['kernel_ms']:.1f} / {p['span_ms']:.1f}"
                                for p in t["per_stream"][:8]))
            for pattern, near in (t.get("beside") or {}).items():
                if near:
                    table += (f"\n\nBeside `{pattern}` ({near['launches']} launches, {near['ms']:.1f} ms, "
                              f"{near['concurrent']:.2f} other kernels at once): " +
                              ", ".join(f"`{n['name'][:60]}` {100 * n['share']:.0f}%" for n in near["neighbours"][:8]))
        if r.walk_clock:
            table += (f"\n\nThe memory walks' programs, {r.model} {r.seq_len} x {r.batch}, one training step "
                      f"(TITANS_TRITON_WALK_CLOCK=1):\n\n" + walk_clock_table(r.walk_clock))
    atomic_write_text(out.with_suffix(".md"), table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
    if torch.cuda.is_available():
        # the results are written (atomically) and printed: leave without the interpreter's teardown, which on the
        # H200 hung past the step's time limit in 4 of ~25 CUDA runs after complete rows (sessions 20-21; with CUDA
        # graphs on side streams, the profiler or new Triton kernels; not diagnosed), costing device time
        import os
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
