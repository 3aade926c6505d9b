"""Autoregressive generation for :class:`TitansLM`.

Prefill runs the parallel path over the prompt; each new token then costs O(1) work and memory: the
neural memory is a fixed-size state and the attention KV caches are bounded by the window / segment.
``cuda_graphs=True`` decodes through :class:`titans.inference.static_decode.GraphedDecoder` (fixed-shape state,
one CUDA graph replayed per token) instead of ``model(ids, state)``; same tokens, less launch overhead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from titans.core.models.model import ModelState, TitansLM

if TYPE_CHECKING:
    from titans.inference.static_decode import StaticDecodeState


@dataclass
class SamplingConfig:
    """temperature 0 = greedy.  top_k / top_p (nucleus) filter before sampling.  repetition_penalty > 1
    divides positive (multiplies negative) logits of tokens already generated or in the prompt."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: expected >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: expected in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: expected > 0")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """logits (B, V); seen bool (B, V)."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_batch(model: TitansLM, input_ids) -> Tensor:
    device = model.embed.weight.device
    if isinstance(input_ids, Tensor):
        ids = input_ids.to(device)
    else:
        seq = list(input_ids)
        ids = torch.tensor([seq] if not seq or isinstance(seq[0], int) else seq, dtype=torch.long, device=device)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    return ids.long()


@torch.no_grad()
def iter_generate(
    model: TitansLM, input_ids, max_new_tokens: int = 64, *, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (),
    seed: int | None = None, state: ModelState | None = None, prefill_chunk: int | None = None,
    cuda_graphs: bool = False,
) -> Iterator[tuple[Tensor, ModelState | StaticDecodeState]]:
    """Yield ``(next_tokens (B,), state)`` one step at a time; stops after ``max_new_tokens`` or when
    every row has emitted a stop token.  The state returned with each token has *not* yet consumed it.
    ``prefill_chunk`` splits a long prompt into pieces (same result, bounded activation memory).

    ``cuda_graphs``: decode steps go through a :class:`GraphedDecoder` (on CUDA one captured graph replayed per
    token; on other devices the same static step runs eagerly).  The states yielded are then its one
    :class:`StaticDecodeState`, updated in place by later steps: ``.to_model_state()`` gives a normal state."""
    cfg = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
    cfg.validate()
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 0")
    ids = _as_batch(model, input_ids)
    if ids.shape[1] == 0 and state is None:
        raise ValueError("input_ids: empty prompt and no state to continue from")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=ids.device)
        gen.manual_seed(seed)
    B = ids.shape[0]
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=ids.device)
    seen.scatter_(1, ids, True)
    step = prefill_chunk or max(ids.shape[1], 1)
    logits = None
    for s in range(0, ids.shape[1], step):
        out = model(ids[:, s:s + step], state=state)
        state, logits = out.state, out.logits[:, -1]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    decoder = None
    if cuda_graphs and max_new_tokens > 1 and logits is not None:
        from titans.inference.static_decode import GraphedDecoder

        # decode steps consume max_new_tokens - 1 tokens: the ring of full causal attention must hold them all
        decoder = GraphedDecoder(model, state, max_len=state.position + max_new_tokens)
        state = decoder.state
    for i in range(max_new_tokens):
        if logits is None:
            raise ValueError("cannot generate: no logits (empty prompt)")
        nxt = sample_next(apply_repetition_penalty(logits.float(), seen, repetition_penalty), cfg, gen)
        yield nxt, state
        if i == max_new_tokens - 1:
            return  # the last token is not consumed (the state yielded with it must stay as it was)
        seen[torch.arange(B, device=ids.device), nxt] = True
        if stop.numel():
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                return
        if decoder is not None:
            logits = decoder.step(nxt.unsqueeze(1))
        else:
            out = model(nxt.unsqueeze(1), state=state)
            state, logits = out.state, out.logits[:, -1]


@dataclass
class GenerateOutput:
    tokens: list[list[int]]  # new tokens per row, up to and excluding the first stop token
    state: ModelState | None  # state after consuming the prompt and the kept tokens


@torch.no_grad()
def generate(
    model: TitansLM, input_ids, max_new_tokens: int = 64, *, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, repetition_penalty: float = 1.0, stop_tokens: Sequence[int] = (),
    seed: int | None = None, state: ModelState | None = None, stream: Callable[[int, int], None] | None = None,
    prefill_chunk: int | None = None, cuda_graphs: bool = False,
) -> GenerateOutput:
    """Generate up to ``max_new_tokens`` per row.  ``stream(row, token)`` is called for every kept token
    as soon as it is sampled.  Returns the tokens and the final state (which has consumed every kept
    token, so a chat can continue from it).  ``cuda_graphs``: decode through one captured CUDA graph (see
    :func:`iter_generate`); the state returned is a normal :class:`ModelState` all the same."""
    ids = _as_batch(model, input_ids)
    B = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    stops = set(int(t) for t in stop_tokens)
    last_state = state
    pending = None
    for nxt, st in iter_generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 repetition_penalty=repetition_penalty, stop_tokens=stop_tokens, seed=seed,
                                 state=state, prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs):
        last_state, pending = st, nxt
        for r, t in enumerate(nxt.tolist()):
            if finished[r]:
                continue
            if t in stops:
                finished[r] = True
                continue
            out[r].append(t)
            if stream is not None:
                stream(r, t)
    if last_state is not None and not isinstance(last_state, ModelState):
        last_state = last_state.to_model_state()  # a static decode state: back to the normal path
    if pending is not None and not all(finished):
        # fold the last sampled token into the state so the caller can continue the stream
        last_state = model(pending.unsqueeze(1), state=last_state).state
    return GenerateOutput(out, last_state)
