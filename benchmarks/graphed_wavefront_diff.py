"""Where a CUDA-graph capture of the wavefront's forward first departs from the same forward run eagerly (GPU).

Session 37: with MAC's batched read-outs, ``graphed_loss`` gave another float32 loss than the eager wavefront
(4.176023 vs 4.176198; eagerly the wavefront equals the one pass bit for bit), and every layout without them agreed.
This captures ``wavefront_logits`` alone (no backward, no ``make_graphed_callables``) for each layout - with autograd
recording, as in training, and under ``torch.no_grad()`` - replays it, and compares the logits with an eager call's
token by token: the largest difference, the first token that differs, and the largest difference per segment.  A
first difference in the first call's first segment points at a kernel or its arguments; one only from the second
call on, at something carried from call to call.

    python benchmarks/graphed_wavefront_diff.py --out results/graphed_wavefront_diff.json [--keep-alive] [--sanitize]

Session 40 (an H100): every layout that writes through the split core failed ``graphed_loss``'s test, the PyTorch
memory too, so the Triton kernels are not the cause.  Two probes of what remains (PyTorch's own ops, streams, the
capture's memory pool):
- ``--keep-alive`` captures each layout again while a dispatch mode holds every tensor an op makes
  (:class:`KeepOutputs`): nothing made during the capture is freed, so the capture's pool hands no block out twice.
  If the replay then agrees, a block was reused while a kernel that the graph does not order before the reuse still
  read it (a missing ``record_stream`` or ``wait_stream``).
- ``--sanitize`` runs each layout's forward and backward eagerly under PyTorch's CUDA sanitizer (CSAN), which reports
  two streams touching one live tensor without a synchronisation between them (aten ops only: the PyTorch-memory
  layout shows everything, the Triton ones miss the kernels' own reads and writes).

The model and data are those of ``tests/test_wavefront.py``'s CUDA tests (MAC, dim 64, window 32, memory in block
1, 2 x 256 tokens, float32), three segments a wavefront call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from titans.training.wavefront import wavefront_logits
from titans.utils.io import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wavefront_float32 import tests_model_and_ids  # noqa: E402 - the tests' model and tokens, as that script's

# (name, switches, model options[, wavefront_logits options]); the read-outs on the chain unless a layout says apart
# (TITANS_WAVEFRONT_READOUT_STREAMS=auto, the default since session 42, puts them apart with 32 hardware queues)
_ON_CHAIN = {"TITANS_WAVEFRONT_READOUT_STREAMS": "0"}
LAYOUTS = [
    ("each segment its own inputs and read-outs", {**_ON_CHAIN, "TITANS_WAVEFRONT_BATCHED_QUERIES": "0"}, {}),
    ("batched inputs", _ON_CHAIN, {}),
    ("batched read-outs", {**_ON_CHAIN, "TITANS_WAVEFRONT_BATCHED_QUERIES": "0",
                           "TITANS_WAVEFRONT_BATCHED_READOUTS": "1"}, {}),
    ("batched read-outs, PyTorch memory", {**_ON_CHAIN, "TITANS_WAVEFRONT_BATCHED_QUERIES": "0",
                                          "TITANS_WAVEFRONT_BATCHED_READOUTS": "1"}, {"memory_backend": "fused"}),
    ("batched read-outs, walks in one program a head", {**_ON_CHAIN, "TITANS_WAVEFRONT_BATCHED_QUERIES": "0",
                                                       "TITANS_WAVEFRONT_BATCHED_READOUTS": "1",
                                                       "TITANS_TRITON_WALK_PARTS": "1"}, {}),
    ("read-outs apart", {"TITANS_WAVEFRONT_BATCHED_QUERIES": "0", "TITANS_WAVEFRONT_READOUT_STREAMS": "1"}, {}),
    ("batched inputs, read-outs apart", {"TITANS_WAVEFRONT_READOUT_STREAMS": "1"}, {}),  # the default, 32 queues
    ("batched read-outs apart", {"TITANS_WAVEFRONT_BATCHED_READOUTS": "1", "TITANS_WAVEFRONT_READOUT_STREAMS": "1"},
     {}),
    # the same segment-major loop on the caller's stream alone: no stream hands anything to another
    ("batched read-outs, one stream", {**_ON_CHAIN, "TITANS_WAVEFRONT_BATCHED_QUERIES": "0",
                                       "TITANS_WAVEFRONT_BATCHED_READOUTS": "1"}, {}, {"streams": False}),
    ("batched inputs, one stream", _ON_CHAIN, {}, {"streams": False}),
]
TOLERANCE = 1e-5


def first_difference(a: torch.Tensor, b: torch.Tensor, segment: int, tol: float = TOLERANCE) -> dict:
    """How logits ``a`` and ``b`` (B, T, vocab) differ: the largest absolute difference, the first token position
    whose difference exceeds ``tol`` (None if none does) and the largest difference per segment of ``segment``
    tokens."""
    if a.shape != b.shape:
        raise ValueError(f"logits of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    per_token = (a.detach().float() - b.detach().float()).abs().amax(dim=(0, 2))  # (T,)
    over = (per_token > tol).nonzero()
    per_segment = [float(per_token[s:s + segment].max()) for s in range(0, per_token.shape[0], segment)]
    return {"max": float(per_token.max()), "first_token": int(over[0]) if len(over) else None,
            "per_segment": per_segment}


class KeepOutputs(TorchDispatchMode):
    """While active, holds every tensor an op returns (``kept``), so that none is freed and its memory handed out
    again before the mode is left and ``kept`` dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.kept.extend(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@contextmanager
def switches(env: dict):
    """The ``TITANS_*`` switches of ``env`` set for the block, the former values back after it."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def compare(model_options: dict, grad: bool, step: int = 96, call_options: dict | None = None,
            keep_alive: bool = False) -> dict:
    """Eager against captured-and-replayed ``wavefront_logits`` of the tests' model (see the module docstring);
    ``call_options``: more keywords for ``wavefront_logits`` (``streams=False``: the caller's stream alone);
    ``keep_alive``: the capture under :class:`KeepOutputs` (no block of its pool reused)."""
    model, ids = tests_model_and_ids("cuda", **model_options)
    call = dict(call_options or {}, segment=step)
    mode = nullcontext() if grad else torch.no_grad()
    with mode:
        eager = wavefront_logits(model, ids, **call).detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture, as graphed_loss does
            for _ in range(2):
                wavefront_logits(model, ids, **call)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        keep = KeepOutputs() if keep_alive else nullcontext()
        with torch.cuda.graph(graph), keep:
            captured = wavefront_logits(model, ids, **call)
        graph.replay()
        torch.cuda.synchronize()
        replayed = captured.detach().clone()
        again = wavefront_logits(model, ids, **call).detach()  # eager after the capture: the same as before?
    window = model.config.window
    return {"replay": first_difference(replayed, eager, window), "eager_again": first_difference(again, eager, window)}


def sanitize(model_options: dict, step: int = 96, call_options: dict | None = None) -> dict:
    """The tests' model's wavefront forward and backward run eagerly under PyTorch's CUDA sanitizer: ``{"races":
    its report (stack traces of both accesses), or None}``."""
    from torch.cuda._sanitizer import CUDASanitizerDispatchMode, CUDASanitizerErrors

    model, ids = tests_model_and_ids("cuda", **model_options)
    try:
        with CUDASanitizerDispatchMode():
            logits = wavefront_logits(model, ids, **dict(call_options or {}, segment=step))
            logits.float().square().mean().backward()
            torch.cuda.synchronize()
    except CUDASanitizerErrors as e:
        return {"races": str(e)[:20000]}
    return {"races": None}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--keep-alive", action="store_true",
                    help="each layout captured twice: as it is, and holding every tensor made in the capture")
    ap.add_argument("--sanitize", action="store_true",
                    help="also each layout's eager forward and backward under PyTorch's CUDA sanitizer")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("graphed_wavefront_diff.py needs CUDA (it captures CUDA graphs)")
    rows = []
    print("| layout | autograd | kept alive | replay vs eager: max, first token | eager again: max |\n"
          "| --- | --- | --- | --- | --- |")
    for name, env, options, *call in LAYOUTS:
        call_options = call[0] if call else {}
        for grad in (True, False):
            for keep_alive in (False, True) if args.keep_alive else (False,):
                with switches(env):
                    try:
                        res = compare(options, grad, call_options=call_options, keep_alive=keep_alive)
                    except Exception as e:  # noqa: BLE001 - a layout that cannot be captured is a finding too
                        res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.append({"layout": name, "switches": env, "model": options, "call": call_options, "grad": grad,
                             "keep_alive": keep_alive, **res})
                if "error" in res:
                    print(f"| {name} | {grad} | {keep_alive} | {res['error']} | - |")
                else:
                    r, e = res["replay"], res["eager_again"]
                    print(f"| {name} | {grad} | {keep_alive} | {r['max']:.2e}, {r['first_token']} | {e['max']:.2e} |")
        if args.sanitize:
            with switches(env):
                try:
                    res = sanitize(options, call_options=call_options)
                except Exception as e:  # noqa: BLE001 - recorded, the other layouts still run
                    res = {"races": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append({"layout": name, "switches": env, "model": options, "call": call_options, "sanitizer": True,
                         **res})
            found = res.get("error") or ("races found" if res["races"] else "no race found")
            print(f"| {name} | sanitizer | - | {found} | - |")
        if args.out:  # after every layout: a call cut short keeps what it found
            atomic_write_text(args.out, json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
