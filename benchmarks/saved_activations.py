"""What a training step keeps for its backward, by module (issue 7's peak-memory target).

Peak training memory is parameters + optimiser state + the activations autograd saves between forward and
backward.  This counts the last part exactly, on any device: every tensor saved for backward (``save_for_backward``
of the memory core included) is recorded once per storage through ``torch.autograd.graph.saved_tensors_hooks`` and
attributed to the innermost module running when it was saved.  Parameters are not counted.  On the CPU the attention
is PyTorch's math kernel, which saves its probabilities (flash attention on a GPU keeps only a log-sum-exp per row),
so the ``attn`` rows overstate the GPU; the memory's rows are the same tensors the GPU path saves (the fused
``torch`` core saves what the Triton kernels save).

    python benchmarks/saved_activations.py --models mac transformer --seq 4096 --dim 512 --depth 8 --heads 8 \\
        --window 512 --memory-layers 2 4 6 --memory-chunk 64 --out benchmarks/results/saved_activations.json

Writes JSON and prints a markdown table (MB per sequence of ``--seq`` tokens, batch 1; a batch of B saves B times
as much).

``--activation-checkpointing none memory full`` measures each model with each mode
(``training.activation_checkpointing``; JSON keys ``mac``, ``mac/memory``, ...).  A recomputed region keeps its
inputs (counted: checkpoint saves them for backward) and none of its own saves; the backward holds one region's
recomputed saves at a time on top of what is counted here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch

from titans.core.models import build_model
from titans.utils.config import ACTIVATION_CHECKPOINTING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_model_arguments, model_config  # noqa: E402 - the harness's model from the same arguments


def group_of(path: str) -> str:
    """A module path -> its row: block numbers dropped (``blocks.3.memory.to_qkv`` -> ``memory.to_qkv``)."""
    return re.sub(r"^blocks\.\d+\.", "", path) or "(model)"


def saved_by_module(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> dict[str, dict]:
    """Run one forward with labels; returns {module group: {"bytes", "tensors", "by_dtype"}} of what is saved."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []
    def enter(mod, args):
        stack.append(names[mod])

    def leave(mod, args, output):  # returns None: the module's output stays as it is
        stack.pop()

    for mod in model.modules():
        hooks.append(mod.register_forward_pre_hook(enter))
        hooks.append(mod.register_forward_hook(leave))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    out: dict[str, dict] = defaultdict(lambda: {"bytes": 0, "tensors": 0, "by_dtype": defaultdict(int),
                                                "by_shape": defaultdict(int)})

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in seen and key not in params and st.nbytes():
            seen.add(key)
            row = out[group_of(stack[-1]) if stack else "(outside modules)"]
            row["bytes"] += st.nbytes()
            row["tensors"] += 1
            dtype = str(t.dtype).replace("torch.", "")
            row["by_dtype"][dtype] += st.nbytes()
            row["by_shape"][f"{dtype}{list(t.shape)}"] += st.nbytes()
        return t

    amp = torch.autocast(ids.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
            loss = model(ids, labels=ids, use_cache=False).loss
    finally:
        for h in hooks:
            h.remove()
    del loss
    return {k: {"bytes": v["bytes"], "tensors": v["tensors"], "by_dtype": dict(v["by_dtype"]),
                "largest": dict(sorted(v["by_shape"].items(), key=lambda x: -x[1])[:6])} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mac", "transformer"])
    ap.add_argument("--seq", type=int, default=4096)
    add_model_arguments(ap, dim=512, depth=8, heads=8, window=512, memory_chunk=64, memory_layers=[2, 4, 6],
                        memory_backend="fused", memory_backend_help="fused: the hand-written backward the kernels "
                        "implement")
    ap.add_argument("--activation-checkpointing", nargs="+", choices=ACTIVATION_CHECKPOINTING, default=["none"],
                    metavar="MODE", help="none | memory | full, one or more (each model is measured with each): what "
                    "training.activation_checkpointing recomputes in the backward (memory: each memory layer's "
                    "neural-memory work; full: whole blocks)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    ap.add_argument("--top", type=int, default=12, help="rows printed per model")
    ap.add_argument("--out", default="benchmarks/results/saved_activations.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    result = {"args": vars(args), "models": {}}
    for name, mode in ((n, m) for n in args.models for m in args.activation_checkpointing):
        model = build_model(model_config(args, name)).set_activation_checkpointing(mode)
        ids = torch.randint(0, args.vocab, (1, args.seq))
        rows = saved_by_module(model, ids, args.bf16)
        total = sum(r["bytes"] for r in rows.values())
        key = name if mode == "none" else f"{name}/{mode}"  # a model without checkpointing keeps its plain name
        result["models"][key] = {"total_bytes": total, "params": model.num_parameters(),
                                 "activation_checkpointing": mode, "by_module": rows}
        print(f"\n{key}: {total / 2**20:,.1f} MB saved for backward per {args.seq}-token sequence "
              f"({model.num_parameters():,} parameters, activation checkpointing {mode})\n")
        print("| module | MB | share | tensors | dtypes (MB) |\n| --- | --- | --- | --- | --- |")
        for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["bytes"])[:args.top]:
            dt = ", ".join(f"{d} {b / 2**20:.1f}" for d, b in sorted(r["by_dtype"].items(), key=lambda x: -x[1]))
            print(f"| {k} | {r['bytes'] / 2**20:,.1f} | {100 * r['bytes'] / total:.0f}% | {r['tensors']} | {dt} |")
    if len(result["models"]) > 1:
        base = next(iter(result["models"].values()))["total_bytes"]
        ref = result["models"].get("transformer", {}).get("total_bytes", base)
        print("\n| model | MB | x transformer |\n| --- | --- | --- |")
        for key, r in result["models"].items():
            print(f"| {key} | {r['total_bytes'] / 2**20:,.1f} | {r['total_bytes'] / ref:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nJSON: {args.out}")


if __name__ == "__main__":
    main()
