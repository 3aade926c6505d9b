"""Attention with masks as data (issue 3): every backend equals a definition-level loop on every mask,
FlexAttention's mask_mod equals the dense mask, the KV cache stays bounded and streaming is exact."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from titans.core.attention import CausalSelfAttention, MaskSpec
from titans.core.attention.attention_layer import attention
from titans.core.attention.attention_utils import (
    build_dense_mask,
    causal_mask,
    flex_mask_mod,
    segment_mask,
    sliding_window_mask,
)

SPECS = [
    MaskSpec("causal"),
    MaskSpec("causal", prefix_len=3),
    MaskSpec("sliding", window=5),
    MaskSpec("sliding", window=5, prefix_len=2),
    MaskSpec("segment", window=6),
    MaskSpec("segment", window=6, prefix_len=2),
    MaskSpec("segment", window=6, prefix_len=2, memory_tokens=True),
    MaskSpec("sliding", window=4, memory_tokens=True),
]


def may_see(spec: MaskSpec, i: int, j: int) -> bool:
    """The rule written out for context (or memory) position j seen from query position i."""
    if j > i:
        return False
    if spec.kind == "sliding":
        return i - j < spec.window
    if spec.kind == "segment":
        return i // spec.window == j // spec.window
    return True


def loop_attention(q, k, v, spec, q_pos, k_pos, mem_pos):
    """Per query, softmax over exactly the keys the rule allows; keys laid out [prefix | memory | context]."""
    B, H, Tq, hd = q.shape
    P = spec.prefix_len
    out = torch.zeros_like(q)
    for i in range(Tq):
        qi = int(q_pos[i])
        cols = list(range(P))
        off = P
        if mem_pos is not None:
            cols += [off + j for j, p in enumerate(mem_pos.tolist()) if may_see(spec, qi, p)]
            off += len(mem_pos)
        cols += [off + j for j, p in enumerate(k_pos.tolist()) if may_see(spec, qi, p)]
        kk, vv = k[:, :, cols], v[:, :, cols]
        w = torch.softmax((q[:, :, i:i + 1] @ kk.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        out[:, :, i] = (w @ vv)[:, :, 0]
    return out


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("start", [0, 7])
def test_backends_equal_the_definition_on_every_mask(spec, backend, start):
    torch.manual_seed(0)
    B, H, Hkv, T, hd = 2, 4, 2, 13, 8
    q_pos = torch.arange(start, start + T)
    k_pos = torch.arange(max(0, start - 4), start + T)  # some cached context before the queries
    mem_pos = k_pos.clone() if spec.memory_tokens else None
    Tk = spec.prefix_len + (0 if mem_pos is None else len(mem_pos)) + len(k_pos)
    q = torch.randn(B, H, T, hd, dtype=torch.float64)
    k = torch.randn(B, Hkv, Tk, hd, dtype=torch.float64)
    v = torch.randn(B, Hkv, Tk, hd, dtype=torch.float64)
    got = attention(q, k, v, spec, q_pos, k_pos, mem_pos, backend=backend)
    k_full, v_full = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    want = loop_attention(q, k_full, v_full, spec, q_pos, k_pos, mem_pos)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_named_masks_match_the_rule():
    T = 11
    for name, m, spec in [("causal", causal_mask(T), MaskSpec("causal")),
                          ("sliding", sliding_window_mask(T, 3), MaskSpec("sliding", window=3)),
                          ("segment", segment_mask(T, 4), MaskSpec("segment", window=4))]:
        want = torch.tensor([[may_see(spec, i, j) for j in range(T)] for i in range(T)])
        assert torch.equal(m, want), name
    assert sliding_window_mask(T, 3).sum(1).max() == 3
    assert not segment_mask(T, 4)[4, 3]  # segment boundary


@pytest.mark.parametrize("spec", [s for s in SPECS if s.kind != "segment" and not s.memory_tokens], ids=str)
def test_flex_mask_mod_equals_the_dense_mask(spec):
    T = 19
    P = spec.prefix_len
    qi = torch.arange(T)[:, None]
    ki = torch.arange(P + T)[None, :]
    got = flex_mask_mod(spec)(None, None, qi, ki)
    want = build_dense_mask(spec, torch.arange(T), torch.arange(T))
    assert torch.equal(got.expand_as(want), want)


def test_flex_mask_mod_refuses_segment_and_memory_masks():
    with pytest.raises(ValueError, match="only causal / sliding"):
        flex_mask_mod(MaskSpec("segment", window=4))
    with pytest.raises(ValueError, match="only causal / sliding"):
        flex_mask_mod(MaskSpec("sliding", window=4, memory_tokens=True))


@pytest.mark.parametrize("spec", [MaskSpec("sliding", window=6, prefix_len=2), MaskSpec("segment", window=5),
                                  MaskSpec("segment", window=5, prefix_len=1, memory_tokens=True),
                                  MaskSpec("causal", prefix_len=1)], ids=str)
def test_streaming_with_cache_equals_one_pass_and_cache_is_bounded(spec):
    torch.manual_seed(1)
    dim, T = 16, 29
    attn = CausalSelfAttention(dim, 4, kv_heads=2, qk_norm=True, backend="reference").double()
    x = torch.randn(2, T, dim, dtype=torch.float64)
    mem = torch.randn(2, T, dim, dtype=torch.float64) if spec.memory_tokens else None
    prefix = torch.randn(spec.prefix_len, dim, dtype=torch.float64) if spec.prefix_len else None
    full, _ = attn(x, mask=spec, prefix=prefix, memory=mem)
    # projected: x's queries / keys / values made once for the whole run (MAC's batched segment inputs), sliced per
    # piece; only the memory tokens are projected in the pieces
    made = attn.project(x, 0)[:3]
    for projected in (False, True):
        outs, cache, pos, sizes = [], None, 0, []
        for n in [1, 4, 1, 9, 3, 1, 10]:
            piece = x[:, pos:pos + n]
            m = mem[:, pos:pos + n] if mem is not None else None
            qkv = tuple(t[:, :, pos:pos + n] for t in made) if projected else None
            y, cache = attn(piece, mask=spec, start_pos=pos, prefix=prefix, memory=m, cache=cache, return_cache=True,
                            projected=qkv)
            outs.append(y)
            sizes.append(len(cache))
            pos += n
        assert pos == T
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-12)
        if spec.kind != "causal":
            assert max(sizes) <= spec.window  # bounded by the window / segment, not by T
        else:
            assert sizes[-1] == T


def test_attention_errors_name_the_problem():
    attn = CausalSelfAttention(16, 4)
    x = torch.randn(1, 5, 16)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, 16\)"):
        attn(torch.randn(1, 5, 8), mask=MaskSpec())
    with pytest.raises(ValueError, match="prefix: has 0 tokens but mask.prefix_len=2"):
        attn(x, mask=MaskSpec(prefix_len=2))
    with pytest.raises(ValueError, match="memory: must be given"):
        attn(x, mask=MaskSpec("segment", window=4, memory_tokens=True))
    with pytest.raises(ValueError, match="window"):
        MaskSpec("sliding")
    q, k, v = attn.project(x, 0)[:3]
    with pytest.raises(ValueError, match=r"projected: q / k / v of shape \(1, 4, 5, 4\) / \(1, 4, 4, 4\) / "
                                         r"\(1, 4, 5, 4\), expected \(1, 4, 5, 4\) / \(1, 4, 5, 4\)"):
        attn(x, mask=MaskSpec(), projected=(q, k[:, :, :4], v))
    with pytest.raises(ValueError, match="kv_heads=3 must divide heads=4"):
        CausalSelfAttention(16, 4, kv_heads=3)
    # a piece that starts inside what the cache already holds: caught from the host-side end position, and
    # from the position tensor for a cache rebuilt from tensors (a loaded session)
    _, cache = attn(x, mask=MaskSpec(), return_cache=True)
    assert cache.end == 5
    for c in (cache, dataclasses.replace(cache, end=None)):
        with pytest.raises(ValueError, match="start_pos=3: the cache already holds position 4"):
            attn(x, mask=MaskSpec(), start_pos=3, cache=c)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention block masks run on CUDA")
def test_flex_equals_reference_on_gpu():
    torch.manual_seed(0)
    for spec in [MaskSpec("sliding", window=64, prefix_len=4), MaskSpec("causal", prefix_len=4)]:
        attn = CausalSelfAttention(64, 4, backend="flex").cuda()
        ref = CausalSelfAttention(64, 4, backend="reference").cuda()
        ref.load_state_dict(attn.state_dict())
        x = torch.randn(2, 256, 64, device="cuda")
        p = torch.randn(4, 64, device="cuda")
        a, _ = attn(x, mask=spec, prefix=p)
        b, _ = ref(x, mask=spec, prefix=p)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


BLOCKED_CASES = [("sliding", T, w, p) for T, w, p in [(1, 4, 0), (8, 4, 0), (13, 4, 2), (37, 5, 3), (40, 8, 0),
                                                          (9, 16, 1)]]
BLOCKED_CASES += [("segment", T, w, p) for T, w, p in [(37, 8, 0), (64, 16, 3), (5, 8, 2), (48, 12, 4)]]


@pytest.mark.parametrize("kind,T,window,prefix", BLOCKED_CASES)
def test_blocked_equals_the_definition(kind, T, window, prefix):
    """Sliding windows and segments over whole sequences without a T x T mask == the definition, with grads."""
    torch.manual_seed(T + window)
    spec = MaskSpec(kind, window=window, prefix_len=prefix)
    B, H, hd = 2, 3, 8
    q = torch.randn(B, H, T, hd, dtype=torch.float64)
    k = torch.randn(B, H, prefix + T, hd, dtype=torch.float64)
    v = torch.randn(B, H, prefix + T, hd, dtype=torch.float64)
    pos = torch.arange(T)
    got = attention(q, k, v, spec, pos, pos, None, backend="blocked")
    want = loop_attention(q, k, v, spec, pos, pos, None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # gradients flow like the reference's
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    attention(qr, kr, vr, spec, pos, pos, None, backend="blocked").square().sum().backward()
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    attention(qs, ks, vs, spec, pos, pos, None, backend="reference").square().sum().backward()
    for x, y in ((qr, qs), (kr, ks), (vr, vs)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["sliding", "segment"])
def test_blocked_calls_sdpa_with_4d_tensors_and_takes_any_output_layout(kind, monkeypatch):
    """SDPA's fused kernels take 4-D inputs only (5-D falls back to the math path, which saves float32
    probabilities), and on CUDA they return (B, L, H, E)-strided outputs: the blocked path must accept both."""
    import torch.nn.functional as F

    import titans.core.attention.attention_layer as layer

    calls, sdpa = [], F.scaled_dot_product_attention

    def sdpa_like_a_fused_kernel(q, k, v, attn_mask=None, **kw):
        calls.append((q.ndim, k.ndim, v.ndim))
        out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, the heads innermost but one

    torch.manual_seed(3)
    spec = MaskSpec(kind, window=8, prefix_len=2)
    q = torch.randn(2, 3, 29, 8, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 31, 8, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(29)
    want = loop_attention(q, k, v, spec, pos, pos, None)
    monkeypatch.setattr(layer.F, "scaled_dot_product_attention", sdpa_like_a_fused_kernel)
    got = attention(q, k, v, spec, pos, pos, None, backend="blocked")
    assert calls and all(c == (4, 4, 4) for c in calls)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_segment_backend_choice_respects_alignment():
    attn = CausalSelfAttention(16, 2)
    spec = MaskSpec("segment", window=8, prefix_len=2)
    assert attn._pick_backend(spec, torch.device("cpu"), 64, True, 0) == "blocked"
    assert attn._pick_backend(spec, torch.device("cpu"), 64, True, 16) == "blocked"
    # a piece that starts mid-segment, or a cached decode step, never takes the blocked path
    assert attn._pick_backend(spec, torch.device("cpu"), 64, True, 4) == "sdpa"
    assert attn._pick_backend(spec, torch.device("cpu"), 64, False, 0) == "sdpa"


def _rotary_definition(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotate-half RoPE written out in float64: pairs (i, i + hd/2) turn by position * theta^(-2i/hd)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = positions.double()[:, None] * inv[None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], dim=-1)


def test_rotary_tables_kept_equal_fresh_ones_and_the_definition():
    """cos_sin of a host run slices a kept table (grown on demand, per device / dtype, dropped by .to()); it equals
    the tables computed from a position tensor (static decoding's path), and rotate equals the definition."""
    from titans.core.attention.attention_utils import RotaryEmbedding

    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 700, 8, dtype=torch.float64)
    for start, n in ((0, 5), (3, 1), (250, 20), (0, 700), (513, 100), (7, 1)):  # 700 grows the table past 256
        pos = torch.arange(start, start + n)
        for dtype in (torch.float64, torch.float32):
            kept = rope.cos_sin(start, n, dtype)
            fresh = rope.cos_sin(pos, n, dtype)
            for a, b in zip(kept, fresh):
                assert a.dtype == dtype and a.shape == (n, 8)
                torch.testing.assert_close(a, b, rtol=0, atol=2 * torch.finfo(dtype).eps)
        got = RotaryEmbedding.rotate(x[:, :, :n], *rope.cos_sin(start, n, torch.float64))
        torch.testing.assert_close(got, _rotary_definition(x[:, :, :n], pos), rtol=0, atol=1e-12)
    assert {k[1] for k in rope._tables} == {torch.float64, torch.float32}
    rope.float()  # inv_freq rounded to float32: the tables follow it
    assert not rope._tables
    pos = torch.arange(40, 60)
    for a, b in zip(rope.cos_sin(40, 20, torch.float64), rope.cos_sin(pos, 20, torch.float64)):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-16)


@pytest.mark.parametrize("spec", SPECS)
def test_kept_dense_masks_equal_freshly_built_ones(spec):
    """dense_mask of host runs (moved to a canonical origin and kept) equals build_dense_mask of the positions, as
    bool and as SDPA's additive float mask, at segment-aligned and unaligned starts, with and without cached keys."""
    from titans.core.attention.attention_utils import PositionRuns, dense_mask

    for q0, nq, cached in ((0, 6, 0), (6, 6, 0), (12, 6, 0), (13, 3, 1), (7, 1, 4), (30, 4, 2), (19, 5, 0)):
        k0 = q0 - cached
        runs = PositionRuns((q0, nq), (k0, cached + nq), (k0, cached + nq) if spec.memory_tokens else None)
        pos = torch.arange(q0, q0 + nq)
        keys = torch.arange(k0, q0 + nq)
        want = build_dense_mask(spec, pos, keys, keys if spec.memory_tokens else None)
        for _ in range(2):  # built, then kept
            got = dense_mask(spec, runs, torch.device("cpu"))
            assert got.dtype == torch.bool and torch.equal(got, want), (q0, nq, cached)
            add = dense_mask(spec, runs, torch.device("cpu"), torch.float64)
            assert torch.equal(add, torch.where(want, 0.0, float("-inf")).double())


def test_kept_tensors_never_evict_and_stop_keeping_at_capacity():
    """A kept tensor stays the same object for good (a captured CUDA graph may read it by address); past the
    capacity new keys are built per call, not kept in place of older ones; nothing is kept while compiling."""
    from titans.utils.tensors import KeptTensors

    kept, built = KeptTensors(2), []

    def build(i):
        built.append(i)
        return torch.full((3,), float(i))

    first = kept.get("a", lambda: build(0))
    assert kept.get("a", lambda: build(9)) is first and built == [0]
    kept.get("b", lambda: build(1))
    c1, c2 = kept.get("c", lambda: build(2)), kept.get("c", lambda: build(3))
    assert c1 is not c2 and built == [0, 1, 2, 3] and len(kept) == 2  # "c" is never kept ...
    assert kept.get("a", lambda: build(9)) is first  # ... and "a" never dropped for it

    mod = KeptTensors(4)
    torch.compile(lambda x: x + mod.get("x", lambda: torch.ones(3)), fullgraph=True, backend="eager")(torch.zeros(3))
    assert len(mod) == 0


def test_rotary_tables_read_by_a_capture_stay_alive_others_go(monkeypatch):
    """Growing the kept rotary tables keeps a smaller one referenced only if a CUDA-graph capture read it (the graph
    reads it by address); a table no capture read is let go.  Past ``max_kept`` positions the tables are computed
    per call (equal to the kept ones) and the kept table is let go: a long stream holds no tables that grow with it."""
    from titans.core.attention import attention_utils
    from titans.core.attention.attention_utils import RotaryEmbedding

    rope = RotaryEmbedding(8, max_kept=4096)
    plain = rope.cos_sin(0, 10, torch.float64)[0].untyped_storage().data_ptr()  # a 256-position table
    rope.cos_sin(300, 10, torch.float64)  # grown to 512: the first table, never captured, is not kept
    assert not rope._outgrown and rope._tables[(torch.device("cpu"), torch.float64)][0].shape[0] == 512
    monkeypatch.setattr(attention_utils, "capturing_cuda_graph", lambda: True)
    captured = rope.cos_sin(0, 10, torch.float64)[0].untyped_storage().data_ptr()  # read inside a "capture"
    monkeypatch.undo()
    assert captured != plain
    rope.cos_sin(1000, 10, torch.float64)  # grown to 1024: the captured table stays alive
    assert [t[0].untyped_storage().data_ptr() for t in rope._outgrown] == [captured]
    # past max_kept: computed, equal to the kept table's slice, and the kept table let go
    want = rope.cos_sin(4000, 90, torch.float64)
    got = rope.cos_sin(4000, 100, torch.float64)
    assert not rope._tables and len(rope._outgrown) == 1
    for a, b in zip(got, want):
        assert a.shape == (100, 8)
        torch.testing.assert_close(a[:90], b, rtol=0, atol=0)


def test_a_long_stream_keeps_no_rotary_tables():
    """Streaming a model past the kept positions leaves no rotary table behind (session 21: a 1M-token prefill on
    the GPU left 4 GB of them), and the stream's output is the same as with every table kept."""
    from titans.core.models import build_model

    torch.manual_seed(0)
    model = build_model(dict(variant="mac", vocab_size=64, dim=32, depth=2, heads=2, window=16, persistent_tokens=2,
                             memory_depth=2, memory_chunk_size=8, memory_layers=[1])).double().eval()
    ids = torch.randint(0, 64, (1, 96))

    def stream():
        state, outs = None, []
        with torch.no_grad():
            for piece in ids.split(32, dim=1):
                out = model(piece, state=state)
                state = out.state
                outs.append(out.logits)
        return torch.cat(outs, dim=1)

    ropes = [b.attn.rope for b in model.blocks]
    kept = stream()
    assert all(r._tables for r in ropes)
    for r in ropes:
        r.max_kept = 64  # the stream goes to 96
    computed = stream()
    assert not any(r._tables or r._outgrown for r in ropes)
    torch.testing.assert_close(computed, kept, rtol=0, atol=0)
