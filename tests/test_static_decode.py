"""Static decoding (issue 7): the branch-free single-token step over fixed-shape state equals the normal
``model(ids, state)`` path for every variant, hands back a state that continues identically, never syncs with
the host, and drives ``generate(..., cuda_graphs=True)``; on CUDA the captured graph replays the eager step."""

from __future__ import annotations

import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titans.core.models import build_model, generate
from titans.inference.static_decode import GraphedDecoder, StaticDecodeState, static_decode_step
from titans.utils.tensors import side_stream

VOCAB, WINDOW, CHUNK = 37, 8, 4
PROMPT = 11  # a multiple of neither the memory chunk (4) nor the window / MAC segment (8)
STEPS = 3 * WINDOW

# every variant; MAC also with a layer without memory (segment attention without memory tokens), SWA with
# grouped-query heads and qk-norm
CASES = {
    "mac": dict(depth=3, memory_layers=[0, 2]),
    "mag": {},
    "mal": {},
    "lmm": dict(depth=3, memory_layers=[0, 1]),  # layer 2: attention only
    "transformer": {},
    "swa": dict(kv_heads=1, qk_norm=True),
}


def make_model(variant: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = dict(variant=variant, vocab_size=VOCAB, dim=32, depth=2, heads=2, window=WINDOW, persistent_tokens=2,
               memory_depth=2, memory_chunk_size=CHUNK, memory_expansion=1.5)
    cfg.update(CASES.get(variant, {}))
    cfg.update(over)
    model = build_model(cfg).double()
    with torch.no_grad():  # random (not near-identity) slow weights so every path matters
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "init_weights" not in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("variant, over", [(v, {}) for v in CASES] + [("mac", dict(mac_memory_input="residual"))])
@torch.no_grad()
def test_static_step_matches_forward_and_hands_back_the_state(variant, over):
    model = make_model(variant, **over)
    ids = torch.randint(0, VOCAB, (2, PROMPT + STEPS))
    state = model(ids[:, :PROMPT]).state
    static = StaticDecodeState.from_model_state(model, state, max_len=PROMPT + STEPS)
    for t in range(PROMPT, PROMPT + STEPS):  # teacher-forced: both paths consume the same ids
        out = model(ids[:, t:t + 1], state)
        state = out.state
        got = static_decode_step(model, ids[:, t:t + 1], static)
        torch.testing.assert_close(got, out.logits[:, 0], rtol=0, atol=1e-10, msg=f"{variant}: step {t}")
    back = static.to_model_state()
    assert back.position == state.position == PROMPT + STEPS
    # the handed-back state continues like the normal one, over a piece that crosses chunks and segments
    nxt = torch.randint(0, VOCAB, (2, WINDOW + 5))
    torch.testing.assert_close(model(nxt, back).logits, model(nxt, state).logits, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", ["mac", "mal", "transformer"])
@torch.no_grad()
def test_static_step_from_a_fresh_state(variant):
    """Position 0: empty rings (and, for the baseline, no tensor to read the batch size from)."""
    model = make_model(variant)
    ids = torch.randint(0, VOCAB, (1, WINDOW + 3))
    static = StaticDecodeState.from_model_state(model, model.init_state(1), max_len=ids.shape[1], batch_size=1)
    state = None
    for t in range(ids.shape[1]):
        out = model(ids[:, t:t + 1], state)
        state = out.state
        torch.testing.assert_close(static_decode_step(model, ids[:, t:t + 1], static), out.logits[:, 0],
                                   rtol=0, atol=1e-10)


class _NoHostSync(TorchDispatchMode):
    """Fails on every op that reads a device value on the host or has a data-dependent shape."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten.item.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FORBIDDEN:
            raise AssertionError(f"host sync / data-dependent shape in the static step: {func}")
        if func is torch.ops.aten.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            raise AssertionError("boolean indexing in the static step")
        return func(*args, **kwargs)


@pytest.mark.parametrize("variant", list(CASES))
@torch.no_grad()
def test_static_step_never_syncs_with_the_host(variant):
    model = make_model(variant)
    ids = torch.randint(0, VOCAB, (2, PROMPT))
    static = StaticDecodeState.from_model_state(model, model(ids).state, max_len=64)
    tok = torch.randint(0, VOCAB, (2, 1))
    with _NoHostSync():
        for _ in range(CHUNK + 1):  # across a chunk boundary and, from 11, the segment start at 16
            static_decode_step(model, tok, static)
    with pytest.raises(AssertionError, match="host sync"), _NoHostSync():
        torch.ones(()).item()  # the guard itself works


def test_unsupported_config_and_ring_overflow_fail_clearly():
    model = make_model("mag", memory_gates_per_chunk=True)
    with pytest.raises(ValueError, match="memory_gates_per_chunk"):
        StaticDecodeState.from_model_state(model, model(torch.zeros(1, 3, dtype=torch.long)).state)
    model = make_model("transformer")
    state = model(torch.zeros(1, 3, dtype=torch.long)).state
    with pytest.raises(ValueError, match="max_len"):
        StaticDecodeState.from_model_state(model, state)  # full causal attention needs a capacity
    decoder = GraphedDecoder(model, state, max_len=5)
    tok = torch.zeros(1, 1, dtype=torch.long)
    decoder.step(tok)
    decoder.step(tok)
    with pytest.raises(ValueError, match="max_len=5"):
        decoder.step(tok)


@pytest.mark.parametrize("variant", ["mac", "mal", "transformer"])
def test_generate_with_cuda_graphs_flag_gives_the_same_tokens_and_state(variant):
    """On the CPU the flag runs the static step eagerly: the same greedy tokens, a normal final state."""
    model = make_model(variant)
    prompt = torch.randint(0, VOCAB, (2, PROMPT))
    base = generate(model, prompt, max_new_tokens=STEPS, temperature=0)
    fast = generate(model, prompt, max_new_tokens=STEPS, temperature=0, cuda_graphs=True)
    assert fast.tokens == base.tokens
    assert fast.state.position == base.state.position == PROMPT + STEPS
    nxt = torch.randint(0, VOCAB, (2, 5))
    torch.testing.assert_close(model(nxt, fast.state).logits, model(nxt, base.state).logits, rtol=0, atol=1e-10)
    # top_k=1 sampling is greedy too; a stop token ends both paths at the same place
    k1 = generate(model, prompt, 6, temperature=1.0, top_k=1, seed=0, cuda_graphs=True)
    assert k1.tokens == [row[:6] for row in base.tokens]
    stop = base.tokens[0][3]
    stopped = generate(model, prompt, STEPS, temperature=0, stop_tokens=[stop], cuda_graphs=True)
    assert stopped.tokens == generate(model, prompt, STEPS, temperature=0, stop_tokens=[stop]).tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", list(CASES))
@torch.no_grad()
def test_graph_replay_matches_the_eager_static_step(variant):
    model = make_model(variant).float().cuda()
    ids = torch.randint(0, VOCAB, (2, PROMPT + STEPS), device="cuda")
    state = model(ids[:, :PROMPT]).state
    graphed = GraphedDecoder(model, state, max_len=PROMPT + STEPS, use_graphs=True)
    eager = GraphedDecoder(model, state, max_len=PROMPT + STEPS, use_graphs=False)
    assert graphed.capture_check["agrees"], graphed.capture_check  # the decoder's own check of its capture
    assert eager.capture_check is None
    for t in range(PROMPT, PROMPT + STEPS):
        got = graphed.step(ids[:, t:t + 1]).clone()
        torch.testing.assert_close(got, eager.step(ids[:, t:t + 1]), rtol=1e-5, atol=1e-5)
    nxt = ids[:, -5:]
    torch.testing.assert_close(model(nxt, graphed.to_model_state()).logits,
                               model(nxt, eager.to_model_state()).logits, rtol=1e-5, atol=1e-5)


def test_replay_agreement_judges_replayed_logits_against_the_eager_ones():
    """The check a GraphedDecoder runs after its capture: equal or rounding-close logits agree; a shift past the
    tolerance, non-finite logits or other shapes do not (the last raises, naming both)."""
    from titans.inference.static_decode import CAPTURE_LOGITS_RTOL, replay_agreement

    eager = torch.randn(2, 11, generator=torch.Generator().manual_seed(0))
    same = replay_agreement(eager, eager.clone())
    assert same == {"rel_diff": 0.0, "tolerance": CAPTURE_LOGITS_RTOL, "agrees": True}
    scale = float(eager.abs().max())
    near = eager.clone()
    near[1, 3] += 0.5 * CAPTURE_LOGITS_RTOL * scale
    assert replay_agreement(eager, near)["agrees"]
    off = eager.clone()
    off[0, 7] += 4e-5 * scale
    bad = replay_agreement(eager, off)
    assert not bad["agrees"] and bad["rel_diff"] == pytest.approx(4e-5, rel=1e-3)
    nan = eager.clone()
    nan[0, 0] = float("nan")
    assert not replay_agreement(eager, nan)["agrees"] and not replay_agreement(nan, eager)["agrees"]
    with pytest.raises(ValueError, match=r"shapes \(2, 11\) and \(2, 10\)"):
        replay_agreement(eager, eager[:, :10])


def test_side_stream_names_a_cpu_device_in_its_error():
    with pytest.raises(ValueError, match="CUDA device, got cpu"):
        side_stream("cpu", "decode-warmup")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@torch.no_grad()
def test_decoders_made_one_after_another_leave_no_memory_behind():
    """A decoder warms up on a side stream; a fresh stream per decoder left one cuBLAS workspace per decoder alive
    for the rest of the process (32 MiB on Hopper: decode's whole peak growth from 1K to 1M tokens of context in
    benchmarks/RESULTS.md section 6, session 22).  Now the streams are the process's own, handed out again."""
    assert side_stream("cuda", "decode-warmup") is side_stream("cuda", "decode-warmup")
    assert side_stream("cuda", "decode-warmup") is not side_stream("cuda", "decode-warmup", urgent=True)
    model = make_model("mac").float().cuda()
    ids = torch.randint(0, VOCAB, (1, PROMPT + 1), device="cuda")
    state = model(ids[:, :PROMPT]).state

    def allocated_after_one_decoder() -> int:
        decoder = GraphedDecoder(model, state, max_len=PROMPT + 2, use_graphs=True)
        decoder.step(ids[:, PROMPT:])
        del decoder
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    first = allocated_after_one_decoder()
    later = [allocated_after_one_decoder() for _ in range(3)]
    assert all(abs(a - first) < 2**20 for a in later), (first, later)
