"""How many PyTorch operations one training step runs, by operation and by module (issue 7's glue).

On a GPU every ATen operation of the step is at least one kernel launch (several for copies of strided data), and in
MAC they repeat per segment and memory layer: the profile of RESULTS.md section 6 (session 12) found ~1,500 copy
kernels, 655 casts and 135 concatenations in one step of the issue's MAC next to 72 launches of the memory kernels.
This counts them on any device with a ``TorchDispatchMode`` over one forward + backward (bf16 autocast by default, as
in training); the memory core's custom ops (``titans::memory_core_*``) count as one operation each, the Triton
launches inside them do not count.  Run it under ``TRITON_INTERPRET=1`` with ``--memory-backend triton`` to see the
glue around the GPU kernels on a CPU (small shapes: the interpreter is slow, the counts per segment do not depend on
the width)::

    TRITON_INTERPRET=1 python benchmarks/op_census.py --models mac --seq 512 --dim 256 --heads 4 --window 128 \\
        --memory-chunk 64 --memory-backend triton --out benchmarks/results/op_census_mac.json

Writes JSON and prints markdown tables (the most frequent operations; the data-movement operations by module; the
matrix products by module and operand shapes: MAC's per-segment projections are small GEMMs of a segment's rows,
latency-bound on a GPU at batch 1, benchmarks/RESULTS.md section 6, session 44).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans.core.models import build_model
from titans.utils.config import ACTIVATION_CHECKPOINTING
from titans.utils.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_model_arguments, model_config  # noqa: E402 - the harness's model from the same arguments
from saved_activations import group_of  # noqa: E402 - the same module rows

# operations that move or convert data without arithmetic: each one a kernel on the GPU that inductor or a fused
# kernel would not need
MOVEMENT = {"copy_", "_to_copy", "clone", "cat", "stack", "contiguous", "index_select", "gather",
            "roll", "repeat", "expand_copy", "flip", "constant_pad_nd", "new_zeros", "zeros_like", "fill_",
            "zero_", "slice_scatter", "select_scatter", "index_put_", "masked_fill"}
# matrix products: counted by operand shapes too (a bias, addmm's first operand, left out)
MATMULS = {"mm", "addmm", "bmm", "baddbmm"}
# views and metadata: no kernel
VIEWS = {"view", "_reshape_alias", "reshape", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
         "squeeze", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk", "unfold",
         "narrow", "empty", "empty_strided", "empty_like", "lift_fresh", "_unsafe_view", "sym_size",
         "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type"}


def _in_triton_interpreter() -> bool:
    """Whether the Triton interpreter (``TRITON_INTERPRET=1``) issued the operation: it moves the kernels' arguments
    with PyTorch operations that a GPU launch does not run."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.endswith(("triton/runtime/interpreter.py", "triton\\runtime\\interpreter.py")):
            return True
        f = f.f_back
    return False


def op_name(func) -> str:
    """``aten.copy_.default`` -> ``copy_``; custom ops keep their namespace (``titans::memory_core_forward``)."""
    ns, name = func.namespace, func._schema.name.split("::")[-1]
    return name if ns == "aten" else f"{ns}::{name}"


class OpCounter(TorchDispatchMode):
    """Counts every operation dispatched while active, with the innermost module running at the time (the
    backward's operations are attributed to ``(backward)``)."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.ops: Counter = Counter()
        self.by_module: dict[str, Counter] = defaultdict(Counter)
        self.matmuls: Counter = Counter()  # (module, operation, operand shapes) -> calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if name not in VIEWS and not _in_triton_interpreter():
            module = group_of(self.stack[-1]) if self.stack else "(backward / outside modules)"
            self.ops[name] += 1
            self.by_module[module][name] += 1
            if name in MATMULS:
                operands = args[1:3] if name in ("addmm", "baddbmm") else args[:2]
                self.matmuls[(module, name, " @ ".join("x".join(map(str, t.shape)) for t in operands))] += 1
        return func(*args, **(kwargs or {}))


def census(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> dict:
    """Operations of one forward with labels and its backward, after one uncounted step (a training step in a
    loop: the rotary tables and masks the model keeps are built by the first step only).  Leaves ``.grad``
    as it found it."""
    amp = torch.autocast(ids.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    params = [p for p in model.parameters() if p.requires_grad]
    with amp:
        warm = model(ids, labels=ids, use_cache=False).loss
    torch.autograd.grad(warm, params, allow_unused=True)
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(mod, args) -> None:
        stack.append(names[mod])

    def leave(mod, args, output) -> None:  # None: the module's output stays as it is
        stack.pop()

    hooks = [h for mod in model.modules() for h in (mod.register_forward_pre_hook(enter),
                                                    mod.register_forward_hook(leave))]
    counter = OpCounter(stack)
    try:
        with counter:
            with amp:
                loss = model(ids, labels=ids, use_cache=False).loss
            forward = sum(counter.ops.values())
            torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    total = sum(counter.ops.values())
    movement = {k: v for k, v in counter.ops.items() if k in MOVEMENT}
    return {"total": total, "forward": forward, "backward": total - forward,
            "movement": sum(movement.values()), "ops": dict(counter.ops.most_common()),
            "movement_by_module": {m: {k: v for k, v in c.most_common() if k in MOVEMENT}
                                   for m, c in sorted(counter.by_module.items())
                                   if any(k in MOVEMENT for k in c)},
            "matmuls": [{"module": m, "op": op, "shapes": shapes, "calls": n}
                        for (m, op, shapes), n in counter.matmuls.most_common()]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mac", "transformer"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    add_model_arguments(ap, dim=256, depth=8, heads=4, window=128, memory_chunk=64, memory_layers=[2, 4, 6],
                        memory_backend_help="triton under TRITON_INTERPRET=1 for the GPU's glue")
    ap.add_argument("--activation-checkpointing", choices=ACTIVATION_CHECKPOINTING, default="none")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    ap.add_argument("--top", type=int, default=25, help="operations printed per model")
    ap.add_argument("--out", default="benchmarks/results/op_census.json")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    result = {"args": vars(args), "models": {}}
    for name in args.models:
        model = build_model(model_config(args, name)).set_activation_checkpointing(args.activation_checkpointing)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq))
        r = census(model, ids, args.bf16)
        result["models"][name] = r
        print(f"\n{name}: {r['total']:,} operations in one training step ({r['forward']:,} forward, "
              f"{r['backward']:,} backward), {r['movement']:,} of them data movement\n")
        print("| operation | count |\n| --- | --- |")
        for op, n in list(r["ops"].items())[:args.top]:
            print(f"| {'**' + op + '**' if op in MOVEMENT else op} | {n} |")
        print("\n| module | data-movement operations |\n| --- | --- |")
        for mod, c in sorted(r["movement_by_module"].items(), key=lambda kv: -sum(kv[1].values())):
            print(f"| {mod} | {sum(c.values())}: " + ", ".join(f"{k} {v}" for k, v in c.items()) + " |")
        print("\n| module | matrix product | operand shapes | calls |\n| --- | --- | --- | --- |")
        for mm in r["matmuls"][:args.top]:
            print(f"| {mm['module']} | {mm['op']} | {mm['shapes']} | {mm['calls']} |")
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"\nJSON: {args.out}")
    return result


if __name__ == "__main__":
    main()
