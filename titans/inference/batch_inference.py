"""Batched, resumable generation over a JSONL file of prompts (``titans batch-infer``).

Input lines: ``{"id": ..., "prompt": "...", "max_new_tokens": N (optional)}``.  Output lines:
``{"id": ..., "prompt": ..., "completion": ...}``, appended and flushed (fsync) after every batch, so
an interrupted run resumes by skipping ids already in the output.  A bad input line (invalid JSON, no
prompt, duplicate id) is reported and skipped; it does not stop the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from titans.inference.predictor import Predictor


def read_done_ids(output: Path) -> set[str]:
    done: set[str] = set()
    if output.is_file():
        for line in output.read_text().splitlines():
            try:
                done.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a torn last line from a killed run: that id is simply redone
    return done


def run_batch_inference(predictor: Predictor, input_path: str | Path, output_path: str | Path,
                        batch_size: int = 8, max_new_tokens: int = 100, progress: bool = True,
                        **sampling) -> dict:
    """Generate completions for every new prompt; returns counts (done, skipped, bad)."""
    from tqdm.auto import tqdm

    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: no such input file")
    done = read_done_ids(output_path)
    todo, bad, seen = [], [], set()
    for n, line in enumerate(input_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
                raise ValueError("needs a non-empty string 'prompt'")
            rid = str(rec.get("id", n))
            if rid in seen:
                raise ValueError(f"duplicate id {rid!r}")
            seen.add(rid)
        except (json.JSONDecodeError, ValueError) as e:
            bad.append(n)
            print(f"warning: {input_path}:{n}: skipped ({e})", file=sys.stderr)
            continue
        if rid not in done:
            todo.append((rid, rec))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(todo), unit="prompt", disable=not progress, dynamic_ncols=True)
    with output_path.open("a") as f:
        for b in range(0, len(todo), batch_size):
            group = todo[b:b + batch_size]
            by_len: dict[int, list[tuple[str, dict]]] = {}
            for rid, rec in group:
                by_len.setdefault(int(rec.get("max_new_tokens", max_new_tokens)), []).append((rid, rec))
            for n_new, items in by_len.items():
                outs = predictor.generate([r["prompt"] for _, r in items], n_new, **sampling)
                for (rid, rec), text in zip(items, outs):
                    # the id as the input gave it (a number stays a number); compared as text for resuming
                    f.write(json.dumps({"id": rec.get("id", rid), "prompt": rec["prompt"], "completion": text}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(group))
    bar.close()
    return {"generated": len(todo), "already_done": len(done & seen), "bad_lines": bad}
