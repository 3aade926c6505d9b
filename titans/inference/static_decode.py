"""Static decoding: a branch-free single-token step over fixed-shape state, for CUDA graphs (issue 7).

``TitansLM.forward(ids (B, 1), state)`` decodes with host-side control flow: the KV caches grow by one token
and are pruned (their shapes change every step, and MAC's cache empties at each segment start), and the
memory's chunk boundary, MAC's segment start and the pruning branch on Python ints (``ModelState.position``,
``MemoryState.seen``).  None of that can be captured in a CUDA graph.  Here the same step runs over a
:class:`StaticDecodeState` whose tensors never change shape or address:

* each attention KV cache is a ring buffer of fixed capacity, what the mask can still see: ``window`` slots for
  sliding windows and MAC segments, a caller-given ``max_len`` for full causal attention.  The token at absolute
  position p lives in slot ``p % capacity``; a positions buffer (-1 = empty) lets the ordinary mask rule drop
  empty slots and tokens of earlier MAC segments;
* the absolute position is a 0-dim int64 device tensor; RoPE, the memory's chunk boundary and MAC's segment
  start are computed from it, ``torch.where`` instead of host branches;
* every update is copied into the state's buffers in place.

:func:`static_decode_step` runs the model's own blocks (``TitansBlock.mix`` with :class:`StaticOps`, the
memory's rank-one ``NeuralMemory.step``), gives the logits of ``model(ids, state)`` (to rounding) and never
syncs with the host.  :class:`GraphedDecoder` captures it once in a CUDA graph and replays it at every
position; :meth:`StaticDecodeState.to_model_state` hands the stream back to the normal path.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from titans.core.attention.attention_layer import KVCache, attention
from titans.core.attention.attention_utils import MaskSpec
from titans.core.memory.neural_memory import MemoryState
from titans.core.models.model import LayerOps, LayerState, ModelState, TitansBlock, TitansLM
from titans.utils.tensors import gc_paused, side_stream

# ----------------------------------------------------------------------------- state


@dataclass
class RingKV:
    """Keys / values of one attention stream in a fixed-capacity ring buffer.

    k, v: (B, Hkv, capacity, hd); pos: (capacity,) int64 absolute positions, -1 = empty slot.  The token at
    position p lives in slot ``p % capacity``: writing the newest token overwrites the oldest one, which the mask
    no longer lets anyone see (the capacity is chosen so, see :func:`ring_capacity`).
    """

    k: Tensor
    v: Tensor
    pos: Tensor

    @property
    def capacity(self) -> int:
        return self.pos.shape[0]

    @classmethod
    def from_entries(cls, k: Tensor | None, v: Tensor | None, pos: Tensor | None, *, batch: int, kv_heads: int,
                     head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device) -> RingKV:
        """A ring holding the cached entries k, v (B, Hkv, n, hd) at positions pos (n,) (None: empty)."""
        ring = cls(torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device),
                   torch.zeros(batch, kv_heads, capacity, head_dim, dtype=dtype, device=device),
                   torch.full((capacity,), -1, dtype=torch.int64, device=device))
        # the newest capacity - 1 entries are all a later query can see (the next token takes the last slot)
        n = 0 if pos is None else min(pos.shape[0], capacity - 1)
        if n > 0:
            pos = pos[-n:].to(device)
            slots = pos % capacity
            ring.k.index_copy_(2, slots, k[:, :, -n:].to(device=device, dtype=dtype))
            ring.v.index_copy_(2, slots, v[:, :, -n:].to(device=device, dtype=dtype))
            ring.pos.index_copy_(0, slots, pos)
        return ring

    def write(self, k: Tensor, v: Tensor, position: Tensor) -> None:
        """Store the token at ``position`` (0-dim int64 device tensor): k, v (B, Hkv, 1, hd).  No host sync."""
        slot = (position % self.capacity).view(1)
        self.k.index_copy_(2, slot, k.to(self.k.dtype))
        self.v.index_copy_(2, slot, v.to(self.v.dtype))
        self.pos.index_copy_(0, slot, position.view(1))

    def newest(self, end: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """The ``n`` entries at positions end - n .. end - 1, oldest first (a :class:`KVCache`'s layout)."""
        if n > self.capacity:
            raise ValueError(f"the ring holds {self.capacity} positions, {n} were asked for: it overflowed (build "
                             "the static state with a larger max_len)")
        positions = torch.arange(end - n, end, device=self.pos.device)
        slots = positions % self.capacity
        return self.k.index_select(2, slots), self.v.index_select(2, slots), positions

    def tensors(self) -> list[Tensor]:
        return [self.k, self.v, self.pos]


def ring_capacity(mask: MaskSpec, max_len: int | None) -> int:
    """Slots a KV ring needs: the token being decoded plus every earlier position the mask lets it see.

    Sliding window: ``MaskSpec.keep_after`` keeps window - 1 earlier positions, so ``window`` slots.  MAC segment:
    at most window - 1 earlier positions of the same segment, so ``window``.  Full causal attention sees every
    earlier token: ``max_len`` (the most positions the stream will reach) must be given.
    """
    if mask.kind == "causal":
        if max_len is None:
            raise ValueError("max_len: full causal attention (variant 'transformer') sees every earlier token; give "
                             "the number of positions the stream will reach (prompt + new tokens)")
        return max_len
    return mask.window


@dataclass
class StaticLayerState:
    """One block's recurrent state as fixed buffers (see :class:`LayerState` for what each part means).

    memory: a :class:`MemoryState` whose tensors are the buffers; its host int ``seen`` is not kept up to date:
    the memory's token count is the model position plus ``seen_offset`` (the persistent tokens MAG / MAL / LMM
    absorb when a stream starts).  kv / memory_kv: rings of the context tokens and of MAC's memory tokens;
    ``mask`` is the block's mask.  segment_weights, read_conv (MAC) and prefix (MAL) as in LayerState.
    """

    memory: MemoryState | None = None
    seen_offset: int = 0
    kv: RingKV | None = None
    memory_kv: RingKV | None = None
    mask: MaskSpec | None = None
    segment_weights: tuple[Tensor, ...] | None = None
    read_conv: Tensor | None = None
    prefix: Tensor | None = None

    def buffers(self) -> list[Tensor]:
        """Every tensor a step writes (in place)."""
        out: list[Tensor] = []
        if self.memory is not None:
            m = self.memory
            out += [*m.weights, *m.momentum, *m.chunk_weights] + ([m.conv] if m.conv is not None else [])
        for ring in (self.kv, self.memory_kv):
            if ring is not None:
                out += ring.tensors()
        out += list(self.segment_weights or ())
        if self.read_conv is not None:
            out.append(self.read_conv)
        return out


def _buffer(t: Tensor) -> Tensor:
    """A private, contiguous copy (a state's tensors may be shared or expanded views of the initial weights)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _clones(ts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.clone() for t in ts)


def _copy_into(dst: tuple[Tensor, ...], src: tuple[Tensor, ...]) -> None:
    for d, s in zip(dst, src):
        d.copy_(s)


def _activation_dtype(model: TitansLM, device: torch.device) -> torch.dtype:
    """The dtype attention keys come out in: autocast's when it is on, else the model's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.embed.weight.dtype


@dataclass
class StaticDecodeState:
    """The whole model's decode state in fixed-shape device buffers: one :class:`StaticLayerState` per block,
    the absolute ``position`` (0-dim int64 device tensor, the tokens consumed so far), the batch size, and
    ``max_len`` (the capacity of full-causal rings; None when every ring is bounded by its mask)."""

    layers: list[StaticLayerState]
    position: Tensor
    batch_size: int
    max_len: int | None = None

    @classmethod
    def from_model_state(cls, model: TitansLM, state: ModelState, *, max_len: int | None = None,
                         batch_size: int | None = None, dtype: torch.dtype | None = None) -> StaticDecodeState:
        """Buffers holding ``state`` (e.g. after a prefill through ``model(ids, state)``).

        max_len: ring capacity for full causal attention (variant ``transformer``): the number of positions the
        stream will reach.  batch_size: needed only when the state holds no tensor to read it from (a fresh
        baseline state).  dtype: of the KV rings when the state has no cache yet (default: autocast's dtype when
        autocast is on, else the model's).  Host syncs are fine here: this runs once, outside the graph.
        """
        if len(state.layers) != len(model.blocks):
            raise ValueError(f"state: has {len(state.layers)} layers, the model has {len(model.blocks)}")
        device = model.embed.weight.device
        B = batch_size or _state_batch_size(state)
        if B is None:
            raise ValueError("batch_size: the state holds no tensors to read it from; pass batch_size")
        act = dtype or _activation_dtype(model, device)
        causal = any(b.mask is not None and b.mask.kind == "causal" for b in model.blocks)
        if causal and max_len is not None and max_len <= state.position:
            raise ValueError(f"max_len={max_len}: the state is already at position {state.position}")
        layers = [_static_layer(block, ls, state.position, B, device, act, max_len)
                  for block, ls in zip(model.blocks, state.layers)]
        return cls(layers, torch.tensor(state.position, dtype=torch.int64, device=device), B,
                   max_len if causal else None)

    def buffers(self) -> list[Tensor]:
        """Every tensor a step writes in place (the position included)."""
        return [t for st in self.layers for t in st.buffers()] + [self.position]

    def nbytes(self) -> int:
        prefixes = [st.prefix for st in self.layers if st.prefix is not None]
        return sum(t.numel() * t.element_size() for t in self.buffers() + prefixes)

    def to_model_state(self) -> ModelState:
        """A normal :class:`ModelState` (fresh tensors) that ``model(ids, state)`` continues exactly as the static
        step would.  Reads the position from the device: one host sync."""
        position = int(self.position)
        layers = []
        for st in self.layers:
            ls = LayerState(prefix=st.prefix)
            if st.memory is not None:
                m = st.memory
                ls.memory = MemoryState(_clones(m.weights), _clones(m.momentum), _clones(m.chunk_weights),
                                        position + st.seen_offset, None if m.conv is None else m.conv.clone(), None)
            if st.kv is not None and position > 0:
                # what forward's pruning keeps after the last token
                n = min(position, st.mask.kept_positions(position - 1))
                ls.kv = KVCache(*st.kv.newest(position, n), end=position)
                if st.memory_kv is not None:
                    ls.kv.mk, ls.kv.mv, ls.kv.mpos = st.memory_kv.newest(position, n)
            if st.segment_weights is not None:
                ls.segment_weights = _clones(st.segment_weights)
            if st.read_conv is not None:
                ls.read_conv = st.read_conv.clone()
            layers.append(ls)
        return ModelState(layers, position)


def _state_batch_size(state: ModelState) -> int | None:
    for ls in state.layers:
        if ls.memory is not None:
            return ls.memory.batch_size
        if ls.kv is not None:
            return ls.kv.k.shape[0]
    return None


def _static_layer(block: TitansBlock, ls: LayerState, position: int, B: int, device: torch.device,
                  act: torch.dtype, max_len: int | None) -> StaticLayerState:
    st = StaticLayerState(mask=block.mask, prefix=ls.prefix)
    mem = block.memory
    if mem is not None:
        if mem.gates_per_chunk:
            raise ValueError("model.memory_gates_per_chunk=True is not supported by static decoding (the per-chunk "
                             "gates are picked on the host); decode with the normal path")
        if ls.memory is None:
            raise ValueError(f"state: layer {block.layer} has a memory but its state has none")
        ms = ls.memory
        conv = ms.conv
        if conv is None and mem.conv is not None and mem.conv_kernel > 1:
            conv = torch.zeros(B, mem.conv.in_channels, mem.conv_kernel - 1, dtype=act, device=device)
        st.memory = MemoryState(tuple(_buffer(w) for w in ms.weights), tuple(_buffer(s) for s in ms.momentum),
                                tuple(_buffer(w) for w in (ms.chunk_weights or ms.weights)), 0,
                                None if conv is None else _buffer(conv), None)
        st.seen_offset = ms.seen - position
        if block.variant == "mac":
            st.segment_weights = tuple(_buffer(w) for w in (ls.segment_weights or ms.weights))
            read_conv = ls.read_conv
            if read_conv is None and mem.conv is not None and mem.conv_kernel > 1:
                # the retrieval stream convolves the query channels only (NeuralMemory.retrieve)
                read_conv = torch.zeros(B, mem.heads * mem.head_dim, mem.conv_kernel - 1, dtype=act, device=device)
            st.read_conv = None if read_conv is None else _buffer(read_conv)
    if block.attn is not None:
        attn, kv = block.attn, ls.kv
        cap = ring_capacity(block.mask, max_len)
        has = kv is not None and len(kv) > 0
        geometry = dict(batch=B, kv_heads=attn.kv_heads, head_dim=attn.head_dim, capacity=cap, device=device,
                        dtype=kv.k.dtype if has else act)
        st.kv = RingKV.from_entries(kv.k if has else None, kv.v if has else None, kv.pos if has else None, **geometry)
        if block.mask.memory_tokens:
            has_m = has and kv.mk is not None
            st.memory_kv = RingKV.from_entries(kv.mk if has_m else None, kv.mv if has_m else None,
                                               kv.mpos if has_m else None, **geometry)
    return st


# ----------------------------------------------------------------------------- the step


class StaticOps(LayerOps):
    """:class:`LayerOps` over a :class:`StaticLayerState` at the device position ``position`` (one token)."""

    def __init__(self, block: TitansBlock, st: StaticLayerState, position: Tensor) -> None:
        self.block, self.st, self.position = block, st, position
        self.prefix = st.prefix

    def attend(self, h: Tensor, prefix: Tensor | None, memory_tokens: Tensor | None) -> Tensor:
        b, st, attn = self.block, self.st, self.block.attn
        attn.check_inputs(h, b.mask, prefix, memory_tokens)
        pos = self.position.view(1)
        q, k, v, mk, mv = attn.project(h, pos, memory_tokens)
        # the token goes into its slot first: a query sees itself; the slot held a token the mask drops anyway
        st.kv.write(k, v, self.position)
        keys, values, mem_pos = [st.kv.k], [st.kv.v], None
        if memory_tokens is not None:
            st.memory_kv.write(mk, mv, self.position)
            keys.insert(0, st.memory_kv.k)
            values.insert(0, st.memory_kv.v)
            mem_pos = st.memory_kv.pos
        if prefix is not None:
            # persistent tokens (or MAL's prefix): Np keys, recomputed per step so they follow the parameters
            pk, pv = attn.prefix_kv(prefix, h.shape[0], h.dtype)
            keys.insert(0, pk)
            values.insert(0, pv)
        K, V = torch.cat(keys, 2).to(q.dtype), torch.cat(values, 2).to(q.dtype)
        # the mask rule over ring positions: empty slots (-1), tokens out of the window and, for MAC, tokens of
        # earlier segments (kpos // C != qpos // C) are dropped; a dense (1, keys) mask, as decode steps use
        backend = "reference" if attn.backend == "reference" else "sdpa"
        out = attention(q, K, V, b.mask, pos, st.kv.pos, mem_pos, backend)
        return attn.merge_heads(out)

    def remember(self, h: Tensor) -> Tensor:
        st, mem = self.st, self.block.memory
        offset = (self.position + st.seen_offset) % mem.chunk_size
        m, new = mem.step(h, st.memory, offset)
        old = st.memory
        _copy_into(old.weights, new.weights)
        _copy_into(old.momentum, new.momentum)
        _copy_into(old.chunk_weights, new.chunk_weights)
        if old.conv is not None:
            old.conv.copy_(new.conv)
        return m

    def recall(self, h: Tensor) -> Tensor:
        st = self.st
        retrieved, seg, read_conv = self.block.read_segment(h, st.memory, st.segment_weights, st.read_conv,
                                                            self.position)
        _copy_into(st.segment_weights, seg)
        if st.read_conv is not None:
            st.read_conv.copy_(read_conv)
        return retrieved


@torch.no_grad()
def static_decode_step(model: TitansLM, ids: Tensor, state: StaticDecodeState) -> Tensor:
    """One decode step: ids (B, 1) int64 -> logits (B, vocab); ``state`` consumes the token in place.

    The same blocks as ``model(ids, model_state)`` with :class:`StaticOps`: fixed shapes, no Python branch on the
    position, no host sync, so one CUDA graph serves every position.  Nothing checks the ids' range (that needs a
    sync) nor the full-causal ring's capacity (the position lives on the device): :class:`GraphedDecoder` checks
    the latter on the host.
    """
    if ids.ndim != 2 or ids.shape != (state.batch_size, 1):
        raise ValueError(f"ids: expected shape ({state.batch_size}, 1), got {tuple(ids.shape)}")
    logits = model.run_blocks(
        ids, lambda i, block, x, p: block.feed_forward(block.mix(x, StaticOps(block, state.layers[i],
                                                                              state.position), p)))
    state.position.add_(1)
    return logits[:, 0]


# ----------------------------------------------------------------------------- CUDA graphs

# how far a replayed decode step's logits may lie from the eager step's on the same state (the largest difference
# over the largest eager logit): the replay runs the same kernels on the same inputs, so they agree to rounding
CAPTURE_LOGITS_RTOL = 1e-5


def replay_agreement(eager: Tensor, replayed: Tensor, rtol: float = CAPTURE_LOGITS_RTOL) -> dict:
    """Whether a captured decode step computes the eager one: logits of the same step from the same state, eager
    and replayed, (B, vocab) each.  Returns ``{"rel_diff", "tolerance", "agrees"}``: max |replayed - eager| over
    max |eager|, the tolerance, and whether it is within it (non-finite logits on either side never agree)."""
    if eager.shape != replayed.shape:
        raise ValueError(f"replay_agreement: logits of shapes {tuple(eager.shape)} and {tuple(replayed.shape)}")
    a, b = eager.detach().double(), replayed.detach().double()
    finite = bool(torch.isfinite(a).all() and torch.isfinite(b).all())
    diff = float((b - a).abs().max() / a.abs().max().clamp_min(1e-30)) if finite else float("nan")
    return {"rel_diff": diff, "tolerance": rtol, "agrees": finite and diff <= rtol}


class GraphedDecoder:
    """Decode one token per call with :func:`static_decode_step`, replayed from one CUDA graph on CUDA.

    ::

        decoder = GraphedDecoder(model, state)    # state: a ModelState, e.g. after a prefill
        logits = decoder.step(ids)                # ids (B, 1) -> logits (B, vocab)
        state = decoder.to_model_state()          # back to the normal path

    On CUDA (``use_graphs`` None or True) the step is warmed up on a side stream (its effect on the state undone)
    and captured once; each call copies the ids into the static input and replays.  The logits returned are the
    graph's output buffer, overwritten by the next step (clone to keep them).  Elsewhere, or with
    ``use_graphs=False``, the same static step runs eagerly.  Autocast active at construction is applied to every
    step (captured with its weight cache off, which graphs need: the cache is freed when autocast exits).
    ``max_len``: ring capacity for full causal attention; steps beyond it raise.

    After the capture the graph is replayed once from the starting state and its logits compared with the first
    warm-up step's (:func:`replay_agreement`, in ``capture_check``; None without a capture or a warm-up): a
    capture that computes something else warns, and the decoder steps eagerly instead.
    """

    def __init__(self, model: TitansLM, state: ModelState | StaticDecodeState, *, max_len: int | None = None,
                 use_graphs: bool | None = None, warmup: int = 2, dtype: torch.dtype | None = None) -> None:
        self.model = model
        if isinstance(state, StaticDecodeState):
            self.state, self.position = state, int(state.position)
        else:
            self.state = StaticDecodeState.from_model_state(model, state, max_len=max_len, dtype=dtype)
            self.position = state.position  # host copy of the position: the capacity check costs no sync
        device = self.state.position.device
        if use_graphs and device.type != "cuda":
            raise ValueError(f"use_graphs=True: CUDA graphs need a CUDA model, this one is on {device}")
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self._device = device
        self._amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        self._graph = None
        self.capture_check = None
        if self.use_graphs:
            self._capture(warmup)

    def _autocast(self):
        if self._amp is None:
            return nullcontext()
        return torch.autocast(self._device.type, dtype=self._amp, cache_enabled=False)

    def _capture(self, warmup: int) -> None:
        dev = self._device
        self._ids = torch.zeros(self.state.batch_size, 1, dtype=torch.long, device=dev)
        saved = [t.clone() for t in self.state.buffers()]

        def restore() -> None:  # the state as it was before the warm-up (and before the check's replay)
            for t, s in zip(self.state.buffers(), saved):
                t.copy_(s)

        # warm-up on a side stream (lazy initialisation, workspaces) as torch.cuda.graph asks; it advances the
        # state, which is restored before the capture (capturing runs nothing)
        side = side_stream(dev, "decode-warmup")  # one per process: a stream per decoder leaks a cuBLAS workspace
        side.wait_stream(torch.cuda.current_stream(dev))
        first = None  # the first warm-up step's logits: from the starting state, as the check's replay below
        with torch.cuda.stream(side), self._autocast():
            for i in range(warmup):
                logits = static_decode_step(self.model, self._ids, self.state)
                if i == 0:
                    first = logits.clone()
        torch.cuda.current_stream(dev).wait_stream(side)
        restore()
        self._graph = torch.cuda.CUDAGraph()
        # an earlier decoder's graphs, if garbage, are destroyed before this capture and not inside it
        with gc_paused(), torch.cuda.graph(self._graph), self._autocast():
            self._logits = static_decode_step(self.model, self._ids, self.state)
        if first is not None:  # the replay advances the state: it starts from, and goes back to, the saved one
            self._graph.replay()
            self.capture_check = replay_agreement(first, self._logits)
            restore()
            if not self.capture_check["agrees"]:
                warnings.warn(f"GraphedDecoder: the captured decode step's logits differ from the eager step's "
                              f"(relative {self.capture_check['rel_diff']:.2e}, tolerance {CAPTURE_LOGITS_RTOL:.0e}); "
                              "decoding eagerly", RuntimeWarning, stacklevel=3)
                self._graph = self._logits = None

    def step(self, ids: Tensor) -> Tensor:
        """ids (B, 1) int64 -> logits (B, vocab) of the next token; the state consumes ids."""
        if self.state.max_len is not None and self.position >= self.state.max_len:
            raise ValueError(f"position {self.position}: the full-causal KV ring holds max_len={self.state.max_len} "
                             "positions; build the decoder with a larger max_len")
        if self._graph is None:
            with self._autocast():
                logits = static_decode_step(self.model, ids, self.state)
        else:
            self._ids.copy_(ids)
            self._graph.replay()
            logits = self._logits
        self.position += 1
        return logits

    def to_model_state(self) -> ModelState:
        return self.state.to_model_state()


__all__ = ["GraphedDecoder", "RingKV", "StaticDecodeState", "StaticLayerState", "StaticOps", "replay_agreement",
           "ring_capacity", "static_decode_step"]
