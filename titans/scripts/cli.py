"""The ``titans`` command line: train, evaluate, prepare-data, generate, ... (``titans --help`` lists them).

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


@app.callback()
def _check_environment() -> None:
    # a misspelt TITANS_* switch would otherwise change nothing without a word (titans/utils/switches.py)
    from titans.utils.switches import warn_unknown_switches

    warn_unknown_switches(report=lambda message: typer.echo(f"warning: {message}", err=True))


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _numbers(values: list[str], kind: type, option: str) -> list:
    """``--lengths 2048,16384 --lengths 65536`` -> [2048, 16384, 65536]; a bad entry is a usage error naming it."""
    out = []
    for value in values:
        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                out.append(kind(part))
            except ValueError:
                _fail(f"--{option}: {part!r} is not {'a whole number' if kind is int else 'a number'}")
    if not out:
        _fail(f"--{option}: no values given")
    return out


# the help of options several commands share (one wording each)
CHECKPOINT_HELP = ("run folder (its latest checkpoint), its checkpoints folder or checkpoints/latest file, a step "
                   "folder, or an export")
MAX_NEW_TOKENS_HELP = "tokens to generate (in chat: at most, a reply)"
TEMPERATURE_HELP = "sampling temperature (0: greedy, always the most likely token)"
TOP_K_HELP = "sample among the k most likely tokens only (default: no limit)"
TOP_P_HELP = "nucleus sampling: among the most likely tokens whose probabilities sum to p (1: off)"
REPETITION_PENALTY_HELP = "> 1 makes tokens already in the context less likely (1: off)"
SEED_HELP = "random seed of the sampling, for a repeatable run (default: a fresh one each run)"
CONFIG_HELP = "builtin name (default, small, base, large, experiment) or YAML"
SET_HELP = "override, e.g. training.lr=3e-4 (repeatable)"


def _user_errors():
    from titans.utils.checkpoint import CheckpointError

    return (ConfigError, CheckpointError, FileNotFoundError, ValueError)


@app.command(epilog="Examples:\n\n  titans train --config small\n\n"
             "  titans train --config base --set training.lr=3e-4 --set data.source=/usr/share/dictd/gcide.dict.dz")
def train(config: str = typer.Option("small", help=CONFIG_HELP),
          set_: list[str] = typer.Option([], "--set", help=SET_HELP),
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
    graphs = summary.get("cuda_graphs")
    if graphs is not None:  # training.cuda_graphs=true: whether the captured step trained, and if not, why
        typer.echo("CUDA graphs: used" if graphs["used"] else f"CUDA graphs: not used ({graphs['why_not']})")


@app.command(epilog="Examples:\n\n  titans evaluate --checkpoint runs/small --batches 20\n\n"
             "  titans evaluate --checkpoint runs/niah --task niah --lengths 2048,16384,65536 "
             "--depths 0,0.5,1 --samples 20 --output results/niah\n\n"
             "  titans evaluate --checkpoint runs/niah --task babilong --lengths 4096,16384 --output results/babilong")
def evaluate(checkpoint: str = typer.Option(..., help=CHECKPOINT_HELP),
             data: Optional[str] = typer.Option(None, help="data source (default: the run's own validation data); "
                                                "with --task: the haystack text"),
             batches: int = typer.Option(20, help="validation batches"),
             seq_len: Optional[int] = typer.Option(None, help="evaluation length (default: training length)"),
             buckets: int = typer.Option(8, help="position buckets for loss-by-position"),
             task: list[str] = typer.Option([], help="niah | babilong | a task name (niah_uuid, babilong_qa2, "
                                            "...); repeatable.  Runs the long-context grid instead"),
             lengths: list[str] = typer.Option(
                 ["1024,2048,4096,8192,16384"],
                 help="context lengths in tokens, comma-separated or repeated (exact: the answer follows the last "
                      "token; for MAC a multiple of its window puts the answer at a segment start, its worst case: "
                      "RESULTS.md 4y)"),
             depths: list[str] = typer.Option(["0,0.25,0.5,0.75,1"],
                                              help="needle depths in [0, 1], comma-separated or repeated"),
             samples: int = typer.Option(10, help="examples per cell"),
             piece: int = typer.Option(4096, help="streaming piece length (tokens per forward)"),
             seed: int = typer.Option(0, help="with --task: seed of the generated examples (haystack, needles, "
                                  "questions)"),
             batch_size: int = typer.Option(4, help="with --task: examples streamed together (one cell's examples "
                                            "have one length; a latency-bound model, MAC at small windows, reads "
                                            "more tokens a second in larger batches)"),
             precision: str = typer.Option(
                 "auto", help="with --task: auto (bf16 autocast on CUDA, float32 on the CPU), bf16 (autocast on any "
                              "device: the numerics a GPU-trained model saw) or fp32"),
             output: Optional[str] = typer.Option(None, help="write JSON results here (with --task: a folder for "
                                                  "JSON, table and heat-map PNGs)")) -> None:
    """Loss, perplexity, bits per byte, and loss by position bucket; or, with --task, long-context accuracy."""
    import torch

    from titans.data.dataloader import build_data, eval_batches
    from titans.utils.checkpoint import load_model

    if task:
        _evaluate_tasks(checkpoint, data, task, _numbers(lengths, int, "lengths"), _numbers(depths, float, "depths"),
                        samples, piece, seed, output, precision, batch_size)
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


def _evaluate_tasks(checkpoint, data, tasks, lengths, depths, samples, piece, seed, output, precision,
                    batch_size) -> None:
    import torch

    from titans.data.preprocessing import load_tokenizer
    from titans.data.tasks import Haystack, expand_tasks
    from titans.inference.long_context import evaluate_tasks, report_tables, write_report
    from titans.utils.checkpoint import load_model

    try:
        names = expand_tasks(tasks)
        if any(not 0 <= d <= 1 for d in depths):
            raise ValueError(f"--depths: values must be in [0, 1], got {depths}")
        if any(L < 64 for L in lengths):
            raise ValueError(f"--lengths: values must be >= 64, got {lengths}")
        if precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--precision {precision!r}: expected auto, bf16 or fp32")
        if batch_size < 1:
            raise ValueError(f"--batch-size {batch_size}: expected >= 1")
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
    # the same examples can score differently in float32 and in bf16 (uuid at 16K: RESULTS.md 4ab), so the
    # arithmetic is a setting and goes into the results
    amp = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device == "cuda") else None
    res = evaluate_tasks(model, tok, names, lengths, depths, samples, hay, seed=seed, piece=piece,
                         batch_size=batch_size, amp_dtype=amp)
    res["checkpoint"] = checkpoint
    res["precision"] = "bf16 autocast" if amp is not None else "float32"
    typer.echo(report_tables(res))
    if output:
        paths = write_report(res, output)
        typer.echo(f"results: {paths['json']}\nplots: {', '.join(paths['plots'])}")


@app.command("prepare-data", epilog="Example:\n\n  titans prepare-data --source /usr/share/dictd/gcide.dict.dz "
             "--out data/gcide")
def prepare_data(source: str = typer.Option("stdlib", help="stdlib, file, folder, glob, .jsonl, .gz, HF dataset dir"),
                 out: str = typer.Option(..., help="output folder for shards + manifest.json"),
                 tokenizer: str = typer.Option("byte", help="'byte' or a local tokenizer.json / folder"),
                 text_field: str = typer.Option("text", help="the text's field in JSONL records and HF datasets"),
                 val_fraction: float = typer.Option(0.05, help="share of the documents held out for validation "
                                                    "(chosen by a stable hash of each document's name)"),
                 max_bytes: Optional[int] = typer.Option(None, help="stop after about this many bytes of text "
                                                         "(default: all of it)")) -> None:
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


@app.command(epilog="Example:\n\n  titans generate --checkpoint runs/small --prompt 'def main(' --max-new-tokens 200"
                     " [--cuda-graphs]")
def generate(checkpoint: str = typer.Option(..., help=CHECKPOINT_HELP),
             prompt: Optional[str] = typer.Option(None, help="the text to continue"),
             prompt_file: Optional[str] = typer.Option(None, help="a file holding the text to continue"),
             max_new_tokens: int = typer.Option(200, help=MAX_NEW_TOKENS_HELP),
             temperature: float = typer.Option(0.8, help=TEMPERATURE_HELP),
             top_k: Optional[int] = typer.Option(None, help=TOP_K_HELP),
             top_p: Optional[float] = typer.Option(0.95, help=TOP_P_HELP),
             repetition_penalty: float = typer.Option(1.0, help=REPETITION_PENALTY_HELP),
             seed: Optional[int] = typer.Option(None, help=SEED_HELP),
             session: Optional[str] = typer.Option(None, help="memory state file: continue from it if it exists, "
                                                   "save the updated memory back to it"),
             cuda_graphs: bool = typer.Option(False, help="decode through one captured CUDA graph replayed per token "
                                              "(fixed-shape state; same tokens; on the CPU the same static step "
                                              "runs eagerly)")) -> None:
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
    if session:
        if cuda_graphs:
            _fail("--cuda-graphs: not available with --session (the session's memory is streamed by the normal path)")
        _generate_with_session(checkpoint, session, text, max_new_tokens, temperature, top_k, top_p,
                               repetition_penalty, seed)
        return
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
        repetition_penalty=repetition_penalty, seed=seed, stream=stream, cuda_graphs=cuda_graphs)
    sys.stdout.write("\n")


def _generate_with_session(checkpoint, session, text, max_new_tokens, temperature, top_k, top_p,
                           repetition_penalty, seed) -> None:
    from titans.inference.memory_management import MemoryStateError

    pred = _load_predictor(checkpoint)
    with pred.session("generate") as sess:
        try:
            if Path(session).exists():
                sess.load(session)
        except MemoryStateError as e:
            _fail(str(e))
        sys.stdout.write(text)
        sess.generate(text, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      repetition_penalty=repetition_penalty, seed=seed,
                      stream=lambda t: (sys.stdout.write(pred.tokenizer.decode([t])), sys.stdout.flush()))
        sys.stdout.write("\n")
        sess.save(session)
        typer.echo(f"[memory: {sess.state.position:,} tokens -> {session}]", err=True)


def _load_predictor(checkpoint: str):
    import torch

    from titans.inference.predictor import Predictor

    return Predictor.from_checkpoint(checkpoint, "cuda" if torch.cuda.is_available() else "cpu")


@app.command(epilog="Example:\n\n  titans chat --checkpoint runs/small\n\n"
             "Commands inside the chat: /reset, /save PATH, /load PATH, /stats, /quit")
def chat(checkpoint: str = typer.Option(..., help=CHECKPOINT_HELP),
         max_new_tokens: int = typer.Option(200, help=MAX_NEW_TOKENS_HELP),
         temperature: float = typer.Option(0.8, help=TEMPERATURE_HELP),
         top_p: Optional[float] = typer.Option(0.95, help=TOP_P_HELP),
         seed: Optional[int] = typer.Option(None, help=SEED_HELP),
         session: Optional[str] = typer.Option(None, help="start from this saved memory")) -> None:
    """Interactive chat whose neural memory keeps learning across turns (reads turns from stdin)."""
    from titans.inference.memory_management import MemoryStateError

    try:
        pred = _load_predictor(checkpoint)
    except (*_user_errors(), OSError) as e:
        _fail(str(e))
    with pred.session("chat") as sess:
        if session:
            try:
                sess.load(session)
            except MemoryStateError as e:
                _fail(str(e))
        typer.echo(f"titans chat ({pred.config.model.variant}, {pred.model.num_parameters():,} parameters). "
                   "Commands: /reset /save PATH /load PATH /stats /quit")
        turn = 0
        for line in sys.stdin:
            line = line.rstrip("\n")
            if not line:
                continue
            cmd, _, arg = line.partition(" ")
            try:
                if cmd == "/quit":
                    break
                if cmd == "/reset":
                    sess.reset()
                    typer.echo("[memory reset]")
                    continue
                if cmd == "/save":
                    typer.echo(f"[saved {sess.save(arg.strip() or 'chat_memory.safetensors')}]")
                    continue
                if cmd == "/load":
                    sess.load(arg.strip())
                    typer.echo(f"[loaded {arg.strip()}: {sess.state.position} tokens]")
                    continue
                if cmd == "/stats":
                    st = sess.stats()
                    sur = "-" if st["last_surprise"] is None else f"{st['last_surprise']:.3f} nats/token"
                    typer.echo(f"[tokens seen {st['tokens_seen']:,} | memory {st['memory_bytes'] / 2**20:.2f} MiB "
                               f"| state {st['state_bytes'] / 2**20:.2f} MiB | surprise of last turn {sur}]")
                    continue
                if cmd.startswith("/"):
                    typer.echo(f"[unknown command {cmd}; use /reset /save PATH /load PATH /stats /quit]")
                    continue
            except (MemoryStateError, OSError, ValueError) as e:
                typer.echo(f"[error: {e}]")
                continue
            turn += 1
            sys.stdout.write("model: ")
            # the model continues the conversation's text; a blank line ends its turn
            sess.generate(line + "\n", max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=None if seed is None else seed + turn, stop_text="\n\n", min_new_tokens=8,
                          stream=lambda t: (sys.stdout.write(pred.tokenizer.decode([t])), sys.stdout.flush()))
            sys.stdout.write("\n")
            sys.stdout.flush()


@app.command("batch-infer", epilog="Example:\n\n  titans batch-infer --checkpoint runs/small "
             "--input prompts.jsonl --output results.jsonl")
def batch_infer(checkpoint: str = typer.Option(..., help=CHECKPOINT_HELP),
                input: str = typer.Option(..., help="JSONL: {id, prompt}"),
                output: str = typer.Option(..., help="JSONL results (appended; existing ids are skipped)"),
                batch_size: int = typer.Option(8, help="prompts generated together"),
                max_new_tokens: int = typer.Option(100, help=MAX_NEW_TOKENS_HELP),
                temperature: float = typer.Option(0.8, help=TEMPERATURE_HELP),
                top_p: Optional[float] = typer.Option(0.95, help=TOP_P_HELP),
                seed: Optional[int] = typer.Option(0, help="random seed of the sampling (the same results each "
                                                   "run by default)")) -> None:
    """Batched generation over a JSONL file, with a progress bar; resumable."""
    from titans.inference.batch_inference import run_batch_inference

    try:
        pred = _load_predictor(checkpoint)
        res = run_batch_inference(pred, input, output, batch_size, max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed)
    except (*_user_errors(), OSError) as e:
        _fail(str(e))
    typer.echo(f"generated {res['generated']}, already done {res['already_done']}, "
               f"bad lines {len(res['bad_lines'])} -> {output}")


@app.command("analyze-memory", epilog="Example:\n\n  titans analyze-memory --checkpoint runs/small "
             "--text-file notes.txt --output analysis/")
def analyze_memory(checkpoint: str = typer.Option(..., help=CHECKPOINT_HELP),
                   text: Optional[str] = typer.Option(None, help="the text the memory reads"),
                   text_file: Optional[str] = typer.Option(None, help="a file holding the text the memory reads"),
                   output: str = typer.Option("memory_analysis", help="folder for memory_analysis.json and .png"),
                   max_tokens: int = typer.Option(2048, help="read at most this many tokens of the text")) -> None:
    """Per layer and head: surprise per token, theta / eta / alpha, weight norms, inner loss before/after, and
    the forgetting half-life in tokens (how far back recall can reach)."""
    import torch

    from titans.inference.predictor import trace_memory
    from titans.utils.io import atomic_write_text

    try:
        if text is None and text_file is None:
            raise ValueError("give --text or --text-file")
        body = text if text is not None else Path(text_file).read_text(errors="replace")
        pred = _load_predictor(checkpoint)
        ids = pred.tokenizer.encode(body)[:max_tokens]
        if not ids:
            raise ValueError("the text is empty")
        if not any(b.memory is not None for b in pred.model.blocks):
            raise ValueError(f"variant {pred.config.model.variant!r} has no neural memory to analyze")
    except (*_user_errors(), OSError) as e:
        _fail(str(e))
    layers = trace_memory(pred.model, torch.tensor([ids], device=pred.device))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    summary = []
    for r in layers:
        summary.append({"layer": r["layer"], "heads": int(r["grad_norm"].shape[0]),
                        "tokens": int(r["grad_norm"].shape[1]),
                        **{k: r[k].tolist() for k in ("grad_norm", "loss_before", "loss_after", "theta", "eta",
                                                      "alpha")},
                        "weight_norms": [w.tolist() for w in r["weight_norms"]],
                        "half_life_tokens": r["half_life"].tolist(),
                        "mean_loss_before": float(r["loss_before"].mean()),
                        "mean_loss_after": float(r["loss_after"].mean())})
    atomic_write_text(out / "memory_analysis.json", json.dumps({"checkpoint": checkpoint, "tokens": len(ids),
                                                                "layers": summary}))
    _plot_memory(layers, out / "memory_analysis.png")
    for r in summary:
        typer.echo(f"layer {r['layer']}: mean surprise {sum(map(sum, r['grad_norm'])) / (r['heads'] * r['tokens']):.4f}"
                   f"  inner loss {r['mean_loss_before']:.4f} -> {r['mean_loss_after']:.4f}  forgetting half-life "
                   f"per head (tokens) {', '.join(f'{h:,.0f}' for h in r['half_life_tokens'])}")
    typer.echo(f"wrote {out / 'memory_analysis.json'} and {out / 'memory_analysis.png'}")


def _plot_memory(layers, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(layers)
    fig, axes = plt.subplots(n, 3, figsize=(15, 2.8 * n), squeeze=False)
    for row, r in zip(axes, layers):
        im = row[0].imshow(r["grad_norm"].numpy(), aspect="auto", cmap="magma")
        row[0].set_title(f"layer {r['layer']}: surprise ||grad|| (head x token)")
        fig.colorbar(im, ax=row[0])
        for g in ("theta", "eta", "alpha"):
            row[1].plot(r[g].mean(0).numpy(), label=g)
        row[1].set_yscale("log")
        row[1].set_title("gates (mean over heads)")
        row[1].legend()
        row[2].plot(r["loss_before"].mean(0).numpy(), label="before update")
        row[2].plot(r["loss_after"].mean(0).numpy(), label="after update")
        row[2].set_title("inner loss per token (mean over heads)")
        row[2].legend()
    for ax in axes[-1]:
        ax.set_xlabel("token")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@app.command("convert-checkpoint", epilog="Example:\n\n  titans convert-checkpoint --checkpoint runs/small "
             "--out exports/small")
def convert_checkpoint(checkpoint: str = typer.Option(..., help=CHECKPOINT_HELP + " (an older one)"),
                       out: str = typer.Option(..., help="export folder")) -> None:
    """Training checkpoint (or an older export) to an inference export: safetensors + config + export.json."""
    from titans.utils.checkpoint import export_model, load_model

    try:
        model, cfg = load_model(checkpoint)
        path = export_model(model, cfg, out)
    except (*_user_errors(), OSError) as e:
        _fail(str(e))
    typer.echo(f"exported {model.num_parameters():,} parameters ({cfg.model.variant}) -> {path}")


@app.command(epilog="Example:\n\n  titans profile --config base --seq-len 4096 --batch 2")
def profile(config: str = typer.Option("small", help=CONFIG_HELP),
            set_: list[str] = typer.Option([], "--set", help=SET_HELP),
            seq_len: int = typer.Option(1024, help="tokens per sequence"),
            batch: int = typer.Option(2, help="sequences per step"),
            steps: int = typer.Option(3, help="timed training steps (after one warm-up step)"),
            device: str = typer.Option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N"),
            trace: Optional[str] = typer.Option(None, help="torch.profiler trace (Chrome JSON) path"),
            output: Optional[str] = typer.Option(None, help="write JSON here")) -> None:
    """Parameters, FLOPs per token by component, peak memory and tokens/s of a config."""
    import time

    import torch

    from titans.core.models import build_model
    from titans.training.distributed import DistInfo
    from titans.training.trainer import pick_device
    from titans.utils.config import load_config
    from titans.utils.profiling import flops_per_token

    try:
        cfg = load_config(config, list(set_))
    except _user_errors() as e:
        _fail(str(e))
    try:
        dev = pick_device(device, DistInfo(), "--device")
    except ValueError as e:
        _fail(str(e))
    model = build_model(cfg.model).to(dev)
    fl = flops_per_token(cfg.model, seq_len)
    ids = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), device=dev)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu",
                                                                                                   enabled=False)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with amp:
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    prof = None
    if trace:
        prof = torch.profiler.profile(record_shapes=False)
        prof.__enter__()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(trace)
    res = {"config": config, "variant": cfg.model.variant, "params": model.num_parameters(), "seq_len": seq_len,
           "batch": batch, "device": str(dev), "flops_per_token": fl, "train_tokens_per_s": batch * seq_len / dt,
           "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None}
    typer.echo(f"{cfg.model.variant}: {res['params']:,} parameters; training FLOPs/token "
               f"{fl['total']:.3g} (attention {fl['attention']:.3g}, memory {fl['memory']:.3g}, "
               f"mlp {fl['mlp']:.3g}, other {fl['other']:.3g})")
    typer.echo(f"{res['train_tokens_per_s']:,.0f} training tokens/s on {dev}"
               + (f", peak {res['peak_gb']:.2f} GB" if res["peak_gb"] is not None else ""))
    if output:
        from titans.utils.io import atomic_write_text

        atomic_write_text(output, json.dumps(res, indent=2))


@app.command(epilog="Example:\n\n  TITANS_TRITON_BWD=split titans switches")
def switches(as_json: bool = typer.Option(False, "--json", help="print the table as JSON")) -> None:
    """The TITANS_* environment switches (implementations of the same computation, for A/B timing of the GPU paths):
    the values each takes, its default, what is set now."""
    from titans.utils.switches import switch_table

    rows = switch_table()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("switch", "set", "default", "takes", "what it does", show_lines=False)
        for r in rows:
            takes = ", ".join(r["values"]) if isinstance(r["values"], list) else r["values"]
            now = r["set"] if r["set"] is not None else "-"
            if "error" in r:
                now = f"[red]{r['set']} (rejected)[/red]"
            table.add_row(r["name"], now, r["default"] if r["default"] is not None else "-", takes, r["meaning"])
        Console().print(table)
    if any("error" in r for r in rows):
        for r in rows:
            if "error" in r:
                typer.echo(f"error: {r['error']}", err=True)
        raise typer.Exit(2)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
