"""Loading a model for inference, batched generation, and memory tracing (``analyze-memory``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from titans.core.models.generation import generate as generate_tokens
from titans.core.models.model import ModelState, TitansLM
from titans.data.preprocessing import Tokenizer, load_tokenizer
from titans.inference.memory_management import MemorySession, autocast_or_off
from titans.utils.config import TitansConfig


@dataclass
class Predictor:
    """A model, its tokenizer and config, on a device, ready for inference."""

    model: TitansLM
    tokenizer: Tokenizer
    config: TitansConfig
    amp_dtype: torch.dtype | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None) -> Predictor:
        """Load a run folder, checkpoint or export (see :func:`titans.utils.checkpoint.load_model`)."""
        from titans.utils.checkpoint import load_model

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, cfg = load_model(path, device)
        return cls(model, load_tokenizer(cfg.data.tokenizer), cfg,
                   torch.bfloat16 if device.type == "cuda" else None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def session(self, session_id: str = "default") -> MemorySession:
        return MemorySession(self.model, self.tokenizer, session_id, self.amp_dtype)

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 100, **sampling) -> list[str]:
        """Continue each prompt.  Prompts of the same token length run as one batch (the model has no
        padding: a pad token would be written into the memory), others one group per length."""
        encoded = [self.tokenizer.encode(p) for p in prompts]
        out: list[str | None] = [None] * len(prompts)
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i}: empty")
            groups.setdefault(len(ids), []).append(i)
        ctx = autocast_or_off(self.device, self.amp_dtype)
        for idx in groups.values():
            ids = torch.tensor([encoded[i] for i in idx], dtype=torch.long, device=self.device)
            with ctx:
                res = generate_tokens(self.model, ids, max_new_tokens, **sampling)
            for i, toks in zip(idx, res.tokens):
                out[i] = self.tokenizer.decode(toks)
        return out  # type: ignore[return-value]


def retention_half_life(alpha: torch.Tensor) -> torch.Tensor:
    """Tokens after which the forgetting gate has halved a stored association, per row of ``alpha`` (..., T):
    every update multiplies the weights by (1 - alpha_t) (Eq. 13), so with the mean log decay over the
    text the half-life is ln 2 / -mean_t log(1 - alpha_t) (inf where alpha is 0).  The reach of recall:
    a needle further back than a few half-lives is gone (benchmarks/RESULTS.md 4f)."""
    log_keep = torch.log1p(-alpha.double().clamp(max=1.0)).mean(-1)
    return (math.log(2) / -log_keep).float()


@torch.no_grad()
def trace_memory(model: TitansLM, ids: torch.Tensor, state: ModelState | None = None) -> list[dict]:
    """Run ``ids`` (1, T) through the model and record, for every memory layer, per head and token:
    the momentary surprise (gradient norm of the inner loss, Eq. 12-13), the inner loss before and after
    the update, theta / eta / alpha, and the memory weights' Frobenius norms after the pass; per head the
    forgetting half-life in tokens over this text (:func:`retention_half_life`).

    Returns one dict per memory layer with tensors of shape (H, T') (T' = tokens the memory read: T for
    MAG / MAL / LMM plus persistent tokens on a fresh state; the attention outputs for MAC)."""
    records: dict[int, dict[str, list[torch.Tensor]]] = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        mem = block.memory
        if mem is None:
            continue

        def pre(mod, args, i=i):
            x, st = args[0], args[1]
            d = mod.surprise(x, st)
            r = records.setdefault(i, {k: [] for k in ("grad_norm", "loss_before", "loss_after", "theta", "eta",
                                                       "alpha")})
            r["grad_norm"].append(d["grad_norm"][0])
            r["loss_before"].append(d["inner_loss"][0])
            for g in ("theta", "eta", "alpha"):
                r[g].append(d[g][0])

        def post(mod, args, out, i=i):
            d = mod.surprise(args[0], out[1])
            records[i]["loss_after"].append(d["inner_loss"][0])
            records[i]["final_state"] = out[1]

        hooks.append(mem.register_forward_pre_hook(pre))
        hooks.append(mem.register_forward_hook(post))
    try:
        model(ids, state=state)
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for i, r in sorted(records.items()):
        st = r.pop("final_state")
        row = {"layer": i, **{k: torch.cat(v, dim=-1).float().cpu() for k, v in r.items()}}
        row["weight_norms"] = [w[0].float().norm(dim=(-2, -1)).cpu() for w in st.weights]
        row["half_life"] = retention_half_life(row["alpha"])
        layers.append(row)
    return layers
