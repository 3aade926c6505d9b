"""Train each variant on the LM + long-context task mixture at equal tokens, then measure S-NIAH and
BABILong-style accuracy far beyond the training length with the streaming path.  Writes JSON, a
markdown table and heat maps per variant (issue 6).

    python benchmarks/long_context.py --variants mac swa --steps 300 --source /usr/share/dictd/gcide.dict.dz \\
        --lengths 2048 4096 8192 16384 --out results/long_context
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from titans.data.preprocessing import load_tokenizer
from titans.data.tasks import Haystack
from titans.inference.long_context import evaluate_tasks, markdown_table, write_report
from titans.training.trainer import train
from titans.utils.checkpoint import load_model
from titans.utils.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["mac", "mag", "mal", "lmm", "swa"])
    ap.add_argument("--source", default="/usr/share/dictd/gcide.dict.dz")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--tasks", nargs="+", default=["niah"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/long_context")
    args = ap.parse_args()
    out = Path(args.out)
    summary = {"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d"), "variants": {}}
    for v in args.variants:
        cfg = load_config("long_context", [f"model.variant={v}", f"data.source={args.source}",
                                           f"training.max_steps={args.steps}", f"training.eval_every={args.steps}",
                                           f"training.ckpt_every={args.steps}", f"training.out_dir={out}/run_{v}",
                                           "logging.progress=false", "logging.tensorboard=false", *args.overrides])
        t0 = time.perf_counter()
        s = train(cfg)
        train_s = time.perf_counter() - t0
        model, cfg = load_model(out / f"run_{v}", "cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(cfg.data.tokenizer)
        hay = Haystack(args.source, tok, split="val")
        amp = torch.bfloat16 if torch.cuda.is_available() else None
        res = evaluate_tasks(model, tok, args.tasks, args.lengths, args.depths, args.samples, hay, piece=2048,
                             amp_dtype=amp, progress=False)
        res.update(variant=v, params=model.num_parameters(), train_tokens=s["tokens_seen"], train_seconds=train_s,
                   val_bpb=s.get("val_bpb"))
        write_report(res, out / f"eval_{v}")
        print(f"## {v}: params {res['params']:,}, {s['tokens_seen']:,} training tokens in {train_s:.0f} s, "
              f"val bpb {s.get('val_bpb', float('nan')):.3f}\n{markdown_table(res)}\n", flush=True)
        summary["variants"][v] = {k: res[k] for k in ("params", "train_tokens", "train_seconds", "val_bpb", "cells")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
