"""The benchmark scripts' own logic (no timing): what they count is what they claim to count."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from titans.core.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    # registered before it runs, as importlib's own recipe does: a dataclass with string annotations looks its
    # module up in sys.modules (alone, `-k kernel_overlap` failed there)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_saved_activations_count_every_saved_storage_once_and_leave_outputs_alone():
    sa = _load("saved_activations")
    torch.manual_seed(0)
    model = build_model(dict(variant="mac", vocab_size=37, dim=16, depth=2, heads=2, window=4, persistent_tokens=2,
                             memory_depth=2, memory_chunk_size=2, memory_backend="fused"))
    ids = torch.randint(0, 37, (1, 12))
    rows = sa.saved_by_module(model, ids, bf16=False)
    # an independent count: every saved storage once, parameters excluded
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.nbytes():
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids, use_cache=False).loss
    assert sum(r["bytes"] for r in rows.values()) == sum(seen.values()) > 0
    assert rows["memory"]["bytes"] > 0 and rows["attn"]["bytes"] > 0
    # the hooks are gone afterwards and the forward is unchanged
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(ids, labels=ids, use_cache=False).loss, loss, rtol=0, atol=0)
    assert sa.group_of("blocks.3.memory.to_qkv") == "memory.to_qkv" and sa.group_of("") == "(model)"


def test_op_census_counts_each_operation_of_the_step_once():
    """The census against an independent count of the same step (forward with labels, backward); views excluded,
    data movement named, the model's output and gradients unchanged afterwards."""
    from torch.utils._python_dispatch import TorchDispatchMode

    oc = _load("op_census")
    torch.manual_seed(0)
    model = build_model(dict(variant="mag", vocab_size=37, dim=16, depth=2, heads=2, window=4, persistent_tokens=2,
                             memory_depth=2, memory_chunk_size=2, memory_backend="chunked"))
    ids = torch.randint(0, 37, (1, 12))
    r = oc.census(model, ids, bf16=False)

    names = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(oc.op_name(func))
            return func(*args, **(kwargs or {}))

    params = list(model.parameters())
    with Count():
        loss = model(ids, labels=ids, use_cache=False).loss
        torch.autograd.grad(loss, params)
    kept = [n for n in names if n not in oc.VIEWS]
    assert r["total"] == len(kept) == sum(r["ops"].values()) and r["forward"] + r["backward"] == r["total"]
    assert r["movement"] == sum(n in oc.MOVEMENT for n in kept) > 0
    assert "view" not in r["ops"] and r["ops"]["mm"] > 0
    assert sum(sum(c.values()) for c in r["movement_by_module"].values()) == r["movement"]
    # every matrix product counted once more by module and operand shapes (addmm without its bias)
    assert sum(m["calls"] for m in r["matmuls"]) == sum(r["ops"].get(op, 0) for op in oc.MATMULS)
    addmms = [m for m in r["matmuls"] if m["op"] == "addmm"]
    assert addmms and sum(m["calls"] for m in addmms) == r["ops"]["addmm"]  # the memory's gates (a bias)
    assert all("x" in part for m in addmms for part in m["shapes"].split(" @ ")), addmms  # two matrices, no bias
    assert all(m["shapes"].count(" @ ") == 1 for m in r["matmuls"])
    # the memory's q / k / v projection (dim 16 -> 3 x 2 heads x 8) appears with its weight's shape
    assert any(m["shapes"].endswith("@ 16x48") for m in r["matmuls"]), r["matmuls"]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in params)
    torch.testing.assert_close(model(ids, labels=ids, use_cache=False).loss, loss, rtol=0, atol=0)


def test_babilong_compare_pools_seeds_by_length_with_wilson_intervals(tmp_path):
    """Two evaluation seeds of one model pool by context length (examples, exact matches, majority-answer matches),
    the interval is Wilson's over the pooled counts, and JSON, table and plot are written; a folder without
    ``results.json`` or without the task is named in the error."""
    import json

    import pytest

    from titans.inference.long_context import wilson_interval

    bc = _load("babilong_compare")

    def evaluation(name, seed, acc):
        d = tmp_path / name
        d.mkdir()
        cells = [{"task": "babilong_qa3", "length": L, "depth": 0.5, "samples": 10, "accuracy": a,
                  "majority_baseline": 0.2} for L, a in acc.items()]
        (d / "results.json").write_text(json.dumps({"seed": seed, "cells": cells}))
        return str(d)

    a1, a2 = evaluation("mal1", 1, {320: 0.6, 640: 0.3}), evaluation("mal2", 2, {320: 0.4, 640: 0.5})
    b1 = evaluation("swa1", 1, {320: 0.2, 640: 0.1})
    rec = bc.main(["--task", "babilong_qa3", "--model", f"mal={a1},{a2}", "--model", f"swa={b1}",
                   "--out", str(tmp_path / "out.json"), "--plot", str(tmp_path / "out.png")])
    mal = rec["models"]["mal"]
    assert mal["320"]["n"] == 20 and mal["320"]["correct"] == 10 and mal["320"]["majority"] == 4
    assert mal["640"]["correct"] == 8 and mal["640"]["seeds"] == [1, 2]
    lo, hi = wilson_interval(8, 20)
    assert mal["640"]["wilson95"] == [round(100 * lo), round(100 * hi)]
    assert rec["models"]["swa"]["320"]["exact_match"] == 0.2
    assert json.loads((tmp_path / "out.json").read_text()) == rec
    assert "| mal | 50% (" in (tmp_path / "out.md").read_text()
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    # an earlier record's models join (this script's JSON, or session 16's layout: tasks -> qa3 -> model)
    old = tmp_path / "s16.json"
    old.write_text(json.dumps({"tasks": {"qa3": {"swa16": rec["models"]["swa"]}}}))
    both = bc.main(["--task", "babilong_qa3", "--prior", str(old), str(tmp_path / "out.json"), "--model",
                    f"mag={b1}", "--out", str(tmp_path / "both.json")])
    assert list(both["models"]) == ["swa16", "mal", "swa", "mag"] and both["models"]["mal"] == mal
    # --within pools the lengths of a pair (on and off MAC's segment grid) under the longer one, and no others
    assert bc.length_groups([2048, 2024, 4096, 4072, 8192, 100], 24) == {100: 100, 2024: 2048, 2048: 2048,
                                                                          4072: 4096, 4096: 4096, 8192: 8192}
    c1 = evaluation("mac1", 1, {300: 0.5, 320: 0.3, 640: 0.4})
    pair = bc.main(["--task", "babilong_qa3", "--model", f"mac={c1},{a2}", "--within", "24",
                    "--out", str(tmp_path / "pair.json")])["models"]["mac"]
    assert list(pair) == ["320", "640"] and pair["320"]["lengths"] == [300, 320]
    assert pair["320"]["n"] == 30 and pair["320"]["correct"] == 5 + 3 + 4 and pair["640"]["correct"] == 4 + 5
    with pytest.raises(FileNotFoundError, match="results.json"):
        bc.main(["--task", "babilong_qa3", "--model", f"x={tmp_path}", "--out", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match="no cells of task 'babilong_qa7'"):
        bc.main(["--task", "babilong_qa7", "--model", f"x={a1}", "--out", str(tmp_path / "x.json")])


def test_kernel_overlap_measures_the_union_of_kernel_spans():
    harness = _load("harness")
    # stream 7: 0-10 and 20-30; stream 8: 5-25 overlaps both; 40-50 alone after a 10 us gap
    t = harness.kernel_overlap([(0, 10, 7), (20, 30, 7), (5, 25, 8), (40, 50, 7)])
    assert t["kernel_ms"] == 50 / 1e3 and t["busy_ms"] == 40 / 1e3 and t["span_ms"] == 50 / 1e3
    assert abs(t["concurrency"] - 1.25) < 1e-12 and abs(t["idle_share"] - 0.2) < 1e-12
    assert t["streams"] == 2 and t["kernels"] == 4
    assert [(r["stream"], r["kernels"]) for r in t["per_stream"]] == [(7, 3), (8, 1)]  # busiest first
    assert t["per_stream"][0]["kernel_ms"] == 30 / 1e3 and t["per_stream"][0]["span_ms"] == 50 / 1e3
    assert t["per_stream"][1]["kernel_ms"] == 20 / 1e3 and t["per_stream"][1]["span_ms"] == 20 / 1e3
    assert "top_kernels" not in t["per_stream"][0]  # no names given
    named = harness.kernel_overlap([(0, 10, 7, "mm"), (20, 22, 7, "add"), (30, 32, 7, "add"), (5, 25, 8, "walk")])
    assert named["per_stream"][0]["top_kernels"] == [{"name": "walk", "calls": 1, "ms": 20 / 1e3}]
    assert named["per_stream"][1]["top_kernels"] == [{"name": "mm", "calls": 1, "ms": 10 / 1e3},
                                                     {"name": "add", "calls": 2, "ms": 4 / 1e3}]
    nested = harness.kernel_overlap([(0, 100, 1), (10, 20, 2), (30, 40, 3)])  # kernels inside a longer one
    assert nested["busy_ms"] == 0.1 and abs(nested["concurrency"] - 1.2) < 1e-12
    assert harness.kernel_overlap([])["concurrency"] is None


def test_kernels_beside_lists_what_overlapped_the_named_kernels():
    harness = _load("harness")
    # two walks (0-100 on stream 1, 150-250 on stream 2); a matmul 50-200 on stream 3 overlaps both (50 + 50), an
    # add 90-95 the first, a walk of stream 2 (150-250) overlaps nothing of stream 1's; a norm 300-310 neither
    spans = [(0, 100, 1, "walk"), (150, 250, 2, "walk"), (50, 200, 3, "mm"), (90, 95, 4, "add"), (300, 310, 1, "norm")]
    got = harness.kernels_beside(spans, "walk")
    assert got["launches"] == 2 and got["ms"] == 200 / 1e3
    assert got["neighbours"] == [{"name": "mm", "ms": 100 / 1e3, "share": 0.5},
                                 {"name": "add", "ms": 5 / 1e3, "share": 0.025}]
    assert abs(got["concurrent"] - 105 / 200) < 1e-12
    # walks meeting each other count (the other memory blocks' walks), a kernel is never its own neighbour
    both = harness.kernels_beside([(0, 100, 1, "walk"), (40, 140, 2, "walk")], "walk")
    assert both["neighbours"] == [{"name": "walk", "ms": 120 / 1e3, "share": 0.6}] and both["concurrent"] == 0.6
    assert harness.kernels_beside(spans, "stage") is None


def test_walk_clock_stats_read_partner_waits_from_the_stamps():
    """Two heads of 2 parts (rows bh * P + part: start, first all-reduce done, end, SM, time in all-reduces; ns):
    head 0's second part starts 30 us after its first, head 1's together; a zeroed launch (before a reset) is left
    out."""
    harness = _load("harness")
    us = 1000
    stamps = torch.tensor([[100, 140, 400, 3, 100], [130, 140, 400, 4, 70],  # head 0: late partner 30 us
                           [110, 120, 410, 5, 60], [110, 121, 410, 6, 50]],
                          dtype=torch.int64) * torch.tensor([us, us, us, 1, us])
    got = harness.walk_clock_stats([("backward", 2, stamps), ("backward", 2, torch.zeros(4, 5, dtype=torch.int64)),
                                    ("forward", 2, torch.zeros(4, 5, dtype=torch.int64))])
    assert list(got) == ["backward"]  # the forward's only launch has no stamps
    assert json.loads(json.dumps(got)) == got  # plain numbers: the row's JSON (tensors here failed on the GPU)
    b = got["backward"]
    assert b["launches"] == 1 and b["sms"] == 4.0
    assert b["span_us"] == 310.0 and b["start_spread_us"] == 30.0
    assert b["program_us"] == (300 + 270 + 300 + 300) / 4
    assert b["late_partner_us"] == 15.0 and b["worst_late_partner_us"] == 30.0
    assert b["paired_us"] == (270 + 270 + 300 + 300) / 4
    assert b["first_sync_us"] == (40 + 10 + 10 + 11) / 4
    assert b["all_reduce_us"] == 70.0 and b["outside_us"] == (200 + 200 + 240 + 250) / 4
    table = harness.walk_clock_table(got).splitlines()
    assert table[0].startswith("| walk | launches | span us | program us | late partner us |")
    assert table[2] == "| backward | 1 | 310.0 | 292.5 | 15.0 | 30.0 | 285.0 | 17.8 | 30.0 | 70.0 | 222.5 | 4.0 |"


def test_harness_table_marks_a_row_whose_capture_disagrees():
    """A --cuda-graphs row keeps graphed_loss's check (the captured loss against the eager one) in its JSON, and the
    table's note says when the capture computed another loss: that row timed another computation."""
    from titans.training.trainer import capture_agreement

    harness = _load("harness")
    good = harness.Row("mac", 4096, 8, 380_000.0, 9.0, capture_check=capture_agreement([4.1] * 3, 4.1))
    bad = harness.Row("mac", 65536, 1, 305_000.0, 29.4, capture_check=capture_agreement([4.176198] * 3, 4.176023))
    lines = harness.markdown([good, bad], []).splitlines()
    assert lines[2].endswith("| 9.0 | - |  |")
    assert lines[3].endswith("| - | capture's loss off the eager one by 4.2e-05 (relative) |")
    assert harness.asdict(bad)["capture_check"]["agrees"] is False


def test_run_switches_record_the_project_switches_and_cuda_work_queues(monkeypatch):
    harness = _load("harness")
    monkeypatch.setenv("TITANS_TRITON_BWD", "split")
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES_NOT_A_SWITCH", "0")
    got = harness.run_switches()
    assert got["TITANS_TRITON_BWD"] == "split" and got["CUDA_DEVICE_MAX_CONNECTIONS"] == "32"
    assert "CUDA_VISIBLE_DEVICES_NOT_A_SWITCH" not in got and all(k.startswith(harness.SWITCHES) for k in got)


def test_matmul_sm_carveout_is_read_checked_and_applied(monkeypatch):
    """TITANS_MATMUL_SM_CARVEOUT (the harness's and memory_contention.py's timing switch) sets torch's SM carveout
    for matmuls; unset it changes nothing; a bad value names the variable."""
    from titans.utils.tensors import matmul_sm_carveout

    monkeypatch.delenv("TITANS_MATMUL_SM_CARVEOUT", raising=False)
    assert matmul_sm_carveout() is None and torch._C._get_sm_carveout_experimental() is None
    for bad in ("-3", "many", "1.5"):
        monkeypatch.setenv("TITANS_MATMUL_SM_CARVEOUT", bad)
        with pytest.raises(ValueError, match="TITANS_MATMUL_SM_CARVEOUT"):
            matmul_sm_carveout()
    monkeypatch.setenv("TITANS_MATMUL_SM_CARVEOUT", "24")
    try:
        assert matmul_sm_carveout() == 24 and torch._C._get_sm_carveout_experimental() == 24
    finally:
        torch._C._set_sm_carveout_experimental(None)


def test_live_allocations_group_the_live_blocks_of_a_snapshot_by_their_titans_frames():
    harness = _load("harness")

    def frame(path, line, name):
        return {"filename": path, "line": line, "name": name}

    table = [frame("/x/site-packages/torch/nn/functional.py", 10, "linear"),
             frame("/w/titans/core/attention/attention_utils.py", 240, "cos_sin"), frame("<built-in>", 0, "?")]
    other = [frame("/x/site-packages/torch/nn/modules/module.py", 5, "_call_impl")]
    snap = {"segments": [
        {"blocks": [{"state": "active_allocated", "size": 3 << 20, "frames": table},
                    {"state": "inactive", "size": 100 << 20, "frames": table},  # freed: not counted
                    {"state": "active_allocated", "size": 1 << 20, "frames": other}]},
        {"blocks": [{"state": "active_allocated", "size": 2 << 20, "frames": table},
                    {"state": "active_allocated", "size": 1 << 19}]}]}
    rows = harness.live_allocations(snap)
    assert rows[0] == {"mb": 5.0, "count": 2, "where": ["titans/core/attention/attention_utils.py:240 cos_sin"]}
    assert rows[1] == {"mb": 1.0, "count": 1, "where": ["torch/nn/modules/module.py:5 _call_impl"]}
    assert rows[2] == {"mb": 0.5, "count": 1, "where": ["(no Python frame recorded)"]}
    assert harness.live_allocations(snap, top=1) == rows[:1]


def _aot_graphs(fn, *inputs):
    """The forward and backward FX graphs AOTAutograd makes of ``fn`` (compiled afresh), after one backward of
    ``fn(*inputs).sum()``: what benchmarks/segment_graph_ops.py inspects."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    torch.compile(fn, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))(*inputs).sum().backward()
    return graphs


def _linear_tanh_graphs():
    lin = torch.nn.Linear(8, 6)
    return _aot_graphs(lambda x: torch.tanh(lin(x)), torch.randn(5, 8, requires_grad=True))


def test_segment_graph_ops_counts_matmuls_and_the_weight_gradients_among_them():
    """benchmarks/segment_graph_ops.py: of a linear layer's backward graph, the weight gradient is the one matmul with
    the weight's shape; the input gradient (another matmul) and the bias gradient (a reduction) are not."""
    sgo = _load("segment_graph_ops")
    fwd, bwd = (sgo.count_ops(g, {(6, 8), (8, 6)}) for g in _linear_tanh_graphs())
    assert fwd["matmuls"] == 1 and fwd["weight_shaped_matmuls"] == 0
    assert bwd["matmuls"] == 2 and bwd["weight_shaped_matmuls"] == 1 and bwd["weight_shaped"] == [(6, 8)]
    assert bwd["reductions"] >= 1 and bwd["ops"] == sum(bwd["by_op"].values())


def test_segment_graph_ops_lists_what_a_backward_graph_reads_from_its_forward():
    """segment_graph_ops.saved_tensors: of tanh(x W^T + b)'s backward graph, the inputs that are not incoming
    gradients - W (for x's gradient), x (for W's), tanh's output (for its own backward) - largest first, with their
    bytes; the gradient flowing in is not counted."""
    sgo = _load("segment_graph_ops")
    bwd = _linear_tanh_graphs()[1]
    saved = sgo.saved_tensors(bwd)
    assert saved["saved"] == 3 and saved["saved_bytes"] == (8 * 6 + 5 * 8 + 5 * 6) * 4
    assert [r["shape"] for r in saved["saved_largest"]] == [[8, 6], [5, 8], [5, 6]]
    assert sgo.saved_tensors(bwd, top=1)["saved_largest"] == saved["saved_largest"][:1]
    # a broadcast view (a deferred segment's parameter stand-in) counts as the bytes it views, not its shape's
    assert sgo._spanned_bytes(torch.zeros(6).expand(4, 5, 6)) == 6 * 4
    assert sgo._spanned_bytes(torch.zeros(3, 6)[:, :2]) == (2 * 6 + 2) * 4  # to the last row's second element


def test_segment_graph_ops_counts_a_backward_graphs_ops_by_source_line():
    """segment_graph_ops.by_source: the backward graph of a package function's compile attributes its ops to the
    function's lines (path relative to the package), most first, and every op is counted once."""
    import inspect

    from titans.core.memory import functional

    sgo = _load("segment_graph_ops")
    fwd, bwd = _aot_graphs(functional._decay_matrix, torch.rand(2, 6).clamp(0.1, 0.9).requires_grad_())
    rows = sgo.by_source(bwd, top=100)
    assert sum(n for n, _ in rows) == sgo.count_ops(bwd, set())["ops"]
    assert [n for n, _ in rows] == sorted((n for n, _ in rows), reverse=True)
    first = inspect.getsourcelines(functional._decay_matrix)[1]
    located = [loc for _, loc in rows if loc.startswith("core/memory/functional.py:")]
    assert located and all(" _decay_matrix: " in loc and int(loc.split(":")[1].split()[0]) > first for loc in located)
    assert sum(n for n, loc in rows if loc in located) >= 0.5 * sum(n for n, _ in rows)


def test_memory_contention_names_what_it_needs_and_averages_kernels(monkeypatch):
    """benchmarks/memory_contention.py (GPU only) stops on a machine without CUDA with a message naming it, and its
    per-kernel means divide each kernel's device time by its launches, longest total first."""
    from types import SimpleNamespace

    mc = _load("memory_contention")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU and Triton"):
            mc.main(["--out", "unused.json"])
    events = [SimpleNamespace(key="walk", device_time_total=300.0, count=2),
              SimpleNamespace(key="stage", device_time_total=400.0, count=8),
              SimpleNamespace(key="host-only", device_time_total=0.0, count=3)]
    means = mc._kernel_means(SimpleNamespace(key_averages=lambda: events))
    assert means == {"stage": {"mean_us": 50.0, "calls": 8}, "walk": {"mean_us": 150.0, "calls": 2}}
    assert list(means) == ["stage", "walk"]
    # its siblings load by path as the GPU run loads them (the harness's dataclass needs its module registered;
    # not left over from the tests above)
    monkeypatch.delitem(sys.modules, "harness", raising=False)
    assert mc.sibling("harness").run_switches is not None and callable(mc.sibling("memory_kernels").make_inputs)
    rows = [{"streams": 1, "background": 0, "replay_ms": 0.7, "kernels": means},
            {"streams": 3, "background": 4096, "replay_ms": 1.25, "kernels": {"walk": {"mean_us": 250.0, "calls": 3}}}]
    lines = mc.markdown(rows).splitlines()
    assert lines[0] == "| kernel | 1 side by side (us) | 3 side by side, 4096^2 matmuls beside (us) |"
    assert lines[2] == "| whole replay (ms) | 0.700 | 1.250 |"
    assert lines[3:] == ["| `stage` | 50.0 | - |", "| `walk` | 150.0 | 250.0 |"]
    # a row with the walk clock's statistics gets its table below, through the harness's walk_clock_table
    harness = mc.sibling("harness")
    rows[1]["walk_clock"] = {"backward": {"launches": 3, **{f"{c}_us": 1.0 for c in harness.CLOCK_COLUMNS},
                                          "sms": 48.0}}
    lines = mc.markdown(rows, harness.walk_clock_table).splitlines()
    assert lines[6] == "The walks' programs, 3 side by side, 4096^2 matmuls beside (TITANS_TRITON_WALK_CLOCK=1):"
    assert lines[-1] == "| backward | 3 | " + "1.0 | " * 9 + "48.0 |"
    copies = mc.markdown([dict(rows[0], background=0, background_copy_mb=256)]).splitlines()
    assert copies[0] == "| kernel | 1 side by side, 256 MB copies beside (us) |"
    code = [mc.markdown([dict(rows[0], background_code_kb=200, background_code_loop=loop)]).splitlines()[0]
            for loop in (False, True)]
    assert code == ["| kernel | 1 side by side, 200 KB of arithmetic in a straight line beside (us) |",
                    "| kernel | 1 side by side, 200 KB of arithmetic as a loop beside (us) |"]


_CODE_NEIGHBOUR = """
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("mc", "benchmarks/memory_contention.py")
mc = importlib.util.module_from_spec(spec); spec.loader.exec_module(mc)
x0 = torch.randn(2 * mc.CODE_BLOCK, generator=torch.Generator().manual_seed(0))
ref = x0.clone()
for i in range(37):
    ref = ref * torch.tensor(1.0 + i * 1e-7) + torch.tensor(i * 1e-4)
for unroll in (True, False):
    x = x0.clone()
    mc._code_kernel()[(2,)](x, STEPS=37, UNROLL=unroll, BLOCK=mc.CODE_BLOCK)
    print(unroll, (x - ref).abs().max().item(), (x - x0).abs().max().item())
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_memory_contentions_code_neighbour_does_the_same_arithmetic_straight_or_looped():
    """The instruction-fetch neighbour of memory_contention.py (``--background-code``): its straight-line and looped
    forms compute the same multiply-adds (here under TRITON_INTERPRET=1, against a float32 loop in torch), so rows
    beside the two differ in code size alone."""
    import os
    import subprocess

    out = subprocess.run([sys.executable, "-c", _CODE_NEIGHBOUR], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == ["True", "False"]
    for _, err, moved in lines:
        assert float(err) <= 1e-5 and float(moved) > 1e-3


def test_chain_anatomy_reads_the_harness_trace_and_times_one_period(tmp_path):
    harness, ca = _load("harness"), _load("chain_anatomy")
    # stream 5 repeats walk (10 us), gap 2, mm (4), gap 3, add (1), then 6 us idle: a 26 us period; its third period
    # has an extra kernel (not alike); stream 9 runs less kernel time, so the trace lists stream 5 first
    spans, t = [(0, 3, 5, "prologue")], 10
    for p in range(5):
        spans += [(t, t + 10, 5, "_memory_walk_bwd_parts_kernel"), (t + 12, t + 16, 5, "nvjet_gemm"),
                  (t + 19, t + 20, 5, "triton_poi_fused_3")]
        if p == 2:
            spans.append((t + 21, t + 22, 5, "extra"))
        t += 26
    spans += [(0, 30, 9, "flash_bwd")]
    path = tmp_path / "trace.json.gz"
    harness.write_stream_trace(spans, str(path))
    names, streams, _ = ca.load_trace(str(path))
    assert list(streams) == ["5", "9"] and len(streams["5"]) == 1 + 15 + 1
    got = ca.anatomy(names, streams["5"], "_memory_walk_bwd")
    # periods: cut at walks 1-5, the last dropped -> 4, of which 3 alike
    assert got["periods"] == 4 and got["matched"] == 3 and got["kernels"] == 3
    assert [(r["name"], r["kind"], r["us"], r["gap_us"]) for r in got["rows"]] == [
        ("_memory_walk_bwd_parts_kernel", "memory (Triton)", 10, None), ("nvjet_gemm", "matmul", 4, 2),
        ("triton_poi_fused_3", "inductor (Triton)", 1, 3)]
    assert got["period_us"] == 26 and got["kernel_us"] == 15 and got["gap_us"] == 11
    assert got["by_kind"]["matmul"] == {"kernels": 1, "us": 4, "gap_us": 2}
    out = tmp_path / "anatomy.json"
    ca.main([str(path), "--out", str(out)])
    assert json.loads(out.read_text())["stream"] == "5" and "| 1 | `nvjet_gemm` | matmul | 4.0 | 2.0 |" in \
        out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="no kernel whose name contains"):
        ca.anatomy(names, streams["9"], "_memory_walk_bwd")
    with pytest.raises(SystemExit, match="twice: no chain"):
        ca.main([str(path), "--anchor", "flash_bwd"])
    # every stream together: the walks 26 us apart (and the prologue-free trace's 5 launches)
    merged = ca.anchor_intervals(names, streams, "_memory_walk_bwd")
    assert merged["launches"] == 5 and merged["median_us"] == 26 and merged["q1_us"] == merged["q3_us"] == 26
    ca.main([str(path), "--merged", "--out", str(out)])
    assert json.loads(out.read_text())["median_us"] == 26
    with pytest.raises(SystemExit, match="fewer than two launches"):
        ca.anchor_intervals(names, streams, "flash_bwd")
    # a stream that runs the anchor twice has one whole period and no later one to end its span at
    two = [(0, 10, 3, "_memory_walk_bwd_parts_kernel"), (12, 16, 3, "nvjet_gemm"), (30, 40, 3,
                                                                                 "_memory_walk_bwd_parts_kernel")]
    harness.write_stream_trace(two, str(path))
    ca.main([str(path), "--out", str(out)])
    got = json.loads(out.read_text())
    assert got["periods"] == 1 and got["period_us"] is None and got["kernel_us"] == 14
    assert "kernels 14.0 us a period (its span unknown" in out.with_suffix(".md").read_text()


def test_chain_anatomy_phases_cut_the_step_at_the_backwards_first_walk(tmp_path):
    harness, ca = _load("harness"), _load("chain_anatomy")
    # forward: two walks on stream 1 and a matmul beside the first; backward (from the first backward walk at 40 us):
    # walks at 40 and 70 on stream 1, 100 on stream 4, an inductor kernel beside the first
    spans = [(0, 10, 1, "_memory_walk_parts_kernel"), (5, 15, 2, "nvjet_gemm"),
             (20, 30, 1, "_memory_walk_parts_kernel"),
             (40, 60, 1, "_memory_walk_bwd_parts_kernel"), (45, 55, 3, "triton_poi_fused_1"),
             (70, 90, 1, "_memory_walk_bwd_parts_kernel"), (100, 110, 4, "_memory_walk_bwd_parts_kernel")]
    path = tmp_path / "trace.json.gz"
    harness.write_stream_trace(spans, str(path))
    names, streams, _ = ca.load_trace(str(path))
    got = ca.step_phases(names, streams, window_us=50)
    fwd, bwd = got["phases"]
    assert (fwd["phase"], fwd["start_us"], fwd["end_us"], fwd["kernels"]) == ("forward", 0, 30, 3)
    assert fwd["kernel_ms"] == pytest.approx(0.030) and fwd["concurrency"] == pytest.approx(1.0)
    assert fwd["by_kind_ms"] == pytest.approx({"memory (Triton)": 0.020, "matmul": 0.010})
    assert fwd["launches_per_window"] == [2] and fwd["anchor_launches"] == 2
    assert (bwd["start_us"], bwd["end_us"], bwd["kernels"]) == (40, 110, 4)
    assert bwd["kernel_ms"] == pytest.approx(0.060) and bwd["concurrency"] == pytest.approx(60 / 70)
    assert bwd["launches_per_window"] == [2, 1]  # 40 and 70 in [40, 90), 100 in [90, 140)
    out = tmp_path / "phases.json"
    ca.main([str(path), "--phases", "--window", "50", "--out", str(out)])
    assert json.loads(out.read_text())["phases"][1]["launches_per_window"] == [2, 1]
    with pytest.raises(SystemExit, match="no backward to cut"):
        ca.step_phases(names, streams, anchor="flash_bwd")


def test_profile_traces_keep_each_kernels_launch_configuration_and_the_sm_time_it_held(tmp_path):
    harness, ca = _load("harness"), _load("chain_anatomy")
    # a Chrome trace as torch.profiler exports it: CPU ops, a runtime call, and kernels with Kineto's launch args
    chrome = {"traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5, "args": {}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 2, "args": {}},
        {"ph": "X", "cat": "kernel", "name": "_memory_walk_parts_kernel", "ts": 10, "dur": 20, "tid": 7,
         "args": {"stream": 7, "grid": [2, 8, 1], "block": [256, 1, 1], "registers per thread": 255,
                  "shared memory": 1024}},
        {"ph": "X", "cat": "kernel", "name": "nvjet_gemm", "ts": 12, "dur": 10, "tid": 9,  # dimensions as text too
         "args": {"stream": 9, "grid": "[300, 1, 1]", "block": "[128, 1, 1]", "registers per thread": 168,
                  "shared memory": 100000}},
        {"ph": "X", "cat": "kernel", "name": "_memory_walk_bwd_parts_kernel", "ts": 40, "dur": 30, "tid": 7,
         "args": {"stream": 7, "grid": [2, 8, 1], "block": [256, 1, 1], "registers per thread": 255,
                  "shared memory": 1024}},
        {"ph": "X", "cat": "kernel", "name": "empty", "ts": 80, "dur": 0, "args": {}}]}
    path = tmp_path / "chrome.json"
    path.write_text(json.dumps(chrome))
    launches = harness.kernel_launches(str(path))
    assert launches == [(10, 30, 7, "_memory_walk_parts_kernel", (16, 256, 255, 1024)),
                        (12, 22, 9, "nvjet_gemm", (300, 128, 168, 100000)),
                        (40, 70, 7, "_memory_walk_bwd_parts_kernel", (16, 256, 255, 1024))]
    trace = tmp_path / "trace.json.gz"
    harness.write_stream_trace(launches, str(trace))
    names, streams, configs = ca.load_trace(str(trace))
    assert configs == [[16, 256, 255, 1024], [300, 128, 168, 100000]]  # the walks' configuration stored once
    assert [sp[3] for sp in streams["7"]] == [0, 0] and streams["9"][0][3] == 1
    # a block of 8 warps at 255 registers fills an SM's 65,536 registers (allocated 256 a warp at a time: 8,192 a
    # warp); 4 warps at 168 registers fit 3 by registers but 2 by shared memory (100,000 + 1,024 bytes a block)
    assert ca.blocks_per_sm(256, 255, 1024) == 1 and ca.blocks_per_sm(128, 168, 100000) == 2
    assert ca.blocks_per_sm(128, 168, 0) == 3
    assert ca.blocks_per_sm(64, 65, 0) == 14  # 65 registers a thread take 2,304 a warp (2,080 unrounded: 15 blocks)
    assert ca.blocks_per_sm(128, 32, 0) == 16 and ca.blocks_per_sm(64, 16, 0) == 32  # threads, then blocks
    assert ca.sms_held([16, 256, 255, 1024], 132) == 16 and ca.sms_held([300, 128, 168, 100000], 132) == 132
    got = ca.step_phases(names, streams, configs=configs, sms=132)
    fwd, bwd = got["phases"]
    # forward: the walk holds 16 SMs for 20 us, the matmul all 132 for 10 us; span 20 us
    assert fwd["sm_ms_held"] == pytest.approx((20 * 16 + 10 * 132) / 1e3)
    assert fwd["sm_share"] == pytest.approx((20 * 16 + 10 * 132) / (20 * 132))
    assert fwd["sm_ms_by_kind"] == pytest.approx({"matmul": 1.32, "memory (Triton)": 0.32})
    assert list(fwd["sm_ms_top"]) == ["nvjet_gemm", "_memory_walk_parts_kernel"]
    assert bwd["sm_ms_held"] == pytest.approx(30 * 16 / 1e3) and bwd["sm_share"] == pytest.approx(16 / 132)
    # shared out: from 12 to 22 us the walk (16) and the matmul (132) ask for 148 of 132 SMs and get 132 in
    # proportion; the rest of the span the walk holds its 16 and 116 SMs stand idle
    walk = (2 * 16 + 10 * 16 * 132 / 148 + 8 * 16) / 1e3
    gemm = 10 * 132 * 132 / 148 / 1e3
    assert fwd["sm_ms_shared_by_kind"] == pytest.approx({"matmul": gemm, "memory (Triton)": walk})
    assert fwd["sm_idle_share"] == pytest.approx(10 * 116 / (20 * 132))
    assert sum(fwd["sm_ms_shared_by_kind"].values()) * 1e3 + fwd["sm_idle_share"] * 20 * 132 == pytest.approx(20 * 132)
    assert bwd["sm_ms_shared_by_kind"] == pytest.approx({"memory (Triton)": 0.48})
    assert bwd["sm_idle_share"] == pytest.approx(116 / 132)
    # traces without configurations (before session 43) report no SM time
    assert "sm_ms_held" not in ca.step_phases(names, streams)["phases"][0]


def test_stream_hand_offs_label_the_wavefront_call_sites():
    sh = _load("stream_hand_offs")
    apart = sh.hand_offs(readout_streams=True)
    together = sh.hand_offs(readout_streams=False)
    # the read-outs apart hand the memory's gradients to their block's chain, and the chain hands nothing back
    for layer in sh.SMALL["memory_layers"]:
        assert apart[f"R{layer} -> S{layer}"]["edges"] > 0
        assert apart[f"F{layer} -> R{layer}"]["edges"] > 0  # the block's output gradient, from its feed-forward
        assert not any(key.startswith(f"S{layer} -> R") for key in apart)
        assert together[f"F{layer} -> S{layer}"]["edges"] > 0
    assert not any("R" in key for key in together)
    # the same gradients either way: what the read-outs hand over is what the chain kept for itself before
    assert sum(r["edges"] for k, r in apart.items() if k.endswith("-> W")) == \
        sum(r["edges"] for k, r in together.items() if k.endswith("-> W"))
    # attention-only blocks have no stream of their own for the feed-forward, the caller's holds the embedding
    assert not any(key.startswith(("F0", "F2")) for key in apart) and "S0 -> main" in apart


def test_schedule_runs_each_stream_in_order_after_its_inputs():
    sh = _load("stream_hand_offs")
    # a1 (A, 10) -> b1 (B, 5); a2 (A, 3) waits for its stream only; b2 (B, 4) after b1; c1 (C, 1) needs a2 and b2
    order = ["a1", "b1", "a2", "b2", "c1"]
    stream = {"a1": "A", "a2": "A", "b1": "B", "b2": "B", "c1": "C"}
    inputs = {"b1": ["a1"], "c1": ["a2", "b2"]}
    duration = {"a1": 10, "b1": 5, "a2": 3, "b2": 4, "c1": 1}
    assert sh.schedule(order, stream, inputs, duration) == {"a1": 10, "b1": 15, "a2": 13, "b2": 19, "c1": 20}
    # hand-off waits: a1 hands to B, so b1 waits from then on (no change); b1 hands nothing to A, a2 is free; but a
    # hand-off from a2 to C holds whatever C is given after it as well
    order2, stream2 = ["a1", "c0", "a2", "c1"], {"a1": "A", "a2": "A", "c0": "C", "c1": "C"}
    inputs2, duration2 = {"c1": ["a2"]}, {"a1": 10, "c0": 1, "a2": 3, "c1": 1}
    assert sh.schedule(order2, stream2, inputs2, duration2) == {"a1": 10, "c0": 1, "a2": 13, "c1": 14}
    order3 = ["a1", "a2", "c0", "c1"]  # a2 issued before c0: C waits for a2 from then on, c0 too
    assert sh.schedule(order3, stream2, inputs2, duration2, hand_off_waits=True) == {"a1": 10, "a2": 13, "c0": 14,
                                                                                      "c1": 15}


def test_emulated_wavefront_backward_with_readouts_apart_is_shorter():
    """By its dependencies alone (the engine's order, in-order streams, no contention) the read-outs apart shorten
    each memory block's chain and their stream runs ahead of it: what the GPU measured otherwise (session 33) is not
    in the graph's structure."""
    sh = _load("stream_hand_offs")
    together, apart = sh.emulate(False, steps=2), sh.emulate(True, steps=2)
    assert apart["makespan_us"] < together["makespan_us"]
    for layer in sh.ISSUE_LIKE["memory_layers"]:
        assert apart["streams"][f"S{layer}"]["busy"] < together["streams"][f"S{layer}"]["busy"]
    # the top memory block's chain never waits for its read-outs (busy all its span), whose stream is through
    # before the chain is half-way
    chain, readout = apart["streams"]["S6"], apart["streams"]["R6"]
    assert chain["end"] - chain["start"] <= 1.001 * chain["busy"]
    assert readout["end"] < (chain["start"] + chain["end"]) / 2


def test_segment_graph_ops_splits_the_step_into_the_chain_and_the_readout(monkeypatch):
    """--readouts-apart: the wavefront with MAC's read-outs apart compiles a segment as two regions, the chain's and
    the read-out's, each with its forward and backward graph (a later segment's chain graph apart from the first's)."""
    sgo = _load("segment_graph_ops")
    monkeypatch.setenv("TITANS_DEFER_WEIGHT_GRADS", "0")  # main sets it for its process: unset again after the test
    got = sgo.main(["--readouts-apart", "--dim", "32", "--window", "16", "--memory-chunk", "16", "--segments", "2"])
    graphs = got["graphs"]
    assert set(graphs) == {"chain forward", "chain backward", "readout forward", "readout backward"}
    assert len(graphs["chain backward"]) == 2 and len(graphs["readout backward"]) >= 1  # first and later segments
    assert graphs["readout backward"][0]["ops"] > 0 and graphs["chain backward"][-1]["matmuls"] > 0


def test_eager_glue_counts_the_operations_outside_compiled_graphs_once():
    """``eager_glue.eager_ops`` keeps the ATen operations no other ATen operation, compiled graph or custom op
    called, with their phase and autograd node, from a profiler's event tree."""
    from types import SimpleNamespace

    eg = _load("eager_glue")

    def event(name, parent=None):
        return SimpleNamespace(name=name, cpu_parent=parent)

    engine = event("autograd::engine::evaluate_function: CompiledFunctionBackward")
    graph = event("## Call CompiledFxGraph abc ##", engine)
    custom = event("titans::memory_core_backward", graph)
    add = event("aten::add", None)
    copy = event("aten::copy_", engine)
    events = [add, event("aten::empty", add), copy, event("aten::copy_", copy), event("aten::mm", graph),
              event("aten::contiguous", custom), event("aten::zeros", engine), event("aten::zeros", engine),
              event("cudaLaunchKernel", engine)]
    assert eg.eager_ops(events) == {("forward", "aten::add", ""): 1,
                                    ("backward", "aten::copy_", "CompiledFunctionBackward"): 1,
                                    ("backward", "aten::zeros", "CompiledFunctionBackward"): 2}


@pytest.mark.parametrize("batched,queries", [(True, False), (False, False), (False, True)],
                         ids=["batched_readouts", "per_segment_readouts", "batched_queries"])
def test_compile_check_of_the_wavefront_finds_the_same_step(batched, queries):
    """``compile_check.py --wavefront [--batched-readouts]``: MAC's wavefront step (deferred weight gradients, the
    elementwise parameters' per-token stand-ins) through its compiled regions (``compile_blocks``; ``aot_eager``
    here for time, inductor in RESULTS.md) against the eager one-pass forward, float64: the same loss and gradients
    (a different computation would show above ~1e-10)."""
    compile_check = _load("compile_check")
    r = compile_check.check("mac", "aot_eager", "model", "cpu", torch.float64, 64, "fused", batched_readouts=batched,
                            wavefront=True, batched_queries=queries)
    assert r["segments"] == 8 and "the wavefront" in r["scope"] and ("batched read-outs" in r["scope"]) == batched
    assert ("batched queries" in r["scope"]) == queries
    assert r["loss_error"] <= 1e-12 and r["worst_grad_error"] <= 1e-10, r


def _harness_json(path, rows, env=None, capture_check=None, readouts_apart=None, fallbacks=None):
    train = [dict(model="mac", seq_len=s, batch=b, train_tokens_per_s=tps, train_peak_gb=1.0, train_loss_first=5.6,
                  train_loss_last=5.4, error=err, capture_check=capture_check) for s, b, tps, err in rows]
    path.write_text(json.dumps({"date": "2026-12-05", "device": "test", "env": env or {}, "train": train,
                                "defaults": {"wavefront_readouts_apart": readouts_apart},
                                **({"memory_fallbacks": fallbacks} if fallbacks is not None else {})}))
    return str(path)


def test_flat_scaling_pairs_rows_with_the_reference_of_the_same_switches(tmp_path):
    """benchmarks/flat_scaling.py: each row's tokens/s over the 4096 x 8 row run with the same switches (else the
    one with none), 0.9x marked as met, failed rows listed without a ratio; a row whose CUDA-graph capture computed
    another loss than the eager step never meets the target nor serves as a reference; JSON, markdown and PNG
    written."""
    from titans.training.trainer import capture_agreement

    fs = _load("flat_scaling")
    agrees, disagrees = capture_agreement([4.1] * 3, 4.1), capture_agreement([4.176198] * 3, 4.176023)
    files = [_harness_json(tmp_path / "ref.json", [(4096, 8, 400_000.0, None)]),
             _harness_json(tmp_path / "ref_kept.json", [(4096, 8, 500_000.0, None)], {"TITANS_RECOMPUTE_CHEAP": "0"}),
             _harness_json(tmp_path / "flat.json", [(65536, 1, 300_000.0, None)], readouts_apart=False),
             _harness_json(tmp_path / "flat_apart.json", [(65536, 1, 340_000.0, None)], readouts_apart=True),
             _harness_json(tmp_path / "flat_kept.json", [(65536, 1, 460_000.0, None)],
                           {"TITANS_RECOMPUTE_CHEAP": "0"}),
             _harness_json(tmp_path / "flat_batched.json", [(65536, 1, 380_000.0, None)],
                           {"TITANS_WAVEFRONT_BATCHED_READOUTS": "1", "TITANS_TRITON_AUTOTUNE": "0"}),
             _harness_json(tmp_path / "oom.json", [(65536, 1, None, "CUDA out of memory")]),
             _harness_json(tmp_path / "flat_checked.json", [(65536, 1, 370_000.0, None)], {"TITANS_X": "1"}, agrees),
             _harness_json(tmp_path / "flat_wrong.json", [(65536, 1, 390_000.0, None)], {"TITANS_Y": "1"}, disagrees),
             _harness_json(tmp_path / "ref_wrong.json", [(4096, 8, 100_000.0, None)], {"TITANS_Y": "1"}, disagrees),
             # memory kernels that fell back to the PyTorch loop: timed other code than the switches say
             _harness_json(tmp_path / "flat_fell_back.json", [(65536, 1, 395_000.0, None)], {"TITANS_Z": "1"},
                           agrees, fallbacks=[[64, 128, 2, 64]]),
             _harness_json(tmp_path / "ref_fell_back.json", [(4096, 8, 90_000.0, None)], {"TITANS_Z": "1"},
                           fallbacks=[[64, 128, 2, 64]])]
    result = fs.main(files + ["--out", str(tmp_path / "flat")])
    by_name = {r["name"]: r for r in result["rows"]}
    assert by_name["flat_checked"]["ratio"] == pytest.approx(0.925) and by_name["flat_checked"]["meets"] is True
    # measured against the default reference, not its own disagreeing one, and not met whatever its ratio
    assert by_name["flat_wrong"]["reference"] == "ref" and by_name["flat_wrong"]["ratio"] == pytest.approx(0.975)
    assert by_name["flat_wrong"]["meets"] is False and by_name["flat_checked"]["capture_agrees"] is True
    assert by_name["flat"]["ratio"] == pytest.approx(0.75) and by_name["flat"]["meets"] is False
    assert by_name["flat_fell_back"]["reference"] == "ref" and by_name["flat_fell_back"]["meets"] is False
    assert by_name["flat_fell_back"]["ratio"] == pytest.approx(0.9875)
    # the layout the default resolved to is shown, and the row still pairs with the reference of no switches
    assert by_name["flat_apart"]["reference"] == "ref" and by_name["flat_apart"]["ratio"] == pytest.approx(0.85)
    assert by_name["flat_kept"]["reference"] == "ref_kept" and by_name["flat_kept"]["ratio"] == pytest.approx(0.92)
    assert by_name["flat_kept"]["meets"] is True
    assert by_name["flat_batched"]["reference"] == "ref" and by_name["flat_batched"]["ratio"] == pytest.approx(0.95)
    assert by_name["flat_batched"]["switches"] == {"TITANS_WAVEFRONT_BATCHED_READOUTS": "1"}  # the fixed setting left
    assert by_name["oom"]["ratio"] is None and result["references"] == {"mac": "ref"}
    table = (tmp_path / "flat.md").read_text()
    assert "failed: CUDA out of memory" in table and "0.920x (met)" in table and "0.750x |" in table
    assert "| yes | 0.925x (met) |" in table and "| NO (4.2e-05 relative) | 0.975x |" in table
    assert "| 0.988x (memory fell back to PyTorch: 64x128x2x64) |" in table
    assert "| defaults (read-outs apart by default) |  | 0.850x |" in table
    assert "| defaults (read-outs on the chain by default) |  | 0.750x |" in table
    assert json.loads((tmp_path / "flat.json").read_text())["target"] == 0.9
    assert (tmp_path / "flat.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="not a benchmarks/harness.py result"):
        (tmp_path / "other.json").write_text("{}")
        fs.main([str(tmp_path / "other.json")])


def test_wavefront_float32_compares_every_layout_with_the_one_pass(tmp_path):
    """benchmarks/wavefront_float32.py (run on the GPU to tell Triton's TF32 dots from a wavefront bug): on the CPU,
    in float32, every eager wavefront layout - a segment a call, three a call with each segment's own inputs and
    read-outs or the batched ones - gives the one pass's loss, and the JSON lists them."""
    wf = _load("wavefront_float32")
    out = tmp_path / "wf32.json"
    wf.main(["--out", str(out)])
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and len(result["rows"]) == 4
    one_pass = result["rows"][0]["loss"]
    for row in result["rows"]:
        assert row["relative"] <= 1e-6 and abs(row["loss"] - one_pass) <= 1e-5 * abs(one_pass), row


def test_graphed_wavefront_diff_finds_the_first_differing_token():
    """benchmarks/graphed_wavefront_diff.py's comparison (its capture needs CUDA): the largest difference, the first
    token past the tolerance and the largest difference per segment; equal logits have no first token."""
    gd = _load("graphed_wavefront_diff")
    a = torch.zeros(2, 12, 5)
    b = a.clone()
    assert gd.first_difference(a, b, 4) == {"max": 0.0, "first_token": None, "per_segment": [0.0, 0.0, 0.0]}
    b[1, 6, 3] = 1e-3
    b[0, 9, 0] = -2e-3
    out = gd.first_difference(a, b, 4)
    assert out["first_token"] == 6 and out["max"] == pytest.approx(2e-3)
    assert out["per_segment"] == pytest.approx([0.0, 1e-3, 2e-3])
    with pytest.raises(ValueError, match="logits of shapes"):
        gd.first_difference(a, b[:, :8], 4)
    if not torch.cuda.is_available():  # the capture itself: the GPU session's job
        with pytest.raises(SystemExit, match="needs CUDA"):
            gd.main([])
    # --keep-alive's mode holds what every op returns, a temporary Python dropped included, and lets go on exit
    x = torch.arange(6.0)
    with gd.KeepOutputs() as keep:
        total = (x * 2).sum()
    assert float(total) == 30.0 and len(keep.kept) == 2
    assert torch.equal(keep.kept[0], x * 2) and keep.kept[1] is total


def test_stream_hazards_finds_a_missing_wait_and_a_missing_record_stream_and_passes_the_right_hand_off():
    """benchmarks/stream_hazards.py's checker on hand-offs between two stand-in streams: a read on another stream
    than the writer's without a wait is found; so is a tensor made on one stream, read on another and freed without
    ``record_stream`` (the allocating stream could reuse its block before the read); the same hand-off with the wait
    and ``record_stream`` is clean."""
    sh = _load("stream_hazards")

    def hand_off(wait: bool, record: bool):
        main = torch.cuda.current_stream()
        side = checker.stream("side")
        x = torch.arange(8.0) * 2  # made on main
        if wait:
            side.wait_stream(main)
        with torch.cuda.stream(side):
            if record:
                x.record_stream(side)
            y = x + 1  # read on side
        del x  # freed while main has not waited on side
        main.wait_stream(side)
        return y

    found = {}
    for wait, record in ((False, True), (True, False), (True, True)):
        checker = sh.StreamHazards()
        with checker.patched(), checker:
            out = hand_off(wait, record)
        assert torch.equal(out, torch.arange(8.0) * 2 + 1)
        found[wait, record] = {h["kind"] for h in checker.hazards}
    assert found[False, True] == {"read before write"}
    assert found[True, False] == {"freed while in use"}
    assert found[True, True] == set()

    # the backward: a tensor made on main, saved by an op on the side stream, read by its backward there and freed
    # when the backward lets it go (main has not waited on side by then): found only with the backward, and not
    # with record_stream
    class SavesItsInput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x

    w = torch.arange(1.0, 5.0, requires_grad=True)

    def saved_on_side(record: bool):
        main = torch.cuda.current_stream()
        side = main.checker.stream("side")
        a = w * 1  # made on main
        side.wait_stream(main)
        with torch.cuda.stream(side):
            if record:
                a.record_stream(side)
            y = SavesItsInput.apply(a)
        del a
        main.wait_stream(side)
        return y

    for backward, record, kinds in ((False, False, set()), (True, False, {"freed while in use"}),
                                    (True, True, set())):
        w.grad = None
        _, hazards = sh.check(saved_on_side, record, backward=backward)
        assert {h["kind"] for h in hazards} == kinds, (backward, record)
        if backward:  # the backward ran (this one's: the gradient times the saved input)
            g = torch.randn(4, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(w.grad, g * w.detach())
