"""The segment-major (wavefront) training forward equals the one-pass forward: loss and every gradient, float64."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from titans.core.models import build_model
from titans.core.models.model import ModelState
from titans.training.wavefront import wavefront_logits, wavefront_loss


def _model(variant: str, **kw):
    cfg = dict(variant=variant, vocab_size=64, dim=32, depth=3, heads=2, window=16, persistent_tokens=2,
               memory_depth=2, memory_chunk_size=8, memory_layers=[1])
    cfg.update(kw)
    torch.manual_seed(0)
    return build_model(cfg).double()


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm", "swa", "transformer"])
@pytest.mark.parametrize("segment,T", [(None, 80), (24, 75), (48, 80)])
def test_wavefront_equals_the_one_pass_forward(variant, segment, T):
    """Segment by segment through all blocks (the states carried, with their gradients) == model(ids, labels=ids):
    on MAC's segment grid and off it (24-token steps over 75 tokens: pieces cross MAC segments and memory chunks), and
    three segments a step (``benchmarks/harness.py --wavefront-step``)."""
    model = _model(variant)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (2, T), generator=g)
    _assert_one_pass_loss_and_grads(model, ids, wavefront_loss(model, ids, segment=segment))


def _assert_one_pass_loss_and_grads(model, ids, loss) -> None:
    """``loss`` (a wavefront loss of ``ids``, its graph alive) == ``model(ids, labels=ids)``: the value and the
    gradient of every parameter (float64 tolerances)."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref = model(ids, labels=ids, use_cache=False).loss
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for (name, _), a, b in zip(named, grads, ref_grads):
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("views", [None, False], ids=["default", "off"])
@pytest.mark.parametrize("variant,kw", [("mac", {}), ("mag", {}), ("mac", {"persistent_tokens": 0,
                                                                             "tie_embeddings": False})])
def test_stream_views_keep_the_loss_and_gradients_and_sum_per_stream(variant, kw, views, autograd_nodes,
                                                                     monkeypatch):
    """``stream_views`` (the default, ``TITANS_WAVEFRONT_STREAM_VIEWS`` unset): the persistent tokens and the tied
    embedding / head weight read through one view per stream == the one-pass loss and gradients (float64); the
    persistent tokens' accumulator then receives one gradient per block (its views), not one per block and
    segment.  Off: no views, one gradient per block and segment (4 segments of 16), the same loss and gradients."""
    monkeypatch.delenv("TITANS_WAVEFRONT_STREAM_VIEWS", raising=False)
    model = _model(variant, **kw)
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(3))
    loss = wavefront_loss(model, ids, stream_views=views)
    tokens = model.persistent.tokens
    if tokens is not None:
        feeding = [fn for fn in autograd_nodes(loss) for f, _ in fn.next_functions
                   if type(f).__name__ == "AccumulateGrad" and f.variable is tokens]
        by_view = [fn for fn in feeding if type(fn).__name__ == "ViewBackward0"]
        # one view a block; MAG's fresh memory state absorbs the tokens once more (init_state, before the loop)
        mag = int(variant == "mag")
        if views is None:
            assert len(by_view) == len(model.blocks) and len(feeding) - len(by_view) == mag
        else:
            assert by_view == [] and len(feeding) == len(model.blocks) * 4 + mag
    _assert_one_pass_loss_and_grads(model, ids, loss)


def test_wavefront_logits_and_errors():
    model = _model("mac")
    ids = torch.randint(0, 64, (1, 40))
    torch.testing.assert_close(wavefront_logits(model, ids), model(ids).logits, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(B, T\)"):
        wavefront_logits(model, ids[0])
    with pytest.raises(ValueError, match="segment: expected >= 1"):
        wavefront_logits(model, ids, segment=-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="streams=True needs a CUDA device"):
            wavefront_logits(model, ids, streams=True)


@pytest.mark.parametrize("variant,checkpointing", [("mac", "none"), ("mac", "memory"), ("mag", "none"),
                                                   ("transformer", "none")])
def test_block_mixer_then_feed_forward_is_the_block(variant, checkpointing):
    """forward_mixer then feed_forward (the wavefront's split of a memory block over two streams) == the block's
    forward, states included (also with the memory's work recomputed); full checkpointing (one recomputed region)
    refuses the split by name."""
    model = _model(variant).train().set_activation_checkpointing(checkpointing)
    block, x = model.blocks[1], torch.randn(2, 40, 32, dtype=torch.float64)
    p = model.persistent()
    st_a, st_b = model.init_state(2).layers[1], model.init_state(2).layers[1]
    a = block(x, st_a, 0, p, True)
    b = block.feed_forward(block.forward_mixer(x, st_b, 0, p, True))
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    state_a, state_b = ModelState([st_a]).tensors(), ModelState([st_b]).tensors()
    assert state_a.keys() == state_b.keys() and len(state_a) > 1  # the position and the layer's own state
    for name, t in state_a.items():
        torch.testing.assert_close(state_b[name], t, rtol=0, atol=0, msg=name)
    model.set_activation_checkpointing("full")
    with pytest.raises(ValueError, match="full activation checkpointing"):
        block.forward_mixer(x, st_b, 40, p, True)


@pytest.mark.parametrize("batched,queries", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["per_segment", "batched", "queries", "batched_queries"])
@pytest.mark.parametrize("pos,T", [(0, 40), (4, 40), (16, 48)])
def test_block_mixer_with_readouts_apart_is_the_mixer(pos, T, batched, queries):
    """MAC's mixer with each segment's memory read-out and gate handed to a callback (forward_mixer_split, which the
    wavefront runs on a second stream) == forward_mixer: output, states and every gradient, float64; on and off the
    segment grid (a piece starting mid-segment: memory written from mid-chunk takes the one-node path).  The
    callback is called once per segment and for the residual sum; other blocks and checkpointing are refused.
    ``batched``: the chains first, then each run of equal-length segments' read-outs at once (``mac_readouts``).
    ``queries``: the retrievals' queries and gate inputs made once for the call's segments (``mac_queries``, the
    read convolution's cache carried across the call as segment by segment)."""
    model = _model("mac").train()
    block, p = model.blocks[1], model.persistent()
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    params = [x] + [q for q in block.parameters() if q.requires_grad]

    def run(split: bool):
        st = model.init_state(2).layers[1]
        if pos:  # a state from an earlier piece
            block.forward_mixer(torch.randn(2, pos, 32, dtype=torch.float64,
                                            generator=torch.Generator().manual_seed(2)), st, 0, p, True)
        calls = []

        def run_readout(fn, *args):
            calls.append(fn.__name__)
            return fn(*args)

        out = (block.forward_mixer_split(x, st, pos, p, True, run_readout, batched, queries) if split else
               block.forward_mixer(x, st, pos, p, True))
        loss = (out * torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))).sum()
        return out, ModelState([st]).tensors(), torch.autograd.grad(loss, params, allow_unused=True), calls

    (a, sa, ga, _), (b, sb, gb, calls) = run(False), run(True)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert sa.keys() == sb.keys()
    for name, t in sa.items():
        torch.testing.assert_close(sb[name], t, rtol=1e-12, atol=1e-12, msg=name)
    for u, v in zip(gb, ga):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    segments = len(range(pos // 16 * 16, pos + T, 16))
    if not batched:
        assert calls == ["mac_readout"] * segments + ["_residual_sum"], calls
    else:  # pieces 16 16 8 / 12 16 12 (off the chunk grid: the one-node update, no stacking) / 16 16 16
        runs = {0: ["mac_readouts_along", "mac_readout"], 4: ["mac_readout"] * 3, 16: ["mac_readouts_along"]}[pos]
        assert calls == runs + ["_residual_sum"], calls
    with pytest.raises(ValueError, match="a MAC block with memory, this is 'mac' layer 0 \\(without memory\\)"):
        model.blocks[0].forward_mixer_split(x, model.init_state(2).layers[0], 0, p, True)
    model.set_activation_checkpointing("memory")
    with pytest.raises(ValueError, match="not with activation checkpointing"):
        block.forward_mixer_split(x, model.init_state(2).layers[1], 0, p, True)


@pytest.mark.parametrize("variant,segment,T", [("mac", None, 80), ("mac", 24, 75), ("mac", 48, 80),
                                               ("mag", None, 80)])
def test_wavefront_with_readouts_apart_equals_the_one_pass_forward(variant, segment, T):
    """readout_streams=True (MAC's segment read-outs through forward_mixer_split; on the CPU on the one stream) ==
    model(ids, labels=ids): loss and every gradient, float64, on and off MAC's segment grid; other variants
    unchanged."""
    model = _model(variant)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    _assert_one_pass_loss_and_grads(model, ids, wavefront_loss(model, ids, segment=segment, readout_streams=True))


@pytest.mark.parametrize("segment,T,apart,kw", [(None, 80, False, {}), (24, 75, False, {}), (48, 80, False, {}),
                                                (64, 80, True, {}), (48, 80, False, {"memory_depth": 1}),
                                                (48, 80, False, {"memory_backend": "chunked"})])
def test_wavefront_with_batched_readouts_equals_the_one_pass_forward(segment, T, apart, kw):
    """batched_readouts=True (a call's segment chains, then their read-outs at once; with readout_streams too, on the
    CPU on the one stream) == model(ids, labels=ids): loss and every gradient, float64, the weight gradients
    deferred (the wavefront's default) or not; memory depth 1, and a memory backend whose write computes the core's
    read-out at once (those tensors stacked instead of pending read-outs)."""
    model = _model("mac", **kw)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    _assert_one_pass_loss_and_grads(model, ids, wavefront_loss(model, ids, segment=segment, readout_streams=apart,
                                                               batched_readouts=True))
    model.set_weight_grad_deferral(False)
    _assert_one_pass_loss_and_grads(model, ids, wavefront_loss(model, ids, segment=48, batched_readouts=True))


@pytest.mark.parametrize("layout", ["0", "1"], ids=["split", "split_in_memory_order"])
@pytest.mark.parametrize("segment,T,kw", [(None, 80, {}), (24, 75, {}), (48, 80, {"memory_conv_kernel": 0}),
                                           (64, 80, {"batched_readouts": True})])
def test_wavefront_with_batched_queries_equals_the_one_pass_forward(segment, T, kw, layout, monkeypatch):
    """batched_queries=True (what a call's retrievals compute from the block input alone, made once before the
    segment steps) == model(ids, labels=ids): loss and every gradient, float64, the weight gradients deferred (the
    wavefront's default; the retrieval's uses then leave the segments' declared uses) or not; on and off the segment
    grid, without the memory's convolution, and with batched read-outs too; the inputs' pieces split plainly or
    handing their gradients back in the inputs' memory order (``TITANS_WAVEFRONT_INPUTS_LAYOUT=1``).  Without those,
    the segments keep the one-region step (``mac_segment``; the split into chain and read-out is only for the
    read-outs' sake)."""
    from titans.core.models.model import TitansBlock

    monkeypatch.setenv("TITANS_WAVEFRONT_INPUTS_LAYOUT", layout)
    batched = kw.pop("batched_readouts", False)
    model = _model("mac", **kw)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    steps = []
    for name in ("mac_segment", "mac_chain", "mac_queries"):
        real = getattr(TitansBlock, name)
        monkeypatch.setattr(TitansBlock, name, lambda self, *a, _real=real, _name=name, **k: (
            steps.append(_name), _real(self, *a, **k))[1])
    for defer in (True, False):
        model.set_weight_grad_deferral(defer)
        steps.clear()
        _assert_one_pass_loss_and_grads(model, ids, wavefront_loss(model, ids, segment=segment, batched_queries=True,
                                                                   batched_readouts=batched))
        calls = -(-T // (segment or model.config.window))  # wavefront calls of the memory block
        assert steps.count("mac_queries") == calls
        assert ("mac_chain" in steps) == batched, steps  # (the one-pass reference runs mac_segment too)


def test_wavefront_switches_name_a_bad_value(monkeypatch):
    monkeypatch.setenv("TITANS_WAVEFRONT_PRIORITY", "yes")
    with pytest.raises(ValueError, match="TITANS_WAVEFRONT_PRIORITY='yes': expected 0 or 1"):
        wavefront_logits(_model("mac"), torch.zeros(1, 16, dtype=torch.long))


def test_readouts_apart_by_default_only_on_streams_with_32_queues(monkeypatch):
    """TITANS_WAVEFRONT_READOUT_STREAMS=auto (the default) puts MAC's read-outs apart only where the wavefront runs on
    CUDA streams with at least 32 hardware queues (with CUDA's 8 they were 13-28% slower); 0 / 1 say so whatever the
    queues; a bad value is named."""
    from titans.training.wavefront import readouts_apart_by_default

    name, queues = "TITANS_WAVEFRONT_READOUT_STREAMS", "CUDA_DEVICE_MAX_CONNECTIONS"
    monkeypatch.delenv(name, raising=False)
    for have, streams, apart in [("32", True, True), ("8", True, False), ("16", True, False), ("32", False, False)]:
        monkeypatch.setenv(queues, have)
        assert readouts_apart_by_default(streams) is apart, (have, streams)
    monkeypatch.setenv(queues, "8")
    monkeypatch.setenv(name, "1")
    assert readouts_apart_by_default(True) is True and readouts_apart_by_default(False) is True
    monkeypatch.setenv(queues, "32")
    monkeypatch.setenv(name, "0")
    assert readouts_apart_by_default(True) is False
    monkeypatch.setenv(name, "yes")
    with pytest.raises(ValueError, match=f"{name}='yes': expected auto or 0 or 1"):
        readouts_apart_by_default(True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (one stream per block)")
@pytest.mark.parametrize("variant", ["mac", "mag"])
@pytest.mark.parametrize("priority,ffn_streams,views,readouts", [
    (False, False, False, False), (True, False, False, False), (True, True, False, False), (True, True, True, False),
    (True, True, False, True), (True, False, False, True), (True, True, False, "urgent"),
    (True, True, False, "batched"), (True, False, False, "batched apart"), (True, True, False, "queries"),
    (True, True, False, "queries on the chain's stream")])
def test_wavefront_streams_equal_one_stream_on_cuda(variant, priority, ffn_streams, views, readouts, monkeypatch):
    """Each block on its own CUDA stream (the memory blocks' at high priority; their feed-forward on streams of
    their own; MAC's segment read-outs there too, or on urgent streams of their own; or batched a call at a time, on
    the block's stream or apart): the same loss and gradients as the segment-major loop on one stream (float32: the
    kernels are the same, only their order on the device differs).  Batched queries: the call's segment inputs on a
    stream of their own (the default), or on the block's."""
    if readouts == "urgent":
        monkeypatch.setenv("TITANS_WAVEFRONT_READOUT_URGENT", "1")
        readouts = True
    segment = None  # the window: a segment a call
    if readouts in ("queries", "queries on the chain's stream"):  # the segments' inputs once a call (3 segments)
        monkeypatch.setenv("TITANS_WAVEFRONT_BATCHED_QUERIES", "1")
        monkeypatch.setenv("TITANS_WAVEFRONT_INPUTS_STREAM", "0" if readouts != "queries" else "1")
        readouts, segment = False, 96
    if isinstance(readouts, str):  # batched read-outs, on the block's stream or (apart) the read-out stream
        monkeypatch.setenv("TITANS_WAVEFRONT_BATCHED_READOUTS", "1")
        readouts, segment = readouts == "batched apart", 96  # three segments a call, read back at once
    model = _model(variant, dim=64, window=32).float().cuda()
    ids = torch.randint(0, 64, (2, 256), device="cuda")
    params = list(model.parameters())
    out = []
    for streams in (False, True):
        loss = wavefront_loss(model, ids, segment=segment, streams=streams, priority=priority, ffn_streams=ffn_streams,
                              stream_views=views, readout_streams=readouts)
        out.append((loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)))
    torch.cuda.synchronize()
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out[1][1], out[0][1]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)



def test_trainer_loss_unit_takes_the_wavefront(autograd_nodes):
    """LossFn (what training.cuda_graphs captures) with ``wavefront=True`` is the segment-major loss: the same value
    as the one-pass LossFn, and really the wavefront's graph (no whole-sequence MAC split in it)."""
    from titans.training.trainer import LossFn

    model = _model("mac")
    ids = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(2))
    one_pass, wave = LossFn(model)(ids, ids), LossFn(model, wavefront=True)(ids, ids)
    torch.testing.assert_close(wave, one_pass, rtol=1e-12, atol=1e-12)
    def splits(loss) -> int:
        return sum(type(fn).__name__ == "SplitWithSizesBackward0" for fn in autograd_nodes(loss))

    assert splits(one_pass) == 1  # the one-pass MAC block cuts 64 tokens once
    # the wavefront: one call a segment, nothing to cut (the batched segment inputs, the default, are the segment's)
    assert splits(wave) == 0
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TITANS_WAVEFRONT_BATCHED_QUERIES", "0")
        assert splits(LossFn(model, wavefront=True)(ids, ids)) == 64 // 16  # a split of one piece a call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (graph capture of the streams)")
@pytest.mark.parametrize("step,queries,readouts,inputs_stream,extra", [
    (None, "0", "0", "1", {}), (96, "0", "0", "1", {}), (96, "1", "0", "1", {}), (96, "0", "1", "1", {}),
    (96, "1", "1", "1", {}), (96, "1", "1", "0", {}), (96, "0", "1", "1", {"memory_backend": "fused"}),
    (96, "0", "1", "1", {"TITANS_TRITON_WALK_PARTS": "1"}),
    (96, "0", "0", "1", {"TITANS_WAVEFRONT_READOUT_STREAMS": "1"}),
    (96, "1", "0", "1", {"TITANS_WAVEFRONT_READOUT_STREAMS": "1"}),
    (96, "1", "1", "1", {"TITANS_WAVEFRONT_READOUT_STREAMS": "1"})],
    ids=["a segment a call", "3 a call", "batched queries", "batched read-outs", "both",
         "both, queries on the chain's stream", "batched read-outs, PyTorch memory",
         "batched read-outs, walks in one program a head", "read-outs apart (the split core, a segment at a time)",
         "batched queries, read-outs apart (the default with 32 queues)", "batched read-outs apart"])
def test_graphed_wavefront_equals_eager_on_cuda(step, queries, readouts, inputs_stream, extra, monkeypatch):
    """graphed_loss(..., wavefront=True): the side streams captured in the forward and backward graphs give the eager
    loss and gradients (float32, no autocast): one segment a call against the one-pass forward; three a call, with
    each segment's own inputs and read-outs or the batched ones (their inputs on a stream of their own or on the
    block's), against the same wavefront run eagerly on its streams.  Session 37's GPU calls: with the batched
    inputs and read-outs the graphed loss differed from the eager one (4.17602 vs 4.17620; the eager wavefront equals
    the one pass on the GPU, ``benchmarks/wavefront_float32.py``).  Only the batched read-outs and the read-outs
    apart write through the split core (the walk alone, then the read-out; ``TitansBlock.mac_chain``); the other
    layouts run a segment's whole core at once.  Session 40 (an H100): every split-core layout failed, the PyTorch
    memory too; then ``benchmarks/stream_hazards.py`` found on the CPU that the wavefront freed the fresh state (made
    on the caller's stream) mid-call while the blocks' streams read it, without ``record_stream`` (fixed; the
    split core's first write lets go of the initial momentum, the whole core keeps it for its backward)."""
    from titans.training.trainer import graphed_loss

    monkeypatch.setenv("TITANS_WAVEFRONT_BATCHED_QUERIES", queries)
    monkeypatch.setenv("TITANS_WAVEFRONT_BATCHED_READOUTS", readouts)
    monkeypatch.setenv("TITANS_WAVEFRONT_INPUTS_STREAM", inputs_stream)
    # the read-outs on the chain unless the layout says apart (auto, the default, follows the hardware queues)
    monkeypatch.setenv("TITANS_WAVEFRONT_READOUT_STREAMS", "0")
    for name, value in extra.items():
        if name.startswith("TITANS_"):
            monkeypatch.setenv(name, value)
    model = _model("mac", dim=64, window=32, **{k: v for k, v in extra.items() if not k.startswith("TITANS_")})
    model = model.float().cuda()
    ids = torch.randint(0, 64, (2, 256), device="cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    ref = (model(ids, labels=ids, use_cache=False).loss if step is None else
           wavefront_loss(model, ids, segment=step))
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    # the reference's graph let go before the capture: while it lives, the parameters' gradient accumulators are
    # tied to the default stream, and the captured backward's dependence on that stream invalidates the capture
    # (cudaErrorStreamCaptureImplicit, session 20's GPU run of this test); training captures before any eager step
    ref = ref.detach()
    graphed = graphed_loss(model, ids, None, wavefront=True, wavefront_step=step)
    loss = graphed(ids, ids)
    loss.backward()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert graphed.capture_check["agrees"], graphed.capture_check  # graphed_loss's own check saw it too
    for p, b in zip(params, ref_grads):
        if b is not None:
            torch.testing.assert_close(p.grad, b, rtol=1e-4, atol=1e-5)


def test_hardware_queues_widened_before_cuda_starts_and_a_warning_after(monkeypatch):
    """widen_hardware_queues sets CUDA_DEVICE_MAX_CONNECTIONS=32 while CUDA has not started and the variable is unset;
    a value the user set stays (a bad one is named); after CUDA started it changes nothing and says so (None), and
    note_hardware_queues then warns once a process, as it does for a user's value below 32."""
    import titans.utils.tensors as tensors

    name = "CUDA_DEVICE_MAX_CONNECTIONS"
    monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert tensors.widen_hardware_queues() == 32 and tensors.os.environ[name] == "32"
    monkeypatch.setenv(name, "16")
    assert tensors.widen_hardware_queues() == 16 and tensors.os.environ[name] == "16"
    monkeypatch.setenv(name, "many")
    with pytest.raises(ValueError, match=name):
        tensors.widen_hardware_queues()
    monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert tensors.widen_hardware_queues() is None and name not in tensors.os.environ
    # torch.cuda.is_available() starts the driver without torch's own initialisation: too late as well
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(tensors, "cuda_driver_started", lambda: True)
    assert tensors.widen_hardware_queues() is None and name not in tensors.os.environ
    monkeypatch.setattr(tensors, "_queues_warned", False)
    with pytest.warns(RuntimeWarning, match=f"share 8 hardware work queues.*{name}={32}"):
        tensors.note_hardware_queues()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensors.note_hardware_queues()  # once a process
        monkeypatch.setattr(tensors, "_queues_warned", False)
        monkeypatch.setenv(name, "32")
        tensors.note_hardware_queues()  # enough queues: silent
    monkeypatch.setenv(name, "4")
    with pytest.warns(RuntimeWarning, match=f"share 4 hardware work queues \\({name}=4\\)"):
        tensors.note_hardware_queues()


def test_cuda_driver_started_asks_the_driver_library(monkeypatch):
    """cuda_driver_started reads cuDeviceGetCount's status from libcuda: CUDA_ERROR_NOT_INITIALIZED (3) before
    cuInit, success after (on an H100 in session 41: False, then True after torch.cuda.is_available()); no driver
    library, or another status, is unknown (None)."""
    import ctypes

    import titans.utils.tensors as tensors

    class Driver:
        def __init__(self, status):
            self.status = status

        def cuDeviceGetCount(self, count):  # noqa: N802 (the driver's name)
            return self.status

    for status, started in ((3, False), (0, True), (100, None)):
        monkeypatch.setattr(ctypes, "CDLL", lambda name, status=status: Driver(status))
        assert tensors.cuda_driver_started() is started

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert tensors.cuda_driver_started() is None


def test_wavefront_forward_hands_every_tensor_from_stream_to_stream_safely(monkeypatch, benchmark_module):
    """The wavefront's forward on the CPU with stand-in CUDA streams (benchmarks/stream_hazards.py): in every layout
    of graphed_wavefront_diff.py (each segment's own inputs and read-outs, batched inputs, batched read-outs with the
    PyTorch memory, the read-outs apart), no read of a tensor another stream wrote without a wait, no write over
    another stream's access, and no tensor freed while another stream's read of it may be pending.  Session 40: the
    fresh state, made on the caller's stream and read on the blocks', was freed mid-call without ``record_stream``:
    the layouts whose first memory write let go of it (the split core) computed another loss when captured.  And the
    batched read-outs apart put their outputs back along the sequence on the block's stream, a copy at batch > 1
    that read them unordered."""
    sh = benchmark_module("stream_hazards")
    # two wavefront calls (3 segments, then 1); on the CPU the memory is PyTorch's whatever the layout's backend or
    # walk switches, so the diff's other batched read-outs layouts are this one again
    layouts = ["each segment its own inputs and read-outs", "batched inputs", "batched read-outs", "read-outs apart",
               "batched inputs, read-outs apart", "batched read-outs apart"]
    rows = sh.main(["--tokens", "128", "--layouts", *layouts])["rows"]
    assert [r["layout"] for r in rows] == layouts
    # and the switches and variants the diff's layouts leave out
    more = [({"TITANS_WAVEFRONT_STREAM_VIEWS": "0", "TITANS_WAVEFRONT_READOUT_STREAMS": "1",
              "TITANS_WAVEFRONT_READOUT_URGENT": "1"}, {}), ({"TITANS_DEFER_PER_TOKEN": "1"}, {}),
            ({}, {"memory_layers": [0, 2]}), ({}, {"memory_depth": 1})]
    rows += [dict(sh.wavefront_hazards(env, options, tokens=128), layout=f"{env} {options}") for env, options in more]
    for row in rows:
        assert row["hazards"] == [], row["layout"]
        assert row["logits_sum"] is not None and math.isfinite(row["logits_sum"])
