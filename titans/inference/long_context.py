"""Long-context evaluation: S-NIAH and BABILong-style accuracy over a grid of lengths and depths.

Every example is read with the streaming path — the context goes through the model in pieces of
``piece`` tokens with the state carried (so memory use does not grow with the context for the Titans
variants and the SWA baseline) — then the answer is decoded greedily and scored by exact match.
Results: a dict (written as JSON), one heat map per task (context length x needle depth) as PNG, and a
markdown table.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import torch

from titans.data.preprocessing import Tokenizer
from titans.data.tasks import Haystack, expand_tasks, make_example
from titans.inference.memory_management import autocast_or_off


@torch.no_grad()
def stream_context(model, input_ids: torch.Tensor, piece: int = 4096, amp_dtype: torch.dtype | None = None):
    """Stream ``input_ids`` (B, T) through the model in pieces of ``piece`` tokens, carrying the state.

    Returns ``(state, last_logits (B, vocab))``.  Only the state crosses pieces, so peak memory is that of one
    piece plus the model state; the state is not modified by later calls (they return new ones), so one read
    of the context serves both :func:`greedy_from` and :func:`forced_from`."""
    state = out = None
    with autocast_or_off(input_ids.device, amp_dtype):
        for s in range(0, input_ids.shape[1], piece):
            out = model(input_ids[:, s:s + piece], state=state)
            state = out.state
    if out is None:
        raise ValueError("input_ids: empty context")
    return state, out.logits[:, -1]


@torch.no_grad()
def greedy_from(model, state, last: torch.Tensor, max_new: int, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode ``max_new`` tokens greedily from a streamed state: (B, max_new) token ids."""
    toks = []
    with autocast_or_off(last.device, amp_dtype):
        for _ in range(max_new):
            nxt = last.float().argmax(-1, keepdim=True)
            toks.append(nxt)
            out = model(nxt, state=state)
            state, last = out.state, out.logits[:, -1]
    return torch.cat(toks, dim=1)


@torch.no_grad()
def forced_from(model, state, last: torch.Tensor, answer_ids: torch.Tensor,
                amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Teacher-forced predictions: the model's argmax at each answer position given the *true* answer prefix
    (one forward over ``answer_ids[:, :-1]`` from the streamed state).  answer_ids (B, A) -> (B, A).  Separates
    what the memory recalls per token from errors that compound in greedy decoding."""
    preds = [last.float().argmax(-1)]
    if answer_ids.shape[1] > 1:
        with autocast_or_off(last.device, amp_dtype):
            logits = model(answer_ids[:, :-1], state=state).logits
        preds += list(logits.float().argmax(-1).unbind(1))
    return torch.stack(preds, dim=1)


def answer_greedy(model, input_ids: torch.Tensor, max_new: int, piece: int = 4096,
                  amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stream ``input_ids`` (B, T) through the model in pieces, then decode ``max_new`` tokens greedily.

    Returns (B, max_new) token ids."""
    state, last = stream_context(model, input_ids, piece, amp_dtype)
    return greedy_from(model, state, last, max_new, amp_dtype)


def evaluate_tasks(model, tokenizer: Tokenizer, tasks: list[str], lengths: list[int], depths: list[float],
                   samples: int, haystack: Haystack | None, seed: int = 0, piece: int = 4096, batch_size: int = 4,
                   amp_dtype: torch.dtype | None = None, progress: bool = True) -> dict:
    """Exact-match accuracy per (task, length, depth) cell.  BABILong cells have no depth (facts are
    scattered over the whole haystack): they use ``depth = None``."""
    from tqdm.auto import tqdm

    tasks = expand_tasks(tasks)
    dev = next(model.parameters()).device
    cells = []
    for task in tasks:
        for L in lengths:
            for depth in (depths if task.startswith("niah_") else [None]):
                cells.append((task, L, depth))
    total_tokens = sum(L * samples for _, L, _ in cells)
    bar = tqdm(total=total_tokens, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    rows = []
    t0 = time.perf_counter()
    for task, L, depth in cells:
        exs = [make_example(task, L, seed * 100_003 + i, tokenizer, haystack, depth=depth if depth is not None else 0.5)
               for i in range(samples)]
        correct = first = tokens_right = forced_right = tokens_total = reordered = 0
        preds = []
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for b in range(0, samples, batch_size):
            group = exs[b:b + batch_size]
            ids = torch.tensor([e.input_ids for e in group], dtype=torch.long, device=dev)
            max_new = max(len(e.answer_ids) for e in group)
            state, last = stream_context(model, ids, piece, amp_dtype)
            out = greedy_from(model, state, last, max_new, amp_dtype).tolist()
            # answers of one batch may differ in length: pad (causal, so padding never changes earlier positions)
            truth = torch.tensor([e.answer_ids + [e.answer_ids[-1]] * (max_new - len(e.answer_ids)) for e in group],
                                 dtype=torch.long, device=dev)
            forced = forced_from(model, state, last, truth, amp_dtype).tolist()
            for e, o, f in zip(group, out, forced):
                sc = score_answer(o, e.answer_ids)
                correct += sc["exact"]
                first += sc["first"]
                tokens_right += sc["tokens_right"]
                forced_right += sum(a == b for a, b in zip(f, e.answer_ids))
                tokens_total += len(e.answer_ids)
                reordered += sc["reordered"]
                preds.append({"answer": e.answer, "prediction": tokenizer.decode(o[:len(e.answer_ids)]),
                              "correct": bool(sc["exact"])})
            bar.update(L * len(group))
            bar.set_postfix(task=task, length=L, acc=f"{correct / max(len(preds), 1):.2f}", refresh=False)
        # what always giving the cell's most common answer would score: a model stuck on "yes" or "none"
        # is not reasoning, however high its exact match (BABILong answers come from a few words)
        majority = max(Counter(e.answer for e in exs).values()) / samples
        rows.append({"task": task, "length": L, "depth": depth, "samples": samples, "accuracy": correct / samples,
                     "first_token_accuracy": first / samples, "token_accuracy": tokens_right / tokens_total,
                     "forced_token_accuracy": forced_right / tokens_total,
                     "reordered": reordered / samples, "majority_baseline": majority,
                     "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
                     "examples": preds[:4]})
    bar.close()
    return {"tasks": tasks, "lengths": lengths, "depths": depths, "samples": samples, "seed": seed,
            "seconds": time.perf_counter() - t0, "cells": rows}


def score_answer(prediction: list[int], answer: list[int]) -> dict:
    """Score one greedy answer against the target token ids.

    exact: all answer tokens right; first: the first one right; tokens_right: positions right (partial credit
    shows learning long before exact match does: a 5-digit key is all or nothing); reordered: wrong, but the
    same tokens in another order (the memory kept the content and lost the order: how most wrong passkeys of
    some MAG runs failed, benchmarks/RESULTS.md 4i).
    """
    if not answer:
        raise ValueError("answer: expected at least one token")
    pred = list(prediction[:len(answer)])
    exact = pred == list(answer)
    return {"exact": exact, "first": bool(pred) and pred[0] == answer[0],
            "tokens_right": sum(a == b for a, b in zip(pred, answer)),
            "reordered": not exact and sorted(pred) == sorted(answer)}


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95% for z = 1.96): the uncertainty a handful of samples
    per cell leaves (0 of 12 is still compatible with 24%)."""
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"k={k}, n={n}: expected 0 <= k <= n and n > 0")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def markdown_table(result: dict, metric: str = "accuracy") -> str:
    """Rows: task (and depth); columns: context lengths; cells: ``metric`` of each cell in percent
    ("accuracy" = exact match, "first_token_accuracy", "token_accuracy" = share of answer tokens right,
    "forced_token_accuracy" = the same with the true answer prefix fed in).
    Exact match adds, for tasks with several depths, a row over all depths with its 95% Wilson interval."""
    lengths = result["lengths"]
    head = "| task | depth | " + " | ".join(f"{L:,}" for L in lengths) + " |"
    lines = [head, "| --- | --- | " + " | ".join("---" for _ in lengths) + " |"]
    keys = []
    for c in result["cells"]:
        k = (c["task"], c["depth"])
        if k not in keys:
            keys.append(k)
    for task, depth in keys:
        acc = {c["length"]: c[metric] for c in result["cells"] if c["task"] == task and c["depth"] == depth}
        vals = " | ".join(f"{100 * acc[L]:.0f}" if L in acc else "-" for L in lengths)
        lines.append(f"| {task} | {'all' if depth is None else depth} | {vals} |")
    if metric == "accuracy":
        for task in dict.fromkeys(t for t, d in keys if d is not None):
            vals = []
            for L in lengths:
                cs = [c for c in result["cells"] if c["task"] == task and c["length"] == L]
                n = sum(c["samples"] for c in cs)
                k = round(sum(c["accuracy"] * c["samples"] for c in cs))
                lo, hi = wilson_interval(k, n) if n else (math.nan, math.nan)
                vals.append(f"{100 * k / n:.0f} ({100 * lo:.0f}-{100 * hi:.0f})" if n else "-")
            lines.append(f"| {task} | all (95% CI) | {' | '.join(vals)} |")
    return "\n".join(lines)


def report_tables(result: dict) -> str:
    """Exact match, first answer token and share of answer tokens right, one titled table each."""
    metrics = [("accuracy", "exact match"), ("first_token_accuracy", "first answer token right"),
               ("token_accuracy", "answer tokens right")]
    if all("forced_token_accuracy" in c for c in result["cells"]):  # older results lack it
        metrics.append(("forced_token_accuracy", "answer tokens right given the true answer prefix"))
    if all("reordered" in c for c in result["cells"]):  # results written before it was counted lack it
        metrics.append(("reordered", "wrong answers made of the right tokens in another order"))
    if all("majority_baseline" in c for c in result["cells"]):
        metrics.append(("majority_baseline", "baseline: every example answered with the cell's most common answer"))
    return "\n\n".join(f"{title} (%):\n\n{markdown_table(result, metric)}" for metric, title in metrics)


def plot_heatmaps(result: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per task: accuracy by context length (x) and needle depth (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    lengths = result["lengths"]
    for task in result["tasks"]:
        cells = [c for c in result["cells"] if c["task"] == task]
        depths = sorted({c["depth"] for c in cells}, key=lambda d: -1 if d is None else d)
        grid = [[math.nan] * len(lengths) for _ in depths]
        for c in cells:
            grid[depths.index(c["depth"])][lengths.index(c["length"])] = 100 * c["accuracy"]
        fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2, 0.5 * len(depths) + 1.8))
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [_short(L) for L in lengths])
        ax.set_yticks(range(len(depths)), ["all" if d is None else f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{task}: exact match (%)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = out_dir / f"{task}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def _short(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def write_report(result: dict, out_dir: str | Path) -> dict:
    """JSON + heat maps + markdown table under ``out_dir``; returns their paths."""
    from titans.utils.io import atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out_dir / "results.md", report_tables(result) + "\n")
    pngs = plot_heatmaps(result, out_dir)
    return {"json": str(out_dir / "results.json"), "table": str(out_dir / "results.md"),
            "plots": [str(p) for p in pngs]}
