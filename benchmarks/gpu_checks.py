"""GPU correctness checks: attention backends vs the reference on every mask kind, and every model
variant's logits with the automatic (flex / SDPA) backend vs the reference backend.  Writes JSON."""

from __future__ import annotations

import json
import sys

import torch

from titans.core.attention import CausalSelfAttention, MaskSpec
from titans.core.models import build_model


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(out_path: str) -> None:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    res = {"attention": [], "models": []}
    specs = [MaskSpec("causal"), MaskSpec("causal", prefix_len=4), MaskSpec("sliding", 64),
             MaskSpec("sliding", 64, prefix_len=4), MaskSpec("segment", 64, prefix_len=4),
             MaskSpec("segment", 64, prefix_len=4, memory_tokens=True)]
    for spec in specs:
        for backend in ("sdpa", "flex") if spec.kind != "segment" else ("sdpa",):
            attn = CausalSelfAttention(128, 4, kv_heads=2, backend=backend).to(dev)
            ref = CausalSelfAttention(128, 4, kv_heads=2, backend="reference").to(dev)
            ref.load_state_dict(attn.state_dict())
            x = torch.randn(2, 300, 128, device=dev)
            pre = torch.randn(4, 128, device=dev) if spec.prefix_len else None
            mem = torch.randn(2, 300, 128, device=dev) if spec.memory_tokens else None
            a, _ = attn(x, mask=spec, prefix=pre, memory=mem)
            b, _ = ref(x, mask=spec, prefix=pre, memory=mem)
            res["attention"].append({"spec": repr(spec), "backend": backend, "rel_err": rel(a, b)})
    for variant in ["mac", "mag", "mal", "lmm", "transformer", "swa"]:
        cfg = dict(variant=variant, dim=128, depth=2, heads=4, window=64, memory_chunk_size=16)
        m = build_model(cfg).to(dev)
        r = build_model({**cfg, "attention_backend": "reference", "memory_backend": "chunked"}).to(dev)
        r.load_state_dict(m.state_dict())
        ids = torch.randint(0, 256, (2, 512), device=dev)
        a = m(ids).logits
        b = r(ids).logits
        m(ids, labels=ids, use_cache=False).loss.backward()
        res["models"].append({"variant": variant, "rel_err_vs_reference": rel(a, b)})
    for row in res["attention"] + res["models"]:
        print(row)
    json.dump(res, open(out_path, "w"), indent=2)
    bad = [r for r in res["attention"] + res["models"] if not (r.get("rel_err", r.get("rel_err_vs_reference")) < 1e-3)]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_checks.json")
