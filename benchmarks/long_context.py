"""Train each variant on the LM + long-context task mixture at equal tokens, then measure S-NIAH and
BABILong-style accuracy far beyond the training length with the streaming path.  Writes JSON, a
markdown table and heat maps per variant (issue 6).

    python benchmarks/long_context.py --variants mac swa --steps 300 --source /usr/share/dictd/gcide.dict.dz \\
        --lengths 2048 4096 8192 16384 --out results/long_context

    # the passkey recipe of benchmarks/RESULTS.md 4d-4f, checkpoints kept out of the (small) output folder
    python benchmarks/long_context.py --config passkey --variants mac mag swa --steps 3000 --tasks niah_passkey \\
        --lengths 1024 4096 16384 65536 --set training.cuda_graphs=true --out results/lc --runs-dir runs/lc

    # MAG with three initialisations side by side on one GPU (what a result owes to the seed)
    python benchmarks/long_context.py --config passkey --variants mag --seeds 0 1 2 --jobs 3 --mps ...

Writes summary.json / summary.md / summary.png (all variants) under --out after each variant.

Small models leave most of a GPU idle (the memory's chunk recurrence is latency-bound), so ``--jobs N``
trains and evaluates up to N variants at once, each in its own process (its own ``OUT/job_<variant>``
and ``RUNS/job_<variant>``), and merges their summaries; with ``--mps`` the CUDA MPS daemon runs for the
duration so the processes share the SMs instead of taking turns (three MAC trainings side by side ran at
167K tokens/s each, one alone at 243K: benchmarks/RESULTS.md 4f).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from titans.core.models import ffn_mult_for_parameters, parameter_count
from titans.data.preprocessing import load_tokenizer
from titans.data.tasks import Haystack, make_example
from titans.inference.long_context import evaluate_tasks, report_tables, write_report
from titans.inference.predictor import trace_memory
from titans.training.trainer import train
from titans.utils.checkpoint import load_model
from titans.utils.config import load_config
from titans.utils.io import atomic_write_text


def plot_summary(summary: dict, path: Path) -> None:
    """One panel per task and metric: the metric averaged over depths against context length, one line per
    variant (the compact view of all the heat maps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    tasks = sorted({c["task"] for v in variants.values() for c in v["cells"]})
    metrics = [("accuracy", "exact match (%)"), ("first_token_accuracy", "first answer token right (%)"),
               ("token_accuracy", "answer tokens right (%)")]
    if any("forced_token_accuracy" in c for v in variants.values() for c in v["cells"]):  # older results lack it
        metrics.append(("forced_token_accuracy", "... given the true prefix (%)"))
    fig, axes = plt.subplots(len(tasks), len(metrics), figsize=(4.5 * len(metrics), 3.2 * len(tasks) + 0.5),
                             squeeze=False)
    # one colour per variant in every panel (a variant without cells for a task must not shift the others)
    colours = {name: f"C{k % 10}" for k, name in enumerate(variants)}
    for i, task in enumerate(tasks):
        for j, (metric, label) in enumerate(metrics):
            ax = axes[i][j]
            for name, v in variants.items():
                cells = [c for c in v["cells"] if c["task"] == task and metric in c]
                if not cells:  # a variant whose training failed, or not evaluated on this task (or metric)
                    continue
                lengths = sorted({c["length"] for c in cells})
                ys = [100 * sum(c[metric] for c in cells if c["length"] == L)
                      / sum(1 for c in cells if c["length"] == L) for L in lengths]
                ax.plot(lengths, ys, marker="o", label=name, color=colours[name])
            ax.set_xscale("log", base=2)
            ax.set_ylim(-3, 103)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(label)
            ax.set_title(task)
            ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    labels = [n for n, v in variants.items() if v["cells"]]
    handles = [Line2D([], [], color=colours[n], marker="o") for n in labels]
    # one legend under the panels: inside them it hid the curves
    rows = -(-len(labels) // 3)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07 * rows / len(tasks), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gate_half_lives(model, tokenizer, length: int = 4096) -> list[dict] | None:
    """Per memory layer and head, the forgetting half-life in tokens on one passkey prompt (the reach of
    recall; benchmarks/RESULTS.md 4f); None for a model without memory."""
    if not any(b.memory is not None for b in model.blocks):
        return None
    ex = make_example("niah_passkey", length, 0, tokenizer, None, depth=0.5)
    ids = torch.tensor([ex.input_ids], device=next(model.parameters()).device)
    return [{"layer": r["layer"], "half_life_tokens": r["half_life"].tolist()} for r in trace_memory(model, ids)]


def write_summary(out: Path, summary: dict, report: list[str]) -> None:
    """summary.json, summary.md and (once a variant has results) summary.png under ``out``; called after
    every variant so a run stopped by a time limit keeps what it finished."""
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "summary.md", "\n".join(report))
    if any(v["cells"] for v in summary["variants"].values()):
        plot_summary(summary, out / "summary.png")


@contextmanager
def mps_daemon(enabled: bool):
    """Run the CUDA MPS control daemon (pipe and log directories in a temporary folder) while the block runs;
    processes started inside inherit its environment and become MPS clients."""
    if not enabled:
        yield
        return
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise SystemExit("--mps: nvidia-cuda-mps-control is not on PATH (it comes with the NVIDIA driver)")
    with tempfile.TemporaryDirectory(prefix="titans_mps_") as d:
        env = {"CUDA_MPS_PIPE_DIRECTORY": f"{d}/pipe", "CUDA_MPS_LOG_DIRECTORY": f"{d}/log"}
        for path in env.values():
            os.makedirs(path)
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        subprocess.run([exe, "-d"], check=True)
        try:
            yield
        finally:
            subprocess.run([exe], input="quit\n", text=True, check=False)
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def plan_runs(args) -> list[tuple[str, int | None, str, list[str]]]:
    """(variant, seed or None, run name, extra config overrides) for every training the arguments ask for."""
    seeds = [None] if args.seeds is None else args.seeds
    widen = {}
    if args.match_params:  # same parameters as the reference variant, through the feed-forward width
        def model_cfg(v):
            return load_config(args.config, [f"model.variant={v}", *args.overrides]).model

        target = parameter_count(model_cfg(args.match_params))
        for v in args.variants:
            cfg = model_cfg(v)
            if abs(parameter_count(cfg) - target) > 0.01 * target:
                widen[v] = [f"model.ffn_mult={ffn_mult_for_parameters(cfg, target):.6f}"]
    return [(v, s, v if s is None else f"{v}_seed{s}", widen.get(v, []) + ([] if s is None else [f"training.seed={s}"]))
            for v in args.variants for s in seeds]


def run_jobs(args, plan: list, out: Path, runs: Path) -> None:
    """One child process of this script per run (variant x seed), at most ``args.jobs`` at a time; then one
    summary in the order asked for."""
    base = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--source", args.source,
            "--steps", str(args.steps), "--tasks", *args.tasks, "--lengths", *map(str, args.lengths),
            "--depths", *map(str, args.depths), "--samples", str(args.samples), "--piece", str(args.piece)]
    if args.overrides:
        base += ["--set", *args.overrides]
    if args.match_params:
        base += ["--match-params", args.match_params]
    pending, running, done = list(plan), {}, {}
    with mps_daemon(args.mps):
        while pending or running:
            while pending and len(running) < args.jobs:
                v, seed, name, _ = pending.pop(0)
                log = open(out / f"job_{name}.log", "w")
                cmd = base + ["--variants", v, "--out", str(out / f"job_{name}"), "--runs-dir",
                              str(runs / f"job_{name}")]
                if seed is not None:  # the child plans this one run (and widens it the same way) itself
                    cmd += ["--seeds", str(seed)]
                running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
                print(f"started {name} (log {out / f'job_{name}.log'})", flush=True)
            time.sleep(1.0)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    done[name] = proc.returncode
                    del running[name]
                    print(f"finished {name}: exit status {proc.returncode}", flush=True)
    summary = {"args": vars(args), "date": time.strftime("%Y-%m-%d"), "variants": {}}
    report = []
    for _, _, name, _ in plan:  # in the order asked for, whatever order they finished in
        child = out / f"job_{name}" / "summary.json"
        cs = json.loads(child.read_text()) if child.is_file() else {"variants": {}}
        if name in cs["variants"]:
            summary["device"] = cs["device"]
            summary["variants"][name] = cs["variants"][name]
            report.append((child.parent / "summary.md").read_text())
        else:
            msg = f"process exited with status {done[name]} before writing results; see {out / f'job_{name}.log'}"
            summary["variants"][name] = {"error": msg, "cells": []}
            report.append(f"## {name}: {msg}\n")
    write_summary(out, summary, report)
    print("\n".join(report), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["mac", "mag", "mal", "lmm", "swa"])
    ap.add_argument("--config", default="long_context", help="config name or YAML file the variants start from")
    ap.add_argument("--source", default="/usr/share/dictd/gcide.dict.dz")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--set", nargs="*", default=[], dest="overrides")
    ap.add_argument("--tasks", nargs="+", default=["niah"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--piece", type=int, default=2048, help="streaming piece length of the evaluation")
    ap.add_argument("--out", default="benchmarks/results/long_context",
                    help="summary.json, summary.md and summary.png go here")
    ap.add_argument("--runs-dir", default=None,
                    help="checkpoints and per-variant reports (default: OUT); keep them apart when OUT must stay small")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="train every variant once per seed (training.seed; the data stay the same), named "
                         "VARIANT_seedS: what a result owes to the initialisation")
    ap.add_argument("--match-params", default=None, metavar="VARIANT",
                    help="widen the feed-forward (model.ffn_mult) of every variant whose size differs by > 1%% to "
                         "this variant's parameter count (the issue's same-parameters comparison)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="train and evaluate up to this many variants at once, one process each")
    ap.add_argument("--mps", action="store_true",
                    help="with --jobs: run a private CUDA MPS daemon meanwhile, so the processes share the GPU's SMs "
                         "(where a daemon already runs, leave this off: the children connect to that one)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: expected >= 1")
    out = Path(args.out)
    runs = Path(args.runs_dir) if args.runs_dir else out
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_runs(args)
    if args.jobs > 1 and len(plan) > 1:
        run_jobs(args, plan, out, runs)
        return
    summary = {"args": vars(args), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d"), "variants": {}}
    report = []
    for v, _, name, extra in plan:
        cfg = load_config(args.config, [f"model.variant={v}", f"data.source={args.source}",
                                        f"training.max_steps={args.steps}", f"training.eval_every={args.steps}",
                                        f"training.ckpt_every={args.steps}", f"training.out_dir={runs}/run_{name}",
                                        "logging.progress=false", "logging.tensorboard=false", *args.overrides,
                                        *extra])
        t0 = time.perf_counter()
        try:
            s = train(cfg)
        except RuntimeError as e:  # a diverged run is a result too: record it and go on with the next variant
            print(f"## {name}: training failed: {e}", flush=True)
            report.append(f"## {name}: training failed after {time.perf_counter() - t0:.0f} s: {e}\n")
            summary["variants"][name] = {"error": str(e), "cells": []}
            write_summary(out, summary, report)
            continue
        train_s = time.perf_counter() - t0
        model, cfg = load_model(runs / f"run_{name}", "cuda" if torch.cuda.is_available() else "cpu")
        tok = load_tokenizer(cfg.data.tokenizer)
        hay = Haystack(args.source, tok, split="val")
        amp = torch.bfloat16 if torch.cuda.is_available() else None
        res = evaluate_tasks(model, tok, args.tasks, args.lengths, args.depths, args.samples, hay, piece=args.piece,
                             amp_dtype=amp, progress=False)
        res.update(variant=v, half_lives=gate_half_lives(model, tok), params=model.num_parameters(),
                   train_tokens=s["tokens_seen"], train_seconds=train_s,
                   train_steps=s["step"], time_limited=s.get("time_limited", False), val_bpb=s.get("val_bpb"),
                   final_train_loss=s.get("train_loss"), skipped_steps=s.get("skipped_steps"),
                   stages=[{"seq_len": st["seq_len"], "tasks": st.get("tasks"), "steps": st["step"],
                            "tokens": st["tokens_seen"],
                            "time_limited": st["time_limited"], "train_loss": st.get("train_loss")}
                           for st in s.get("stages", [])])
        write_report(res, runs / f"eval_{name}")
        stopped = " (stopped by training.max_time_s)" if res["time_limited"] else ""
        text = (f"## {name}: params {res['params']:,}, {s['step']} steps{stopped}, {s['tokens_seen']:,} training "
                f"tokens in {train_s:.0f} s, "
                f"val bpb {s.get('val_bpb', float('nan')):.3f}, train loss (last 50 steps) {s.get('train_loss')}, "
                f"{s.get('skipped_steps')} steps skipped (non-finite gradients), evaluation {res['seconds']:.0f} s\n\n"
                + "".join(f"- curriculum stage {i}: rows of {st['seq_len']} ({', '.join(st['tasks'] or ['LM'])}), "
                          f"{st['steps']} steps"
                          f"{' (time limit)' if st['time_limited'] else ''}, {st['tokens']:,} tokens, train loss "
                          f"{st['train_loss']}\n" for i, st in enumerate(res["stages"]))
                + ("\n" if res["stages"] else "")
                + f"{report_tables(res)}\n")
        if res["half_lives"]:
            text += "\nforgetting half-life per head (tokens, on a 4K passkey prompt):\n\n" + "\n".join(
                f"- layer {h['layer']}: " + ", ".join(f"{x:,.0f}" for x in h["half_life_tokens"])
                for h in res["half_lives"]) + "\n"
        print(text, flush=True)
        report.append(text)
        summary["variants"][name] = {k: res[k] for k in ("variant", "params", "train_tokens", "train_steps",
                                                         "time_limited", "train_seconds", "val_bpb",
                                                         "final_train_loss", "skipped_steps", "seconds",
                                                         "half_lives", "stages", "cells")}
        write_summary(out, summary, report)


if __name__ == "__main__":
    main()
