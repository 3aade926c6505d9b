"""The ``titans`` command line: train, evaluate, prepare-data, generate.

User mistakes (missing file, bad config key, checkpoint from another architecture) print one line to
stderr and exit with code 2; no traceback.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from titans.utils.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Titans: neural long-term memory that learns at test time.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _user_errors():
    from titans.utils.checkpoint import CheckpointError

    return (ConfigError, CheckpointError, FileNotFoundError, ValueError)


@app.command(epilog="Examples:\n\n  titans train --config small\n\n"
             "  titans train --config base --set training.lr=3e-4 --set data.source=/usr/share/dictd/gcide.dict.dz")
def train(config: str = typer.Option("small", help="builtin name (default, small, base, large, experiment) or YAML"),
          set_: list[str] = typer.Option([], "--set", help="override, e.g. training.lr=3e-4 (repeatable)"),
          out: Optional[str] = typer.Option(None, help="run folder (training.out_dir)"),
          resume: bool = typer.Option(False, help="continue from the run folder's latest checkpoint")) -> None:
    """Train a model (default: the small MAC on the Python standard library's own source)."""
    from titans.training.trainer import train as run_train
    from titans.utils.config import load_config

    try:
        overrides = list(set_) + ([f"training.out_dir={out}"] if out else [])
        cfg = load_config(config, overrides)
        summary = run_train(cfg, resume=resume)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(f"done: step {summary['step']}, val_loss {summary.get('val_loss', float('nan')):.4f}, "
               f"val_bpb {summary.get('val_bpb', float('nan')):.4f}")
    typer.echo(f"checkpoints: {summary['checkpoint']}\nmetrics: {summary['metrics']}\n"
               f"tensorboard: {summary['tensorboard']}")


@app.command(epilog="Examples:\n\n  titans evaluate --checkpoint runs/small --batches 20\n\n"
             "  titans evaluate --checkpoint runs/niah --task niah --lengths 2048 16384 65536 "
             "--depths 0 0.5 1 --samples 20 --output results/niah\n\n"
             "  titans evaluate --checkpoint runs/niah --task babilong --lengths 4096 16384 --output results/babilong")
def evaluate(checkpoint: str = typer.Option(..., help="run folder, checkpoint folder or export"),
             data: Optional[str] = typer.Option(None, help="data source (default: the run's own validation data); "
                                                "with --task: the haystack text"),
             batches: int = typer.Option(20, help="validation batches"),
             seq_len: Optional[int] = typer.Option(None, help="evaluation length (default: training length)"),
             buckets: int = typer.Option(8, help="position buckets for loss-by-position"),
             task: list[str] = typer.Option([], help="niah | babilong | a task name (niah_uuid, babilong_qa2, "
                                            "...); repeatable.  Runs the long-context grid instead"),
             lengths: list[int] = typer.Option([1024, 2048, 4096, 8192, 16384], help="context lengths (tokens)"),
             depths: list[float] = typer.Option([0.0, 0.25, 0.5, 0.75, 1.0], help="needle depths in [0, 1]"),
             samples: int = typer.Option(10, help="examples per cell"),
             piece: int = typer.Option(4096, help="streaming piece length (tokens per forward)"),
             seed: int = typer.Option(0),
             output: Optional[str] = typer.Option(None, help="write JSON results here (with --task: a folder for "
                                                  "JSON, table and heat-map PNGs)")) -> None:
    """Loss, perplexity, bits per byte, and loss by position bucket; or, with --task, long-context accuracy."""
    import torch

    from titans.data.dataloader import build_data, eval_batches
    from titans.utils.checkpoint import load_model

    if task:
        _evaluate_tasks(checkpoint, data, task, lengths, depths, samples, piece, seed, output)
        return
    try:
        model, cfg = load_model(checkpoint)
        if data:
            cfg.data.source = data
        train_ds, val_ds, tok = build_data(cfg.data, Path(cfg.training.out_dir).parent / "data_cache")
    except _user_errors() as e:
        _fail(str(e))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    L = seq_len or cfg.data.seq_len
    sums = torch.zeros(L, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for batch in eval_batches(val_ds, L, 4, batches):
            batch = batch.to(device)
            logits = model(batch[:, :-1], use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
            sums += nll.sum(0).double().cpu()
            count += batch.shape[0]
    per_pos = sums / max(count, 1)
    loss = float(per_pos.mean())
    edges = [round(i * L / buckets) for i in range(buckets + 1)]
    by_bucket = [{"from": a, "to": b, "loss": float(per_pos[a:b].mean())} for a, b in zip(edges, edges[1:]) if b > a]
    res = {"checkpoint": checkpoint, "seq_len": L, "sequences": count, "loss": loss, "ppl": math.exp(min(loss, 50)),
           "bpb": loss / math.log(2), "loss_by_position": by_bucket}
    typer.echo(f"loss {loss:.4f}  ppl {res['ppl']:.2f}  bpb {res['bpb']:.4f}  ({count} sequences of {L})")
    typer.echo("position bucket      loss")
    for b in by_bucket:
        typer.echo(f"{b['from']:>6}-{b['to']:<8}  {b['loss']:.4f}")
    if output:
        from titans.utils.io import atomic_write_text

        atomic_write_text(output, json.dumps(res, indent=2))


def _evaluate_tasks(checkpoint, data, tasks, lengths, depths, samples, piece, seed, output) -> None:
    import torch

    from titans.data.preprocessing import load_tokenizer
    from titans.data.tasks import Haystack, expand_tasks
    from titans.inference.long_context import evaluate_tasks, markdown_table, write_report
    from titans.utils.checkpoint import load_model

    try:
        names = expand_tasks(tasks)
        if any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"--depths: values must be in [0, 1], got {depths}")
        if any(L < 64 for L in lengths):
            raise ValueError(f"--lengths: values must be >= 64, got {lengths}")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, cfg = load_model(checkpoint, device)
        tok = load_tokenizer(cfg.data.tokenizer)
        hay = None
        if any(not n.startswith("niah_passkey") for n in names):
            hay = Haystack(data or cfg.data.haystack_source or cfg.data.source, tok, split="val")
        from titans.data.tasks import make_example

        for n in names:  # fail fast, in one line, on a length too short for a task
            make_example(n, min(lengths), seed, tok, hay)
    except (*_user_errors(), OSError) as e:
        _fail(str(e))
    amp = torch.bfloat16 if device == "cuda" else None
    res = evaluate_tasks(model, tok, names, lengths, depths, samples, hay, seed=seed, piece=piece, amp_dtype=amp)
    res["checkpoint"] = checkpoint
    typer.echo(markdown_table(res))
    if output:
        paths = write_report(res, output)
        typer.echo(f"results: {paths['json']}\nplots: {', '.join(paths['plots'])}")


@app.command("prepare-data", epilog="Example:\n\n  titans prepare-data --source /usr/share/dictd/gcide.dict.dz "
             "--out data/gcide")
def prepare_data(source: str = typer.Option("stdlib", help="stdlib, file, folder, glob, .jsonl, .gz, HF dataset dir"),
                 out: str = typer.Option(..., help="output folder for shards + manifest.json"),
                 tokenizer: str = typer.Option("byte", help="'byte' or a local tokenizer.json / folder"),
                 text_field: str = typer.Option("text"), val_fraction: float = typer.Option(0.05),
                 max_bytes: Optional[int] = typer.Option(None)) -> None:
    """Tokenize a corpus once into memory-mapped shards."""
    from titans.data.dataset import prepare_shards
    from titans.data.preprocessing import load_tokenizer

    try:
        m = prepare_shards(source, out, load_tokenizer(tokenizer), text_field=text_field,
                           val_fraction=val_fraction, max_bytes=max_bytes)
    except (*_user_errors(), ImportError) as e:
        _fail(str(e))
    typer.echo(f"train {m['splits']['train']['tokens']:,} tokens, val {m['splits']['val']['tokens']:,} tokens "
               f"-> {out}/manifest.json")


@app.command(epilog="Example:\n\n  titans generate --checkpoint runs/small --prompt 'def main(' --max-new-tokens 200")
def generate(checkpoint: str = typer.Option(...), prompt: Optional[str] = typer.Option(None),
             prompt_file: Optional[str] = typer.Option(None), max_new_tokens: int = typer.Option(200),
             temperature: float = typer.Option(0.8), top_k: Optional[int] = typer.Option(None),
             top_p: Optional[float] = typer.Option(0.95), repetition_penalty: float = typer.Option(1.0),
             seed: Optional[int] = typer.Option(None)) -> None:
    """Generate text from a checkpoint, streaming tokens to the terminal."""
    import torch

    from titans.core.models import generate as gen
    from titans.data.preprocessing import load_tokenizer
    from titans.utils.checkpoint import load_model

    try:
        if prompt is None and prompt_file is None:
            raise ValueError("give --prompt or --prompt-file")
        text = prompt if prompt is not None else Path(prompt_file).read_text()
        model, cfg = load_model(checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(cfg.data.tokenizer)
    except (*_user_errors(), OSError) as e:
        _fail(str(e))
    sys.stdout.write(text)
    buf: list[int] = []

    def stream(row: int, t: int) -> None:
        buf.append(t)
        s = tok.decode(buf)
        if not s.endswith("\ufffd"):
            sys.stdout.write(s)
            sys.stdout.flush()
            buf.clear()

    gen(model, tok.encode(text), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, stream=stream)
    sys.stdout.write("\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
