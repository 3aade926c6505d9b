"""Stream hazards of the wavefront's forward and backward, found on the CPU with stand-in CUDA streams.

The wavefront (``titans.training.wavefront``) runs each block, feed-forward, batched input, read-out and
weight-gradient sum on CUDA streams of its own, and hands tensors from one to another with ``wait_stream`` (order)
and ``record_stream`` (lifetime).  A missing one is a race that an eager run on the GPU usually survives (the host
launches kernels about as fast as they run) but a CUDA-graph replay need not: its branches run as soon as their
edges allow, and the capture's memory pool hands a freed block to the next allocation of its stream at once.
Session 40 found every layout of MAC's split memory core (the walk alone, then the read-out) computing another loss
when captured, the PyTorch memory too, so the Triton kernels are not the cause; this found why (the fresh state made
on the caller's stream, read on the blocks' and freed mid-call without ``record_stream``; fixed in
``wavefront_logits``, benchmarks/RESULTS.md section 6, session 40).

This runs the wavefront's forward on the CPU with the streams replaced by stand-ins: ``torch.cuda.stream``,
``torch.cuda.current_stream``, ``Stream.wait_stream`` and ``Tensor.record_stream`` keep vector clocks, and a
``TorchDispatchMode`` sees every aten op with the stream it was issued on (what the op reads, what it writes, what it
allocates).  A storage's end is seen by a finalizer on it.  It reports, by the source lines involved:

- ``read before write``: an op reads a storage whose last writer ran on another stream that the reading stream has
  not waited on since (a missing ``wait_stream``);
- ``write over reads`` / ``write over write``: an op writes a storage that another stream read or wrote without
  the writing stream having waited on it;
- ``freed while in use``: a storage is freed (its last reference gone) while another stream's access to it is not
  ordered before the allocating stream's present and that stream is not among the storage's ``record_stream``
  streams - the caching allocator may hand the block to the allocating stream's next allocation, whose kernels then
  overwrite it before the other stream's kernel reads it (a missing ``record_stream``).

The backward (by default; ``--forward-only`` leaves it out) is emulated: each autograd node runs on the stream the
forward made it on, after the streams that handed it gradients, as CUDA's autograd engine does; the engine's own
work (handing gradients on, summing a node's gradients from several producers) is taken as correct and not checked.

What it does not see: the Triton kernels' own reads and writes (the memory's ``fused`` backend is PyTorch through
and through), code that takes another path on CUDA (``if t.is_cuda``), and anything a graph capture does
differently from an eager call.

    python benchmarks/stream_hazards.py [--forward-only] --out benchmarks/results/stream_hazards_cpu.json
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import titans.training.wavefront as wavefront_module
from titans.utils.io import atomic_write_text
from titans.utils.tensors import autograd_nodes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class StandInStream:
    """A CUDA stream's stand-in: a name and a vector clock (what of every stream this stream's next op comes after)."""

    def __init__(self, checker: StreamHazards, name: str) -> None:
        self.checker, self.name = checker, name
        self.clock: dict[str, int] = {name: 0}

    def wait_stream(self, other: StandInStream) -> None:
        self.wait_clock(other.clock)

    def wait_clock(self, clock: dict[str, int]) -> None:
        """Order this stream's next op after everything ``clock`` (a stream's clock, taken earlier) comes after."""
        for k, v in clock.items():
            self.clock[k] = max(self.clock.get(k, 0), v)

    def after(self, stream: str, tick: int) -> bool:
        """Whether this stream's next op is ordered after ``stream``'s op number ``tick``."""
        return stream == self.name or self.clock.get(stream, 0) >= tick

    def __repr__(self) -> str:
        return f"StandInStream({self.name})"


@dataclass
class Access:
    stream: str
    tick: int
    op: str
    where: str


@dataclass
class StorageLife:
    stream: str  # the allocating stream
    made: Access
    write: Access | None = None
    reads: list[Access] = field(default_factory=list)  # since the last write
    accesses: list[Access] = field(default_factory=list)  # every access, for the free check
    recorded: set[str] = field(default_factory=set)  # record_stream's streams


def _where() -> str:
    """The innermost titans source line of the calling Python stack (file:line function)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "/titans/" in name and "stream_hazards" not in name:
            return f"{name[name.rindex('/titans/') + 1:]}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "?"


class StreamHazards(TorchDispatchMode):
    """The checker (see the module docstring).  Use as a context manager around the code to check, with
    :meth:`patched` applied; ``hazards`` lists what it found, each once per (kind, source lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: dict[str, StandInStream] = {}
        self.main = self.stream("main")
        self.current = self.main
        self.lives: dict[int, StorageLife] = {}
        self.hazards: list[dict] = []
        self._seen: set[tuple] = set()
        self.checking_frees = True  # off once the checked call returned (what it leaves dies with autograd's graph)
        self._quiet = False  # the checker's own ops (sequence-number probes) are not checked
        # (autograd sequence number, stream) at each stream switch: a node made in the forward runs its backward on
        # the stream that was current when it was made, as on CUDA
        self._switches: list[tuple[int, str]] = [(-1, "main")]

    # ------------------------------------------------------------------ streams

    def stream(self, name: str) -> StandInStream:
        if name not in self.streams:
            self.streams[name] = StandInStream(self, name)
        return self.streams[name]

    @contextmanager
    def on(self, stream: StandInStream | None):
        if stream is None:
            yield
            return
        before, self.current = self.current, stream
        self._mark_switch()
        try:
            yield
        finally:
            self.current = before
            self._mark_switch()

    def _mark_switch(self) -> None:
        self._quiet = True
        try:
            with torch.enable_grad():  # the next autograd node's sequence number (a node made for it)
                seq = torch.ones(1, requires_grad=True).clone().grad_fn._sequence_nr()
        finally:
            self._quiet = False
        self._switches.append((seq, self.current.name))

    def stream_of(self, node) -> str:
        """The stream the forward made autograd ``node`` on (its backward's stream on CUDA)."""
        # the switches come in increasing sequence numbers, the first (-1, "main")
        return self._switches[bisect.bisect_right(self._switches, node._sequence_nr(), key=lambda s: s[0]) - 1][1]

    def backward(self, out: torch.Tensor, grad: torch.Tensor) -> None:
        """``out.backward(grad)`` from the main stream with CUDA's stream semantics emulated: the root's stream waits
        for the calling stream; each node runs on its forward's stream (:meth:`stream_of`) after the streams of the
        nodes that handed it gradients (the engine's event waits); the gradients the engine hands on count as
        recorded on their consumer's stream, and the sums the engine makes of a node's gradients from several
        producers are not checked (the engine's own business); a leaf's accumulation runs where its gradient came
        from; at the end the main stream waits on every stream."""
        nodes = autograd_nodes(out)
        pending: dict = {}
        handles = []

        def before(node):
            def hook(grad_outputs):
                self._quiet = False
                got = pending.pop(node, [])
                if type(node).__name__ == "AccumulateGrad":
                    self.current = self.stream(got[-1][0]) if got else self.current
                else:
                    self.current = self.stream(self.stream_of(node))
                for _, clock in got:
                    self.current.wait_clock(clock)
            return hook

        def after(node):
            def hook(grad_inputs, grad_outputs):
                here = self.current
                for (fn, _), g in zip(node.next_functions, grad_inputs):
                    if fn is None:
                        continue
                    pending.setdefault(fn, []).append((here.name, dict(here.clock)))
                    if isinstance(g, torch.Tensor):
                        consumer = here.name if type(fn).__name__ == "AccumulateGrad" else self.stream_of(fn)
                        self.record_stream(g, self.stream(consumer))
                # what the engine does next - adding these gradients to those its consumers already got, on the
                # consumers' streams after waiting for this one - is its own, and not checked
                self._quiet = True
            return hook

        for node in nodes:
            handles.append(node.register_prehook(before(node)))
            handles.append(node.register_hook(after(node)))
        # the engine syncs the root's stream with the calling stream (where the gradient was made)
        self.stream(self.stream_of(out.grad_fn)).wait_stream(self.current)
        try:
            out.backward(grad)
        finally:
            self._quiet = False
            for h in handles:
                h.remove()
            self.current = self.main
            for other in list(self.streams.values()):
                self.main.wait_stream(other)

    def record_stream(self, t: torch.Tensor, stream: StandInStream) -> None:
        life = self.lives.get(self._key(t))
        if life is not None:
            life.recorded.add(stream.name)

    @contextmanager
    def patched(self):
        """torch.cuda's stream calls, Tensor.record_stream and the wavefront's stream choice and side streams
        replaced by the stand-ins, for the block."""
        cuda = torch.cuda
        saved = (cuda.stream, cuda.current_stream, torch.Tensor.record_stream, wavefront_module._use_streams,
                 wavefront_module.side_stream)
        checker = self
        cuda.stream = lambda s: checker.on(s)
        cuda.current_stream = lambda device=None: checker.current
        torch.Tensor.record_stream = lambda t, s: checker.record_stream(t, s)
        wavefront_module._use_streams = lambda streams, dev: True if streams is None else streams
        wavefront_module.side_stream = lambda dev, role="side", urgent=False: checker.stream(
            "-".join(str(r) for r in (role if isinstance(role, tuple) else (role,))))
        try:
            yield self
        finally:
            (cuda.stream, cuda.current_stream, torch.Tensor.record_stream, wavefront_module._use_streams,
             wavefront_module.side_stream) = saved

    # ------------------------------------------------------------------ ops

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    def _report(self, kind: str, life: StorageLife, now: Access, then: Access) -> None:
        key = (kind, now.where, then.where, life.made.where)
        if key in self._seen:
            return
        self._seen.add(key)
        self.hazards.append({"kind": kind, "stream": now.stream, "op": now.op, "where": now.where,
                             "other_stream": then.stream, "other_op": then.op, "other_where": then.where,
                             "made_on": life.stream, "made_by": life.made.op, "made_where": life.made.where})

    def _freed(self, key: int) -> None:
        life = self.lives.pop(key, None)
        if life is None or not self.checking_frees:
            return
        home = self.streams[life.stream]
        for a in life.accesses:
            if a.stream not in life.recorded and not home.after(a.stream, a.tick):
                self._report("freed while in use", life, Access(life.stream, home.clock[life.stream], "free",
                                                                 _where()), a)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten.record_stream.default or self._quiet:
            return out
        s = self.current
        s.clock[s.name] += 1
        tick = s.clock[s.name]
        name, where = func.__name__, _where()
        written: list[torch.Tensor] = []
        read: list[torch.Tensor] = []
        schema = func._schema.arguments
        for i, a in enumerate(args):
            arg = schema[i] if i < len(schema) else None
            target = written if arg is not None and arg.alias_info is not None and arg.alias_info.is_write else read
            target.extend(t for t in tree_leaves(a) if isinstance(t, torch.Tensor))
        for k, a in kwargs.items():
            arg = next((x for x in schema if x.name == k), None)
            target = written if arg is not None and arg.alias_info is not None and arg.alias_info.is_write else read
            target.extend(t for t in tree_leaves(a) if isinstance(t, torch.Tensor))
        in_keys = {self._key(t) for t in read + written}
        view = all(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns) and bool(
            func._schema.returns)
        now = Access(s.name, tick, name, where)
        for t in read:
            key = self._key(t)
            life = self.lives.get(key)
            if life is None or view:
                continue
            if life.write is not None and not s.after(life.write.stream, life.write.tick):
                self._report("read before write", life, now, life.write)
            life.reads.append(now)
            life.accesses.append(now)
        for t in written + [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]:
            key = self._key(t)
            if key == 0:
                continue
            life = self.lives.get(key)
            if life is None:
                if key in in_keys or view:  # a view of something made outside the checked code
                    continue
                life = self.lives[key] = StorageLife(s.name, now)
                weakref.finalize(t.untyped_storage(), self._freed, key)
            elif view and t not in written:
                continue
            for then in life.reads:
                if not s.after(then.stream, then.tick):
                    self._report("write over reads", life, now, then)
            if life.write is not None and not s.after(life.write.stream, life.write.tick):
                self._report("write over write", life, now, life.write)
            life.write, life.reads = now, []
            life.accesses.append(now)
        return out


def check(fn, *args, backward: bool = False, **kwargs) -> tuple[object, list[dict]]:
    """``fn(*args, **kwargs)`` under the stand-in streams and the checker: (the sum of its tensor result, the
    hazards found).  ``backward``: then the backward of a fixed random projection of the result
    (:meth:`StreamHazards.backward`), frees checked through it; without, frees are checked while ``fn`` runs only
    (what it returns and autograd's graph keeps dies in the backward)."""
    checker = StreamHazards()
    with ExitStack() as stack:
        stack.enter_context(checker.patched())
        stack.enter_context(checker)
        out = fn(*args, **kwargs)
        summary = None if out is None else float(out.detach().double().sum())
        if backward:
            grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
            checker.backward(out, grad)
        checker.checking_frees = False
        del out
    return summary, checker.hazards


def wavefront_hazards(layout_env: dict, model_options: dict, step: int = 96, dtype=torch.float32,
                      backward: bool = True, tokens: int = 256) -> dict:
    """The tests' CUDA model (``wavefront_float32.tests_model_and_ids``) on the CPU, its wavefront forward (and
    ``backward``) over the first ``tokens`` of its rows under the checker with the switches of ``layout_env``:
    ``{"logits_sum", "hazards"}``."""
    from graphed_wavefront_diff import switches
    from wavefront_float32 import tests_model_and_ids

    with switches(layout_env):
        model, ids = tests_model_and_ids("cpu", **model_options)
        model, ids = model.to(dtype), ids[:, :tokens]

        def forward():
            return wavefront_module.wavefront_logits(model, ids, segment=step)

        total, hazards = check(forward, backward=backward)
    return {"logits_sum": total, "hazards": hazards}


def main(argv: list[str] | None = None) -> dict:
    from graphed_wavefront_diff import LAYOUTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path")
    ap.add_argument("--forward-only", action="store_true", help="not the backward")
    ap.add_argument("--tokens", type=int, default=256, help="tokens of each of the 2 rows (3 segments a call)")
    ap.add_argument("--layouts", nargs="*", default=None,
                    help="layout names (default: all of graphed_wavefront_diff's on streams)")
    args = ap.parse_args(argv)
    rows = []
    for name, env, options, *call in LAYOUTS:
        if args.layouts and name not in args.layouts:
            continue
        if call and call[0].get("streams") is False:
            continue  # one stream: nothing to check
        res = wavefront_hazards(env, options, backward=not args.forward_only, tokens=args.tokens)
        rows.append({"layout": name, "switches": env, "model": options, **res})
        print(f"{name}: {len(res['hazards'])} hazard(s)")
        for h in res["hazards"]:
            print(f"  {h['kind']}: {h['op']} on {h['stream']} at {h['where']}; {h['other_op']} on {h['other_stream']}"
                  f" at {h['other_where']}; made by {h['made_by']} on {h['made_on']} at {h['made_where']}")
    out = {"date": __import__("datetime").date.today().isoformat(), "torch": torch.__version__, "rows": rows}
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
