"""Where a model's uuid recall fails: teacher-forced accuracy by answer position, and what the misses are (issue 6).

For S-NIAH uuid examples the true answer prefix is fed in (``forced_from``), so each position shows what the memory
recalls there without compounding errors.  Each miss is classified: a character of the same uuid from another
position (the memory holds the content but the key picks the wrong place), another hex character, or not hex.
Writes JSON and a bar plot (PNG); prints the table.

    python benchmarks/uuid_positions.py --checkpoint runs/niah --length 2048 --samples 24 --out results/uuid_pos
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from titans.data.preprocessing import load_tokenizer
from titans.data.tasks import Haystack, make_example
from titans.inference.long_context import forced_from, stream_context
from titans.utils.checkpoint import load_model
from titans.utils.io import atomic_write_text

# xxxxxxxx-xxxx-4xxx-Vxxx-xxxxxxxxxxxx: the five groups as answer positions
GROUPS = ((0, 8), (9, 13), (14, 18), (19, 23), (24, 36))


@torch.no_grad()
def measure(model, tokenizer, haystack: Haystack, length: int, samples: int, seed: int, piece: int) -> dict:
    right, total, misses = Counter(), Counter(), Counter()
    for i in range(samples):
        ex = make_example("niah_uuid", length, seed + i, tokenizer, haystack, depth=0.2 + 0.6 * (i % 4) / 3)
        state, last = stream_context(model, torch.tensor([ex.input_ids]), piece=piece)
        pred = forced_from(model, state, last, torch.tensor([ex.answer_ids]))[0].tolist()
        for p, (a, b) in enumerate(zip(ex.answer_ids, pred)):
            total[p] += 1
            right[p] += a == b
            if a != b:
                kind = ("same uuid, other position" if b in ex.answer_ids else
                        "other hex character" if chr(b) in "0123456789abcdef" else "not hex")
                misses[kind] += 1
    positions = sorted(total)
    return {"length": length, "samples": samples, "seed": seed,
            "by_position": [right[p] / total[p] for p in positions],
            "by_group": [{"positions": [a, b], "accuracy": sum(right[p] for p in range(a, b)) /
                          sum(total[p] for p in range(a, b)), "first": right[a] / total[a]} for a, b in GROUPS],
            "misses": dict(misses)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [100 * a for a in result["by_position"]]
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.bar(range(len(acc)), acc, color=["#888" if p in (8, 13, 18, 23) else "#3a6" for p in range(len(acc))])
    ax.set_xticks(range(len(acc)))
    ax.set_xticklabels(list("xxxxxxxx-xxxx-4xxx-Vxxx-xxxxxxxxxxxx"[:len(acc)]), fontsize=8)
    ax.set_ylabel("right given the true prefix (%)")
    ax.set_ylim(0, 100)
    m = result["misses"]
    ax.set_title(f"{result['label']}: uuid at {result['length']} tokens, {result['samples']} examples; misses: "
                 + ", ".join(f"{k} {v}" for k, v in m.items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--piece", type=int, default=4096)
    ap.add_argument("--source", default="/usr/share/dictd/gcide.dict.dz", help="haystack text")
    ap.add_argument("--out", required=True, help="output folder (JSON + PNG)")
    ap.add_argument("--label", default=None, help="name of the model in the plot's title (default: the checkpoint)")
    args = ap.parse_args()
    model, cfg = load_model(args.checkpoint)
    model.eval()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    haystack = Haystack(args.source, tokenizer, split="val")
    result = {"checkpoint": str(args.checkpoint), "label": args.label or str(args.checkpoint),
              **measure(model, tokenizer, haystack, args.length, args.samples, args.seed, args.piece)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "uuid_positions.json", json.dumps(result, indent=1))
    plot(result, out / "uuid_positions.png")
    print("position:", " ".join(f"{p:>3d}" for p in range(len(result["by_position"]))))
    print("% right: ", " ".join(f"{round(100 * a):>3d}" for a in result["by_position"]))
    for g in result["by_group"]:
        print(f"group {g['positions'][0]}-{g['positions'][1]}: {100 * g['accuracy']:.0f}% "
              f"(its first character {100 * g['first']:.0f}%)")
    print("misses:", result["misses"])


if __name__ == "__main__":
    main()
