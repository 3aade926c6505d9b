"""Train every variant and both baselines at equal tokens on one corpus; write JSON + a markdown table.

    python benchmarks/train_variants.py --source /usr/share/dictd/gcide.dict.dz --steps 300 --out results/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from titans.training.trainer import train
from titans.utils.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", default="/usr/share/dictd/gcide.dict.dz")
    ap.add_argument("--variants", nargs="+", default=["mac", "mag", "mal", "lmm", "transformer", "swa"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in args.variants:
        over = [f"model.variant={v}", f"data.source={args.source}", f"training.max_steps={args.steps}",
                f"training.eval_every={args.steps}", f"training.ckpt_every={args.steps}",
                f"training.out_dir={out}/run_{v}", "logging.progress=false", "logging.tensorboard=false",
                *args.overrides]
        cfg = load_config("small", over)
        t0 = time.perf_counter()
        s = train(cfg)
        dt = time.perf_counter() - t0
        params = sum(p.numel() for p in __import__("titans.core.models", fromlist=["build_model"])
                     .build_model(cfg.model).parameters())
        row = {"variant": v, "params": params, "steps": s["step"], "tokens": s["tokens_seen"],
               "val_loss": s.get("val_loss"), "val_bpb": s.get("val_bpb"), "seconds": dt,
               "train_tokens_per_s": s["tokens_seen"] / dt}
        print(json.dumps(row), flush=True)
        rows.append(row)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (out / "train_variants.json").write_text(json.dumps({"device": dev, "args": vars(args), "rows": rows}, indent=2))
    lines = ["| variant | params | tokens | val bpb | val loss | tokens/s (incl. eval) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['tokens']:,} | {r['val_bpb']:.4f} | {r['val_loss']:.4f} "
                     f"| {r['train_tokens_per_s']:,.0f} |")
    (out / "train_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
