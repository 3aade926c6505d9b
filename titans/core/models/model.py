"""The Titans language model: MAC / MAG / MAL / LMM and the Transformer++ / SWA baselines.

One file, one block class; the sequence mixer of each block is chosen by the variant
(paper Section 4, ``../shared/docs/titans_paper_notes.md``):

* ``mac`` (Eq. 21-25): the stream is cut into segments of C = ``window`` tokens.  For each segment the
  memory as it was before the segment is read (``h = M*_{t-1}(q)``), attention runs over
  ``[persistent || h || segment]`` (full causal inside the segment; token i sees retrieved token j only
  if j <= i), the memory is updated with the attention output y, and the block emits
  ``gate(y, M*_t(y))`` where ``M*_t(y_t)`` is read right after token t's update.
* ``mag`` (Eq. 26-28): sliding-window attention with the persistent prefix, and the memory on the same
  input; ``gate(y, M(x))``.
* ``mal`` (Eq. 29-31): the memory as a layer, then sliding-window attention over its output.
* ``lmm``: the memory alone.
* ``transformer`` (full causal) and ``swa`` (sliding window): baselines built from the same blocks.

Persistent tokens (Eq. 19) are the attention prefix (MAC, MAG, baselines); for MAG, MAL and LMM the
memory also reads ``[p] || x``: a fresh state first absorbs the persistent tokens.

Everything is streamable: ``forward(ids, state)`` continues from ``state`` (every layer's
:class:`MemoryState`, KV cache bounded by the window / segment, MAC's segment snapshot), and one call
over T tokens equals feeding them in any pieces.  A block's wiring (:meth:`TitansBlock.mix`) meets its state
through :class:`LayerOps`: :class:`StreamOps` here, and ``titans.inference.static_decode`` runs the same wiring
over fixed-shape buffers for decoding in CUDA graphs.

Activation checkpointing (:meth:`TitansLM.set_activation_checkpointing`, ``training.activation_checkpointing``)
trades compute for memory in training steps: ``memory`` recomputes the neural-memory work of each memory layer
(per MAC segment) in the backward instead of keeping its saved tensors, ``full`` whole blocks.  A recomputed
region is a pure function of its inputs (the memory state among them, the new state among its outputs), so the
backward's second run sees what the first saw.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from titans.core.attention.attention_layer import CausalSelfAttention, KVCache, PrefixKV
from titans.core.attention.attention_utils import MaskSpec
from titans.core.memory.functional import select_weights
from titans.core.memory.neural_memory import MemoryRead, MemoryState, NeuralMemory
from titans.core.memory.persistent_memory import PersistentMemory
from titans.core.models.model_utils import MemoryGate, RMSNorm, SwiGLU
from titans.utils.config import (
    ACTIVATION_CHECKPOINTING,
    ModelConfig,
    TitansConfig,
    model_config_from,
    naive_cannot_recompute,
)
from titans.utils.switches import switch_on
from titans.utils.tensors import capturing_cuda_graph, gradient_like, recompute, split_in_memory_order, strides_like
from titans.utils.weight_grads import LinearUse, deferral_wanted, segment_taps, segment_views

# ----------------------------------------------------------------------------- state


@dataclass
class LayerState:
    """One block's recurrent state.

    memory: the neural memory's state (None for layers without memory).
    kv: the attention KV cache (bounded by window / segment, except the full Transformer).
    segment_weights: MAC only — memory weights at the start of the current segment (used for retrieval).
    read_conv: MAC only — causal-conv cache of the retrieval query stream.
    prefix: MAL only — the attention prefix (memory output of the persistent tokens).
    """

    memory: MemoryState | None = None
    kv: KVCache | None = None
    segment_weights: tuple[Tensor, ...] | None = None
    read_conv: Tensor | None = None
    prefix: Tensor | None = None


@dataclass
class ModelState:
    """The whole model's recurrent state; ``position`` counts the tokens consumed so far."""

    layers: list[LayerState]
    position: int = 0

    def map_tensors(self, fn) -> ModelState:
        def m(x):
            if x is None:
                return None
            if isinstance(x, tuple):
                return tuple(fn(t) for t in x)
            if isinstance(x, MemoryState):
                return x._map(fn)
            if isinstance(x, KVCache):
                return x._map(fn) if hasattr(x, "_map") else _map_dataclass(x, fn)
            return fn(x)

        return ModelState([LayerState(m(s.memory), m(s.kv), m(s.segment_weights), m(s.read_conv), m(s.prefix))
                           for s in self.layers], self.position)

    def detach(self) -> ModelState:
        return self.map_tensors(lambda t: t.detach())

    def to(self, device=None, dtype=None) -> ModelState:
        return self.map_tensors(lambda t: t.to(device=device, dtype=dtype) if t.is_floating_point()
                                else t.to(device=device))

    def clone(self) -> ModelState:
        return self.map_tensors(lambda t: t.clone())

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor mapping of everything in the state (for safetensors)."""
        out: dict[str, Tensor] = {"position": torch.tensor([self.position], dtype=torch.int64)}
        for i, s in enumerate(self.layers):
            if s.memory is not None:
                out.update({f"layers.{i}.memory.{k}": v for k, v in s.memory.tensors().items()})
            if s.kv is not None:
                out.update({f"layers.{i}.kv.{k}": v for k, v in _dataclass_tensors(s.kv).items()})
            if s.segment_weights is not None:
                out.update({f"layers.{i}.segment_weights.{j}": w for j, w in enumerate(s.segment_weights)})
            if s.read_conv is not None:
                out[f"layers.{i}.read_conv"] = s.read_conv
            if s.prefix is not None:
                out[f"layers.{i}.prefix"] = s.prefix
        return out

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], num_layers: int) -> ModelState:
        if "position" not in tensors:
            raise ValueError("model state: missing 'position'")
        layers = []
        for i in range(num_layers):
            pre = f"layers.{i}."
            sub = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            mem = {k[len("memory."):]: v for k, v in sub.items() if k.startswith("memory.")}
            kv = {k[len("kv."):]: v for k, v in sub.items() if k.startswith("kv.")}
            seg = {k: v for k, v in sub.items() if k.startswith("segment_weights.")}
            layers.append(LayerState(
                MemoryState.from_tensors(mem) if mem else None,
                _dataclass_from_tensors(KVCache, kv) if kv else None,
                tuple(seg[f"segment_weights.{j}"] for j in range(len(seg))) if seg else None,
                sub.get("read_conv"), sub.get("prefix")))
        return cls(layers, int(tensors["position"].item()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def segment_pieces(pos: int, length: int, segment: int) -> list[int]:
    """Lengths of the pieces that cut ``length`` tokens starting at absolute position ``pos`` at MAC's segment
    boundaries (multiples of ``segment``): the first piece ends at the next boundary, the last may be short.
    ``segment_pieces(700, 1000, 512) == [324, 512, 164]``."""
    if segment < 1 or pos < 0 or length < 0:
        raise ValueError(f"segment_pieces: expected segment >= 1, pos >= 0, length >= 0; got {segment}, {pos}, "
                         f"{length}")
    sizes, p, end = [], pos, pos + length
    while p < end:
        n = min(segment - p % segment, end - p)
        sizes.append(n)
        p += n
    return sizes


class SegmentInputs(NamedTuple):
    """What a MAC segment step computes from its normalised input h (B, T, dim) alone, made for a run of segments at
    once (:meth:`TitansBlock.mac_queries`), so that no segment's chain computes it, forward or backward: the
    retrieval's queries ``q`` (B, H, T, d) and output gate input ``g`` (B, T, H * d) or None
    (:meth:`NeuralMemory.retrieval_queries`), and attention's rotated queries, keys and values of h ``attn``
    ((B, H_a, T, hd), (B, H_kv, T, hd) twice: :meth:`CausalSelfAttention.project`)."""

    q: Tensor
    g: Tensor | None
    attn: tuple[Tensor, Tensor, Tensor]

    def pieces(self, lengths: list[int]) -> list[SegmentInputs]:
        """One :class:`SegmentInputs` per piece of ``lengths`` tokens, in order (:func:`_split_pieces` of each)."""
        qs = _split_pieces(self.q, lengths, 2)
        gs = _split_pieces(self.g, lengths, 1) if self.g is not None else [None] * len(lengths)
        attn = [_split_pieces(t, lengths, 2) for t in self.attn]
        return [SegmentInputs(q, g, a) for q, g, a in zip(qs, gs, zip(*attn))]


def _split_pieces(t: Tensor, lengths: list[int], dim: int) -> list[Tensor]:
    """t cut along ``dim`` into pieces of ``lengths``: one split (views; its backward one concatenation, in t's memory
    order with ``TITANS_WAVEFRONT_INPUTS_LAYOUT=1``: :func:`~titans.utils.tensors.split_in_memory_order`), or for
    one piece t itself, not a split of one piece, whose backward would copy its gradient."""
    return split_in_memory_order(t, lengths, dim) if len(lengths) > 1 else [t]


def _dataclass_tensors(obj) -> dict[str, Tensor]:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__ if isinstance(getattr(obj, f), Tensor)}


def _dataclass_from_tensors(cls, tensors: Mapping[str, Tensor]):
    kwargs = {f: tensors.get(f) for f in cls.__dataclass_fields__}
    return cls(**kwargs)


def _map_dataclass(obj, fn):
    kwargs = {f: (fn(v) if isinstance(v, Tensor) else v) for f, v in
              ((f, getattr(obj, f)) for f in obj.__dataclass_fields__)}
    return type(obj)(**kwargs)


@dataclass
class TitansOutput:
    """``logits`` (B, T, vocab); ``loss`` when labels were given; ``state`` to continue the stream."""

    logits: Tensor
    loss: Tensor | None = None
    state: ModelState | None = None
    aux: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- blocks


def _memory_from_config(cfg: ModelConfig) -> NeuralMemory:
    return NeuralMemory(
        cfg.dim, heads=cfg.memory_heads or cfg.heads, depth=cfg.memory_depth, expansion=cfg.memory_expansion,
        activation=cfg.memory_activation, residual=cfg.memory_residual, chunk_size=cfg.memory_chunk_size,
        conv_kernel=cfg.memory_conv_kernel, momentum=cfg.memory_momentum, weight_decay=cfg.memory_weight_decay,
        max_lr=cfg.memory_max_lr, gates_per_chunk=cfg.memory_gates_per_chunk, output_gate=cfg.memory_output_gate,
        backend=cfg.memory_backend, norm_eps=cfg.norm_eps, normalize_values=cfg.memory_normalize_values,
        forget_init=cfg.memory_forget_init, max_forget=cfg.memory_max_forget)


class TitansBlock(nn.Module):
    """Pre-norm residual block: sequence mixer (per variant) then SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.variant = cfg.variant
        self.layer = layer
        self.has_memory = cfg.layer_has_memory(layer)
        self.num_persistent = cfg.persistent_tokens
        self.window = cfg.window
        self.mac_writes_residual = cfg.mac_memory_input == "residual"
        self.norm_mix = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm_ffn = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)
        self.memory = _memory_from_config(cfg) if self.has_memory else None
        self.uses_attention = not (self.variant == "lmm" and self.has_memory)
        self.attn = None
        if self.uses_attention:
            self.attn = CausalSelfAttention(cfg.dim, cfg.heads, kv_heads=cfg.kv_heads, rope_theta=cfg.rope_theta,
                                            qk_norm=cfg.qk_norm, backend=cfg.attention_backend,
                                            norm_eps=cfg.norm_eps)
        self.gate = MemoryGate(cfg.dim, cfg.norm_eps) if self.has_memory and self.variant in ("mac", "mag") else None
        # MAL: the memory is its own residual sub-layer before attention
        self.norm_attn = RMSNorm(cfg.dim, cfg.norm_eps) if self.has_memory and self.variant == "mal" else None
        self.mask = self._mask_spec(cfg)
        self.activation_checkpointing = "none"  # set for the whole model by TitansLM.set_activation_checkpointing
        self.defer_weight_grads: bool | None = None  # set by TitansLM.set_weight_grad_deferral; None: in the wavefront
        self.in_wavefront = False  # True while titans.training.wavefront calls this block

    def _mask_spec(self, cfg: ModelConfig) -> MaskSpec | None:
        if not self.uses_attention:
            return None
        if self.variant == "transformer":
            return MaskSpec("causal", prefix_len=cfg.persistent_tokens)
        if self.variant == "mac":
            return MaskSpec("segment", window=cfg.window, prefix_len=cfg.persistent_tokens,
                            memory_tokens=self.has_memory)
        return MaskSpec("sliding", window=cfg.window, prefix_len=cfg.persistent_tokens)

    # -------------------------------------------------------------- state

    def init_state(self, batch: int, persistent: Tensor | None, device, dtype) -> LayerState:
        st = LayerState()
        if self.memory is None:
            return st
        st.memory = self.memory.init_state(batch, device)
        if self.variant in ("mag", "mal", "lmm") and persistent is not None:
            # the memory reads [p] || x (Eq. 26, 29): absorb the persistent tokens first
            p = persistent.unsqueeze(0).expand(batch, -1, -1).to(dtype)
            m, st.memory = self.memory(self.norm_mix(p), st.memory)
            if self.variant == "mal":
                st.prefix = self.norm_attn(p + m)
        if self.variant == "mac":
            st.segment_weights = st.memory.weights
        return st

    # -------------------------------------------------------------- forward

    def checkpointing_now(self) -> str:
        """The activation-checkpointing mode of this call: the configured one in a training step (training mode,
        autograd recording), else ``"none"`` (evaluation, inference, streaming and decoding under no_grad)."""
        if self.activation_checkpointing == "none" or not (self.training and torch.is_grad_enabled()):
            return "none"
        return self.activation_checkpointing

    def forward(self, x: Tensor, st: LayerState, pos: int, persistent: Tensor | None,
                want_cache: bool) -> Tensor:
        """x: (B, T, dim) at absolute positions pos..pos+T-1; ``st`` is updated in place (a fresh object)."""
        mode = self.checkpointing_now()
        if mode == "full":
            # the block as one recomputed region: a snapshot of the state goes in (``st`` changes below, and the
            # backward's rerun must see the state as it was), the new state comes out
            x, new = recompute(self._forward_pure, x, replace(st), pos, persistent, want_cache)
            st.memory, st.kv, st.segment_weights, st.read_conv, st.prefix = (
                new.memory, new.kv, new.segment_weights, new.read_conv, new.prefix)
            return x
        return self._forward(x, st, pos, persistent, want_cache, mode == "memory")

    def forward_mixer(self, x: Tensor, st: LayerState, pos: int, persistent: Tensor | None,
                      want_cache: bool, queries: bool = False, run_inputs=None) -> Tensor:
        """:meth:`forward` without the feed-forward (x -> x + mixer(x)); ``feed_forward`` of the result is the
        block's output.  The wavefront runs the two on different streams.  Not with ``full`` checkpointing (the
        block is one recomputed region there).  ``queries`` (MAC's memory blocks): the segments' inputs made once
        for them all before their steps (:meth:`mac_queries`, as in :meth:`forward_mixer_split`), called as
        ``run_inputs(fn, *args)`` (default ``fn(*args)``; the wavefront runs them on another stream)."""
        mode = self.checkpointing_now()
        if mode == "full":
            raise ValueError("forward_mixer: full activation checkpointing recomputes the whole block; call forward")
        return self._mixer(x, st, pos, persistent, want_cache, mode == "memory", queries, run_inputs)

    def forward_mixer_split(self, x: Tensor, st: LayerState, pos: int, persistent: Tensor | None, want_cache: bool,
                            run_readout=None, batched: bool = False, queries: bool = False,
                            run_inputs=None) -> Tensor:
        """:meth:`forward_mixer` of a MAC memory block with each segment's read-out - the memory read back after
        the segment's write (``M*_t(y_t)``: the core's read-out, the output norm, gate and projection) and MAC's
        gate - called as ``run_readout(fn, *args)`` (default: ``fn(*args)``), as is the residual sum at the end.
        The wavefront runs them on another CUDA stream: the read-out's backward needs only the gradient of the
        block's output, not the memory-state gradient that walks back along the segments, so it leaves that
        chain (:meth:`NeuralMemory.write`).  Same values and gradients as :meth:`forward_mixer` (tested in float64);
        without activation checkpointing.  ``batched``: the segments' chains first, then
        the read-outs of each run of equal-length segments at once (:meth:`mac_readouts`: each kernel of the
        read-out, the gate and the projection, and in the backward the memory's read-out stage, launched once for
        them instead of once a segment), called as ``run_readout(mac_readouts, ...)``.  ``queries``: what the
        segments' retrievals compute from the block input alone (:meth:`mac_queries`: the queries and the output
        gate's input, attention's projections) once for them all before their chains, so that neither the forward
        nor the backward of a segment's chain runs it; called as ``run_inputs(fn, *args)`` (:meth:`_over_segments`)."""
        if self.variant != "mac" or self.memory is None:
            raise ValueError(f"forward_mixer_split: a MAC block with memory, this is {self.variant!r} layer "
                             f"{self.layer} ({'with' if self.memory is not None else 'without'} memory)")
        if self.checkpointing_now() != "none":
            raise ValueError("forward_mixer_split: not with activation checkpointing (its recomputed regions hold the "
                             "memory's write and read together); call forward_mixer")
        run = run_readout or (lambda fn, *args: fn(*args))
        if not batched:
            outs = self._over_segments(x, pos, lambda piece, p, prefix, q=None: run(self.mac_readout, *self.mac_chain(
                piece, st, p, prefix, want_cache, q), x.dtype), persistent, st, queries=queries,
                run_inputs=run_inputs)
            return run(_residual_sum, x, *outs)
        chains = self._over_segments(x, pos, lambda piece, p, prefix, q=None: self.mac_chain(
            piece, st, p, prefix, want_cache, q), persistent, st, readouts_in_segments=False, queries=queries,
            run_inputs=run_inputs)
        outs, s = [], 0
        while s < len(chains):  # runs of segments whose reads stack (MemoryRead.mismatch: equal lengths, alike)
            e = s + 1
            while e < len(chains) and chains[s][1].mismatch(chains[e][1]) is None:
                e += 1
            if e - s == 1:
                outs.append(run(self.mac_readout, *chains[s], x.dtype))
            else:
                ys, reads = zip(*chains[s:e])
                # back along the sequence here, not in the region: a view at batch 1, whose gradient then comes with
                # the strides the region traced; inside run, on the read-outs' stream: at batch > 1 it is a copy,
                # which on the block's stream read the read-outs unordered (benchmarks/stream_hazards.py)
                def mac_readouts_along(ys_, reads_, dtype, n=e - s):
                    return rearrange(self.mac_readouts(ys_, reads_, dtype), "(n b) t d -> b (n t) d", n=n)

                outs.append(run(mac_readouts_along, list(ys), list(reads), x.dtype))
            s = e
        return run(_residual_sum, x, *outs)

    def mac_chain(self, h: Tensor, st: LayerState, pos: int, persistent: Tensor | PrefixKV | None, want_cache: bool,
                  queries: SegmentInputs | None = None):
        """MAC over one segment of normalised inputs h (B, T, dim) up to the memory's write (Eq. 21-24):
        ``(y, read)``, the attention output and the :class:`MemoryRead` of ``M*_t(y_t)``; ``st`` updated in place.
        ``mac_readout(y, read)`` completes it: the two equal :meth:`mac_segment`.  ``queries``: h's
        :class:`SegmentInputs` from :meth:`mac_queries` (then ``st.read_conv`` is left as it is)."""
        ops = StreamOps(self, st, pos, want_cache, queries=queries)
        retrieved = ops.recall(h)  # h_t = M*_{t-1}(q_t)
        y = ops.attend(h, persistent, retrieved)  # y_t = Attn([p || h || S])
        read, st.memory = self.memory.write(h + y if self.mac_writes_residual else y, st.memory)  # M_t = M_{t-1}(y_t)
        return y, read

    def mac_queries(self, h: Tensor, read_conv: Tensor | None, pos: int) -> tuple[SegmentInputs, Tensor | None]:
        """What MAC's segment steps compute from the block input alone, for a run of segments at once: h (B, L, dim)
        at host position ``pos`` -> ``(SegmentInputs, the read convolution's new cache)``: the retrieval's queries
        and gate input (:meth:`NeuralMemory.retrieval_queries`; the convolution runs over the run's tokens from
        ``read_conv``, as segment by segment) and attention's queries, keys and values of h (rotated at their
        positions, as each segment's attention rotates them; only the retrieved tokens' keys and values are left to
        the segments).  A region :func:`~titans.utils.compiling.compile_blocks` compiles."""
        q, g, read_conv = self.memory.retrieval_queries(h, read_conv)
        aq, ak, av, _, _ = self.attn.project(h, pos)
        return SegmentInputs(q, g, (aq, ak, av)), read_conv

    def mac_readout(self, y: Tensor, read, residual_dtype: torch.dtype | None = None) -> Tensor:
        """o_t = y_t (x) M*_t(y_t) (Eq. 25) of :meth:`mac_chain`'s segment, in the dtype it has added to a residual
        stream of ``residual_dtype`` (see :func:`_to_residual`)."""
        return _to_residual(self.gate(y, read.read()), residual_dtype)

    def mac_readouts(self, ys: list[Tensor], reads: list, residual_dtype: torch.dtype | None = None) -> Tensor:
        """:meth:`mac_readout` of n consecutive segments of equal length at once: ys (B, T, dim) and their
        :class:`MemoryRead` s -> (n B, T, dim), the segments' outputs stacked on the batch, as their inputs are
        (:meth:`MemoryRead.stack`; a chunk's read-out reads only its own inputs and start state), so every kernel of
        the read-out, the gate and the projection runs once for the n; in the backward the memory's read-out stage
        too, on the chain's stream before the segments' walks (MAC 65536 x 1: ~0.15 ms a segment on an H200,
        session 33).  The region :func:`~titans.utils.compiling.compile_blocks` compiles (with the class's
        :meth:`mac_readout`, not the compiled one: one graph)."""
        return type(self).mac_readout(self, torch.cat(ys), MemoryRead.stack(reads), residual_dtype)

    def _forward_pure(self, x: Tensor, st: LayerState, pos: int, persistent: Tensor | None,
                      want_cache: bool) -> tuple[Tensor, LayerState]:
        """:meth:`forward` without touching ``st``: returns (output, the new state)."""
        st = replace(st)
        return self._forward(x, st, pos, persistent, want_cache, False), st

    def _forward(self, x: Tensor, st: LayerState, pos: int, persistent: Tensor | None, want_cache: bool,
                 recompute_memory: bool) -> Tensor:
        return self.feed_forward(self._mixer(x, st, pos, persistent, want_cache, recompute_memory))

    def _mixer(self, x: Tensor, st: LayerState, pos: int, persistent: Tensor | None, want_cache: bool,
               recompute_memory: bool, queries: bool = False, run_inputs=None) -> Tensor:
        if self.variant == "mac" and self.memory is not None:
            outs = self._over_segments(x, pos, lambda piece, p, prefix, q=None: self.mac_segment(
                piece, st, p, prefix, want_cache, recompute_memory, x.dtype, q), persistent, st, queries=queries,
                run_inputs=run_inputs)
            return _residual_sum(x, *outs)
        return self.mix(x, StreamOps(self, st, pos, want_cache, recompute_memory), persistent)

    def _over_segments(self, x: Tensor, pos: int, step, persistent: Tensor | None, st: LayerState,
                       readouts_in_segments: bool = True, queries: bool = False, run_inputs=None) -> list:
        """MAC's memory blocks: ``step(piece, position, prefix)`` for each segment piece of ``norm_mix(x)`` (x
        (B, T, dim) at host position ``pos``) in order, so each piece's retrieval reads the memory as it was before
        its segment; returns the steps' outputs.  ``prefix``: the persistent tokens' keys and values
        (:class:`PrefixKV`), projected once for all the pieces (every segment attends over the same ones).  ``st``:
        the block's state, which the steps update; its convolution caches are handed from step to step through
        :func:`~titans.utils.tensors.gradient_like` (their gradients, slices of the next step's, reach a compiled
        step's backward with the strides it traced: no copy a segment at batch 1).  ``readouts_in_segments``: whether
        a step reads the memory back too (deferred weight gradients declare its projections' uses per segment).
        ``queries``: the steps' inputs (:meth:`mac_queries`) made once for all the pieces, before them, with the
        parameters themselves; each step then gets its piece's as ``step(piece, position, prefix, SegmentInputs)``.
        ``run_inputs(fn, *args)`` runs the input norm and those (:meth:`_call_inputs`; the wavefront, on another
        stream: their forward and backward then leave the chain's stream, which only waits for them to start)."""
        lengths = segment_pieces(pos, x.shape[1], self.window)
        # one split, not a slice per piece: a slice's backward writes its piece into a zero gradient of h's full
        # size, and autograd then sums those, O(T^2 / C) memory traffic (MAC 65536 x 1 on an H200: ~40 ms of a
        # ~540 ms step in fills and adds; benchmarks/RESULTS.md section 6, session 20); split's backward is
        # one concatenation
        pieces_queries = None
        if queries:
            h, pieces, pieces_queries, st.read_conv = (run_inputs or (lambda fn, *args: fn(*args)))(
                self._call_inputs, x, st.read_conv, pos, lengths)
        else:
            h = self.norm_mix(x)
            pieces = h.split(lengths, dim=1)
        prefix = self._segment_prefix(persistent, h)
        outs, p = [], pos
        deferred = self._deferred_weight_grads(h, lengths, readouts_in_segments, own_inputs=not queries)
        prefixes = [prefix] * len(lengths)
        if deferred is not None and prefix is not None and len(lengths) > 1:
            # each segment its own view of the prefix, so that its gradients are summed once, on the weight-gradient
            # stream, not added up segment by segment on the chain's (a bf16 add each, every segment but the first)
            with torch.cuda.stream(self.weight_grad_stream) if self.weight_grad_stream is not None else nullcontext():
                prefixes = [PrefixKV(*views) for views in segment_views((prefix.k, prefix.v), len(lengths))]
        with deferred if deferred is not None else nullcontext() as run_piece:
            for s, piece in enumerate(pieces):
                with run_piece(s) if run_piece is not None else nullcontext():
                    # contiguous once here: each projection of a strided piece would copy it (four a segment)
                    if pieces_queries is None:
                        outs.append(step(piece.contiguous(), p, prefixes[s]))
                    else:
                        outs.append(step(piece.contiguous(), p, prefixes[s], pieces_queries[s]))
                if pieces_queries is None:  # (made once for the pieces otherwise)
                    st.read_conv = gradient_like(st.read_conv)
                if st.memory is not None and st.memory.conv is not None:
                    st.memory = replace(st.memory, conv=gradient_like(st.memory.conv))
                p += piece.shape[1]
        return outs

    def _call_inputs(self, x: Tensor, read_conv: Tensor | None, pos: int, lengths: list[int]):
        """The normalised input h = norm_mix(x) of a call's segments (lengths tokens each) and what their steps
        compute from it alone (:meth:`mac_queries`): ``(h, h's pieces, the pieces' SegmentInputs, the read
        convolution's new cache)``; split here, so that the splits' backward (a concatenation each) runs where
        this does."""
        h = self.norm_mix(x)
        inputs, read_conv = self.mac_queries(h, read_conv, pos)
        return h, _split_pieces(h, lengths, 1), inputs.pieces(lengths), read_conv

    def _segment_prefix(self, persistent: Tensor | None, h: Tensor) -> PrefixKV | None:
        """The persistent tokens' keys and values for every segment of h (B, T, dim), projected once (per segment
        this was a matmul, casts and a gradient add into the persistent tokens on each segment's chain)."""
        return None if persistent is None else PrefixKV(*self.attn.prefix_kv(persistent, h.shape[0], h.dtype))

    weight_grad_stream = None  # where deferred weight gradients are summed (the wavefront sets a CUDA stream)
    weight_casts = None  # the deferred projections' weights cast once a step (the wavefront sets a dict per step)

    def defers_weight_grads(self, in_wavefront: bool) -> bool:
        """Whether this block's training segments defer their projections' weight gradients
        (:mod:`titans.utils.weight_grads`; MAC memory blocks only): as configured (:attr:`defer_weight_grads`;
        ``None``: inside the wavefront, where the segment chain is the step's critical path), unless
        ``TITANS_DEFER_WEIGHT_GRADS`` says otherwise."""
        if self.variant != "mac" or self.memory is None:
            return False
        configured = in_wavefront if self.defer_weight_grads is None else self.defer_weight_grads
        return deferral_wanted(configured)

    def _deferred_weight_grads(self, h: Tensor, lengths: list[int], readouts: bool = True, own_inputs: bool = True):
        """Deferred weight gradients (:meth:`defers_weight_grads`): the segment steps' projections hand their weight
        gradients to one sum per projection (and piece length) over the segments of this call, when autograd
        records and no checkpointing region would run them twice.
        Returns None, or a context that yields ``run_piece(s)``, the context segment s runs in."""
        on = (self.defers_weight_grads(self.in_wavefront) and torch.is_grad_enabled()
              and self.checkpointing_now() == "none" and not torch.compiler.is_compiling())
        if not on:
            return None
        return segment_taps(lambda n: self.weight_grad_uses(h.shape[0], n, readouts, own_inputs), lengths,
                            self.weight_grad_stream, self.segment_params(), self.weight_casts, batch=h.shape[0])

    def segment_params(self) -> list[tuple[nn.Module, str]]:
        """The elementwise parameters one MAC segment step reads through
        :func:`~titans.utils.weight_grads.segment_param` ((module, dotted name) pairs): the memory's convolution
        and output norm, the gate's two norms.  Deferred, each segment reads its own stand-in (with
        ``TITANS_DEFER_PER_TOKEN=1`` broadcast over its tokens) and their gradients reach ``.grad`` in one sum per
        block call instead of an add per segment on the chain (session 26's count: 8 such adds a segment)."""
        mem = self.memory
        params = [(mem, "out_norm_weight"), (self.gate, "norm_y.weight"), (self.gate, "norm_m.weight")]
        if mem.conv is not None:
            params += [(mem, "conv.weight"), (mem, "conv.bias")]
        return params

    def weight_grad_uses(self, batch: int, length: int, readout: bool = True, own_inputs: bool = True):
        """The projections one MAC segment step calls (:meth:`_mac`; :meth:`mac_chain` then :meth:`mac_readout`),
        each with its uses in call order (:class:`~titans.utils.weight_grads.LinearUse`): the retrieval (the
        query rows of W_QKV, the output gate, the output projection), attention (queries; keys / values of the
        segment and the retrieved tokens stacked on the batch - the persistent tokens' are projected before the
        segments, :meth:`_over_segments`; the output), the write (W_QKV whole, the gates) and the read-back (output
        gate, output projection; without ``readout`` not, :meth:`mac_readouts` reading back a run of segments
        at once with the parameters themselves).  Without ``own_inputs`` the step does not project its input h
        (:meth:`mac_queries` made those projections for the segments at once): not the retrieval's query rows of
        W_QKV and output gate, nor attention's queries, and attention's keys / values only of the retrieved
        tokens.  Checked at every use."""
        mem, attn = self.memory, self.attn
        x = (batch, length, mem.dim)
        inner = (batch, length, mem.heads * mem.head_dim)
        reads = 2 if readout else 1  # the output projection: the retrieval's, and the read-back's
        gates = int(own_inputs) + int(readout)
        plan = [(mem.to_qkv, ([LinearUse(x, slice(0, inner[-1]))] if own_inputs else []) + [LinearUse(x)]),
                (mem.to_gates, [LinearUse(x)]),
                (mem.to_out, [LinearUse(inner)] * reads)]
        if mem.gate is not None and gates:
            plan.append((mem.gate, [LinearUse(x)] * gates))
        if own_inputs:
            plan.append((attn.q_proj, [LinearUse(x)]))
        kv_rows = 2 * batch if own_inputs else batch  # the segment's and the retrieved tokens' / the retrieved only
        return plan + [(attn.kv_proj, [LinearUse((kv_rows, length, attn.dim))]),
                       (attn.o_proj, [LinearUse((batch, length, attn.heads * attn.head_dim))])]

    def mix(self, x: Tensor, ops: LayerOps, persistent: Tensor | None) -> Tensor:
        """The sequence mixer with its residual: x (B, T, dim) -> (B, T, dim).  ``ops`` carries the state and
        the position (:class:`StreamOps` for ``forward``; the static decode step brings its own), so both run
        this one wiring of the variants.  For MAC the piece lies inside one segment."""
        if self.variant == "mac" and self.memory is not None:
            return x + self._mac(self.norm_mix(x), ops, persistent)
        if self.variant == "mal" and self.memory is not None:
            x = x + ops.remember(self.norm_mix(x))
            return x + ops.attend(self.norm_attn(x), ops.prefix, None)
        if self.variant == "lmm" and self.memory is not None:
            return x + ops.remember(self.norm_mix(x))
        if self.variant == "mag" and self.memory is not None:
            h = self.norm_mix(x)
            y = ops.attend(h, persistent, None)
            return x + ops.remember_gated(h, y)
        # attention-only block (baselines, and layers without memory)
        return x + ops.attend(self.norm_mix(x), persistent, None)

    def mac_segment(self, h: Tensor, st: LayerState, pos: int, persistent: Tensor | PrefixKV | None, want_cache: bool,
                    recompute_memory: bool, residual_dtype: torch.dtype | None = None,
                    queries: SegmentInputs | None = None) -> Tensor:
        """MAC over one segment (or a piece of one) of normalised inputs h (B, T, dim) at host position ``pos``,
        ``st`` updated in place.  The region :func:`~titans.utils.compiling.compile_blocks` compiles in MAC's
        memory blocks: one segment's graph, reused for every segment (the block's whole forward unrolls its
        segment loop, a graph and a compile time growing with the sequence: 128 segments at 65536 tokens).
        ``persistent``: the persistent tokens, or their keys and values (:class:`PrefixKV`, from
        :meth:`_over_segments`).  ``residual_dtype``: the output comes in the dtype it has added to a residual stream
        of that dtype (:func:`_to_residual`).  ``queries``: h's :class:`SegmentInputs` from :meth:`mac_queries`."""
        ops = StreamOps(self, st, pos, want_cache, recompute_memory, queries)
        return _to_residual(self._mac(h, ops, persistent), residual_dtype)

    @property
    def compile_regions(self) -> tuple[str, ...]:
        """What regional compilation compiles in this block: MAC's memory blocks, the segment step, the mixer's norm
        and the feed-forward (see :meth:`mac_segment`); other blocks, the whole block (empty tuple).
        ``TITANS_COMPILE_MAC_SEGMENTS=0`` compiles MAC's memory blocks whole again (A/B timing on a GPU)."""
        if self.variant != "mac" or self.memory is None or not switch_on("TITANS_COMPILE_MAC_SEGMENTS"):
            return ()
        # mac_chain / mac_readout(s): the wavefront's split segment (forward_mixer_split); compiled when first called
        return ("mac_segment", "mac_chain", "mac_readout", "mac_readouts", "mac_queries", "norm_mix", "feed_forward")

    def _mac(self, h: Tensor, ops: LayerOps, persistent: Tensor | None) -> Tensor:
        """Memory as context (Eq. 21-25) over normalised inputs h (B, T, dim) inside one segment."""
        retrieved = ops.recall(h)  # h_t = M*_{t-1}(q_t), the memory as it was before this segment
        y = ops.attend(h, persistent, retrieved)  # y_t = Attn([p || h || S])
        # M_t = M_{t-1}(y_t); m_t = M*_t(y_t).  The residual option writes h_t + y_t: y alone is a mixture over
        # the segment, so the same context gives different keys in different surroundings (RESULTS.md 4q)
        return ops.remember_gated(h + y if self.mac_writes_residual else y, y)  # o_t = y_t (x) m_t

    def feed_forward(self, x: Tensor) -> Tensor:
        return x + self.ffn(self.norm_ffn(x))

    def gated_memory(self, h: Tensor, y: Tensor, memory: MemoryState) -> tuple[Tensor, MemoryState]:
        """MAC's and MAG's memory branch: write h into the memory, read it back (m) and gate the branch output y
        with it.  Returns ``(gate(y, m), the new memory state)``; ``memory`` is not modified."""
        m, memory = self.memory(h, memory)
        return self.gate(y, m), memory

    def read_segment(self, h: Tensor, memory: MemoryState, segment_weights: tuple[Tensor, ...],
                     read_conv: Tensor | None, pos: int | Tensor, recompute_read: bool = False,
                     queries: tuple[Tensor, Tensor | None] | None = None):
        """MAC's retrieval (Eq. 21): read h (B, T, dim) with the memory weights from before the current segment,
        taking that snapshot of ``memory.weights`` when ``pos`` (the piece's first position: a host int while
        streaming, a 0-dim device tensor in static decoding) opens a segment.  Returns ``(retrieved (B, T, dim),
        segment_weights, read_conv)``, the latter two to keep in the state.  ``recompute_read``: the read is a
        recomputed region (activation checkpointing).  ``queries``: h's retrieval inputs already made
        (:meth:`mac_queries`; ``read_conv`` comes back as given)."""
        seg = select_weights(pos % self.window == 0, memory.weights, segment_weights)
        read_state = MemoryState(seg, memory.momentum, seg, memory.seen)
        read = self.memory.retrieve
        retrieved, read_conv = (recompute(read, h, read_state, read_conv, queries) if recompute_read
                                else read(h, read_state, read_conv, queries))
        return retrieved, seg, read_conv


def _to_residual(out: Tensor, residual_dtype: torch.dtype | None) -> Tensor:
    """``out`` in the dtype of ``residual + out`` for a residual of ``residual_dtype`` (None: as it is).  In a compiled
    region's graph: under autocast a segment's output is bf16 and the residual stream float32, and the eager sum's
    backward casts the gradient to bf16 (a kernel a segment on the chain's stream), which the graph fuses."""
    return out if residual_dtype is None else out.to(torch.promote_types(out.dtype, residual_dtype))


class _SegmentConcat(torch.autograd.Function):
    """``torch.cat(pieces, dim=1)`` whose backward hands each piece its slice of the gradient with the piece's own
    strides where they differ only at size-1 dimensions (batch 1, :func:`~titans.utils.tensors.strides_like`): each
    piece is a compiled region's output, and AOTAutograd copies an incoming gradient whose strides differ from those
    it traced (a (B, T_seg, dim) copy a segment on the chain's stream, MAC 65536 x 1)."""

    @staticmethod
    def forward(ctx, *pieces: Tensor) -> Tensor:
        ctx.lengths = [p.shape[1] for p in pieces]
        ctx.strides = [p.stride() for p in pieces]
        return torch.cat(pieces, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return tuple(strides_like(g, s) for g, s in zip(grad.split(ctx.lengths, dim=1), ctx.strides))


def _residual_sum(x: Tensor, *pieces: Tensor) -> Tensor:
    """x + the pieces (B, T_i, dim) concatenated along the sequence: a MAC block's mixer output from its segments'.
    One piece (the wavefront's calls, a segment each) is added as it is: a concatenation of one tensor is a copy, a
    kernel on the segment chain's stream (its gradient handed on with the piece's strides, :func:`gradient_like`)."""
    return x + (gradient_like(pieces[0]) if len(pieces) == 1 else _SegmentConcat.apply(*pieces))


class LayerOps:
    """What a block's sequence mixer does with its state, at the position the ops object was made for.

    ``attend(h, prefix, memory_tokens) -> y``: attention over the cached context and h (with MAC's retrieved
    tokens); ``remember(h) -> m``: write h into the neural memory and read it back; ``remember_gated(h, y)``:
    ``gate(y, remember(h))``, MAC's and MAG's memory branch; ``recall(h) -> retrieved``:
    MAC's read with the weights from before the current segment (taking that snapshot at a segment start);
    ``prefix``: MAL's attention prefix.  Each call updates the state.
    """

    block: TitansBlock
    prefix: Tensor | None

    def attend(self, h: Tensor, prefix: Tensor | None, memory_tokens: Tensor | None) -> Tensor:
        raise NotImplementedError

    def remember(self, h: Tensor) -> Tensor:
        raise NotImplementedError

    def remember_gated(self, h: Tensor, y: Tensor) -> Tensor:
        return self.block.gate(y, self.remember(h))

    def recall(self, h: Tensor) -> Tensor:
        raise NotImplementedError


class StreamOps(LayerOps):
    """:class:`LayerOps` over a :class:`LayerState` at the host position ``pos`` (a piece of any length).

    ``recompute_memory``: the memory's work (``remember``, ``remember_gated`` with its gate, ``recall``) runs as
    recomputed regions (activation checkpointing ``memory``); the state goes in and comes out of each region.
    ``queries``: the piece's :class:`SegmentInputs`, made before it (``recall`` and ``attend`` then project only
    what depends on the memory)."""

    def __init__(self, block: TitansBlock, st: LayerState, pos: int, want_cache: bool,
                 recompute_memory: bool = False, queries: SegmentInputs | None = None) -> None:
        self.block, self.st, self.pos, self.want_cache = block, st, pos, want_cache
        self.recompute_memory = recompute_memory
        self.prefix = st.prefix
        self.queries = queries  # h's projections, made before the segment (TitansBlock.mac_queries), or None

    def attend(self, h: Tensor, prefix: Tensor | None, memory_tokens: Tensor | None) -> Tensor:
        st, b = self.st, self.block
        y, cache = b.attn(h, mask=b.mask, start_pos=self.pos, prefix=prefix, memory=memory_tokens, cache=st.kv,
                          return_cache=self.want_cache,
                          projected=self.queries.attn if self.queries is not None else None)
        st.kv = cache if self.want_cache else None
        return y

    def remember(self, h: Tensor) -> Tensor:
        memory = self.block.memory
        if self.recompute_memory:
            m, self.st.memory = recompute(memory, h, self.st.memory)
        else:
            m, self.st.memory = memory(h, self.st.memory)
        return m

    def remember_gated(self, h: Tensor, y: Tensor) -> Tensor:
        if not self.recompute_memory:
            return super().remember_gated(h, y)
        # the gate inside the region: its norms keep float32 copies of y and m (MAC: ~0.1 GB a 4096-token row)
        out, self.st.memory = recompute(self.block.gated_memory, h, y, self.st.memory)
        return out

    def recall(self, h: Tensor) -> Tensor:
        st = self.st
        made = (self.queries.q, self.queries.g) if self.queries is not None else None
        retrieved, st.segment_weights, st.read_conv = self.block.read_segment(h, st.memory, st.segment_weights,
                                                                              st.read_conv, self.pos,
                                                                              self.recompute_memory, made)
        return retrieved


# ----------------------------------------------------------------------------- the model


class TitansLM(nn.Module):
    """Decoder-only language model; see the module docstring for the variants."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.persistent = PersistentMemory(config.persistent_tokens, config.dim, config.init_std)
        self.blocks = nn.ModuleList(TitansBlock(config, i) for i in range(config.depth))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        std = self.config.init_std
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and "to_gates" not in name:
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=std)
        for name, p in self.named_parameters():
            # residual-branch outputs start small (GPT-2 style scaling by depth)
            if name.endswith(("w2.weight", "to_out.weight", "o_proj.weight", "out_proj.weight")):
                nn.init.normal_(p, std=std / (2 * self.config.depth) ** 0.5)

    # -------------------------------------------------------------- state

    def set_activation_checkpointing(self, mode: str) -> TitansLM:
        """What training steps recompute in the backward instead of keeping (``training.activation_checkpointing``):
        ``"none"``, ``"memory"`` (each memory layer's neural-memory work: per MAC segment the retrieval, and the
        update with its read-back and the gate of MAC / MAG) or ``"full"`` (whole blocks, any variant).  Only in
        training mode with autograd recording; outputs and gradients are the same.  Returns the model."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing={mode!r}: expected one of "
                             f"{', '.join(ACTIVATION_CHECKPOINTING)}")
        if mode != "none" and any(b.memory is not None and b.memory.backend == "naive" for b in self.blocks):
            raise ValueError(naive_cannot_recompute(mode))
        for block in self.blocks:
            block.activation_checkpointing = mode
        return self

    @property
    def activation_checkpointing(self) -> str:
        return self.blocks[0].activation_checkpointing

    def set_weight_grad_deferral(self, defer: bool | None) -> TitansLM:
        """Whether MAC's memory blocks sum their projections' weight gradients over a call's segments instead of per
        segment (``training.defer_weight_grads``, :mod:`titans.utils.weight_grads`): ``True`` / ``False`` always /
        never, ``None`` (the default) inside the wavefront only.  The gradients are the same up to summation
        order; ``TITANS_DEFER_WEIGHT_GRADS=1`` / ``0`` overrides.  Returns the model."""
        if defer not in (None, True, False):
            raise ValueError(f"defer_weight_grads={defer!r}: expected true, false or null (in the wavefront only)")
        for block in self.blocks:
            block.defer_weight_grads = defer
        return self

    def defers_weight_grads(self, in_wavefront: bool = False) -> bool:
        """Whether any block defers its weight gradients in a training step (in the wavefront or not)."""
        return any(b.defers_weight_grads(in_wavefront) for b in self.blocks)

    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        p = self.persistent()
        return ModelState([b.init_state(batch_size, p, device, dtype) for b in self.blocks], 0)

    def forward(self, input_ids: Tensor, state: ModelState | None = None, labels: Tensor | None = None,
                use_cache: bool = True) -> TitansOutput:
        """input_ids: (B, T) int64.  Labels follow the Hugging Face convention (pass ``labels=input_ids``;
        shifted inside; -100 ignored).  Returns logits (B, T, vocab), loss, and the new state
        (None when ``use_cache=False``, which skips building KV caches during training)."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected shape (B, T), got {got}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
        B, T = input_ids.shape
        # the check syncs the device, so it is skipped while compiling or capturing; is_compiling() comes first so
        # a compiled model never guards on the capture state (a guard that flips between warm-up and capture
        # would recompile inside the capture)
        check_ids = T and not torch.compiler.is_compiling() and not capturing_cuda_graph()
        if check_ids:
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync for both bounds
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids: token ids must be in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        if state is None:
            state = self.init_state(B, input_ids.device)
            if not use_cache:
                state = ModelState(state.layers, 0)
        elif len(state.layers) != len(self.blocks):
            raise ValueError(f"state: has {len(state.layers)} layers, the model has {len(self.blocks)}")
        elif state.layers and state.layers[0].memory is not None and state.layers[0].memory.batch_size != B:
            raise ValueError(f"state: batch size {state.layers[0].memory.batch_size} != input batch {B}")
        pos = state.position
        new_layers = [LayerState(s.memory, s.kv, s.segment_weights, s.read_conv, s.prefix) for s in state.layers]
        logits = self.run_blocks(input_ids, lambda i, block, x, p: block(x, new_layers[i], pos, p, use_cache))
        loss = None
        if labels is not None:
            loss = lm_loss(logits, labels)
        new_state = ModelState(new_layers, pos + T) if use_cache else None
        return TitansOutput(logits=logits, loss=loss, state=new_state)

    def run_blocks(self, input_ids: Tensor, apply) -> Tensor:
        """Embedding -> ``apply(i, block, x, persistent)`` for every block -> final norm -> LM head.
        input_ids (B, T) -> logits (B, T, vocab); :meth:`forward` and the static decode step differ only in
        ``apply`` (how a block meets its state)."""
        p = self.persistent()
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            x = apply(i, block, x, p)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 64, **kwargs):
        """Sample continuations; see :func:`titans.core.models.generation.generate`."""
        from titans.core.models.generation import generate

        return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; label -100 is ignored."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if logits.dtype == torch.float64:
        shift_logits = shift_logits.double()
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def build_model(config: ModelConfig | TitansConfig | Mapping) -> TitansLM:
    """Build a :class:`TitansLM` from a ModelConfig, a full TitansConfig, or a dict of either."""
    return TitansLM(model_config_from(config))


def parameter_count(config: ModelConfig | TitansConfig | Mapping) -> int:
    """Parameters of the model ``config`` describes, built on the meta device (shapes only, no storage)."""
    with torch.device("meta"):
        return build_model(config).num_parameters()


def ffn_mult_for_parameters(config: ModelConfig | TitansConfig | Mapping, target: int) -> float:
    """The ``ffn_mult`` that brings the model closest to ``target`` parameters, everything else as given:
    how a baseline without memory (SWA, Transformer) is widened to a Titans variant's size for a
    same-parameters comparison.  The feed-forward width moves in steps of 8 channels, so the match is
    within 24 * dim * depth parameters (or the search range [1/16, 64] is the limit)."""
    cfg = model_config_from(config)

    def count(mult: float) -> int:
        return parameter_count(cfg.model_copy(update={"ffn_mult": mult}))

    lo, hi = 1 / 16, 64.0
    for _ in range(40):  # the count grows with ffn_mult: bisect on it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda m: abs(count(m) - target))
    # bisection ends next to a step of the width; return the middle of the best width's plateau, so a value
    # printed with a few decimals (a config override) still selects that width
    width = cfg.model_copy(update={"ffn_mult": best}).ffn_hidden
    mid = (width - 3.5) * 1.5 / cfg.dim
    return mid if cfg.model_copy(update={"ffn_mult": mid}).ffn_hidden == width else best
