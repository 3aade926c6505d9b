"""How far the wavefront's float32 loss lies from the one-pass forward's on a GPU, and whether Triton's TF32 dots are
why (session 37: with the batched read-outs the graphed wavefront test's loss differed by 4e-5 relative).

The model and data of ``tests/test_wavefront.py``'s CUDA tests (MAC, dim 64, window 32, 2 x 256 tokens, float32, the
memory's Triton kernels).  Rows: the one pass; the wavefront eagerly, one segment a call (per-segment inputs and
read-outs) and three a call (the batched ones).  Run it twice, as is and with ``TRITON_F32_DEFAULT=ieee`` (Triton's
float32 dots in full precision instead of TF32): if the differences shrink to float32 rounding there, the kernels'
TF32 products, not the wavefront, make them.

    python benchmarks/wavefront_float32.py --out results/wavefront_float32.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from titans.core.models import build_model
from titans.training.wavefront import wavefront_loss
from titans.utils.io import atomic_write_text


def tests_model_and_ids(device, **options) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and tokens of ``tests/test_wavefront.py``'s CUDA tests, float32 on ``device``: MAC, dim 64, depth 3,
    window 32, memory (depth 2, chunk 8) in block 1 (``options`` override the config), 2 x 256 tokens."""
    torch.manual_seed(0)
    cfg = dict(variant="mac", vocab_size=64, dim=64, depth=3, heads=2, window=32, persistent_tokens=2, memory_depth=2,
               memory_chunk_size=8, memory_layers=[1])
    model = build_model({**cfg, **options}).float().to(device)
    return model, torch.randint(0, 64, (2, 256), generator=torch.Generator().manual_seed(1)).to(device)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (on the CPU: the PyTorch memory, no Triton)
    model, ids = tests_model_and_ids(dev)
    with torch.no_grad():
        one_pass = model(ids, labels=ids, use_cache=False).loss.item()
        rows = [{"row": "one pass", "loss": one_pass, "relative": 0.0}]
        for name, step, batched in (("wavefront, a segment a call", None, False),
                                    ("wavefront, 3 segments a call, per-segment inputs and read-outs", 96, False),
                                    ("wavefront, 3 segments a call, batched inputs and read-outs", 96, True)):
            loss = wavefront_loss(model, ids, segment=step, batched_readouts=batched, batched_queries=batched).item()
            rows.append({"row": name, "loss": loss, "relative": abs(loss - one_pass) / abs(one_pass)})
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    result = {"TRITON_F32_DEFAULT": os.environ.get("TRITON_F32_DEFAULT"), "device": device, "rows": rows}
    print(f"TRITON_F32_DEFAULT={result['TRITON_F32_DEFAULT']}\n| row | loss | relative to the one pass |\n"
          "| --- | --- | --- |")
    for r in rows:
        print(f"| {r['row']} | {r['loss']:.9f} | {r['relative']:.2e} |")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
