"""Compare models on one long-context task from their ``titans evaluate`` outputs (issue 6).

Each model brings one or more ``titans evaluate --output DIR`` folders (one per evaluation seed: fresh examples);
their cells are pooled by context length, exact match gets its 95% Wilson interval, and the rate of always giving the
most common answer (the ``majority_baseline`` of each cell, pooled the same way) is the line to beat: BABILong answers
come from a few words, so a model stuck on one answer can look good.  Writes JSON, a markdown table and a PNG.

    python benchmarks/babilong_compare.py --task babilong_qa3 \\
        --model mal=runs/eval_mal_s1,runs/eval_mal_s2 --model swa=runs/eval_swa_s1,runs/eval_swa_s2 \\
        --out benchmarks/results/babilong_qa3.json --plot docs/babilong_qa3.png
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from titans.inference.long_context import wilson_interval
from titans.utils.io import atomic_write_text, atomic_write_with


def length_groups(lengths, within: int) -> dict[int, int]:
    """Each length -> the length it is pooled under: a run of lengths, each at most ``within`` tokens above the one
    before, forms a group named by its longest (a pair on and off MAC's segment grid, 2,024 / 2,048: one ~2K cell)."""
    out: dict[int, int] = {}
    group: list[int] = []
    for L in sorted(set(lengths)):
        if group and L - group[-1] > within:
            out.update({g: group[-1] for g in group})
            group = []
        group.append(L)
    out.update({g: group[-1] for g in group})
    return out


def pooled(dirs: list[Path], task: str, within: int = 0) -> dict[int, dict]:
    """Per context length: examples, exact-match count, majority-answer count, seeds and the lengths pooled, over
    the folders' cells of ``task`` (every depth); lengths at most ``within`` tokens apart pool under the longest."""
    cells = []
    for d in dirs:
        path = d / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not a `titans evaluate --output` folder (no results.json)")
        res = json.loads(path.read_text())
        mine = [c for c in res["cells"] if c["task"] == task]
        if not mine:
            raise ValueError(f"{path}: no cells of task {task!r} (it has {sorted({c['task'] for c in res['cells']})})")
        cells += [(res.get("seed"), c) for c in mine]
    group = length_groups([int(c["length"]) for _, c in cells], within)
    out: dict[int, dict] = {}
    for seed, c in cells:
        row = out.setdefault(group[int(c["length"])], {"n": 0, "correct": 0, "majority": 0, "seeds": [],
                                                         "lengths": []})
        row["n"] += c["samples"]
        row["correct"] += round(c["accuracy"] * c["samples"])
        row["majority"] += round(c["majority_baseline"] * c["samples"])
        if seed not in row["seeds"]:
            row["seeds"].append(seed)
        if int(c["length"]) not in row["lengths"]:
            row["lengths"].append(int(c["length"]))
    for row in out.values():
        row["lengths"].sort()
        lo, hi = wilson_interval(row["correct"], row["n"])
        row.update(exact_match=row["correct"] / row["n"], wilson95=[round(100 * lo), round(100 * hi)],
                   majority_rate=row["majority"] / row["n"])
    return dict(sorted(out.items()))


def prior(path: Path, task: str) -> dict[str, dict[int, dict]]:
    """Models of ``task`` from an earlier record: this script's JSON (``models``) or session 16's
    ``babilong_cpu_session16.json`` layout (``tasks`` -> ``qa3`` -> model), whose rows have the same fields."""
    record = json.loads(path.read_text())
    if "models" in record:
        if record.get("task") != task:
            raise ValueError(f"{path}: holds task {record.get('task')!r}, not {task!r}")
        models = record["models"]
    else:
        short = task.removeprefix("babilong_")
        if short not in record.get("tasks", {}):
            raise ValueError(f"{path}: no task {short!r} (it has {sorted(record.get('tasks', {}))})")
        models = record["tasks"][short]
    return {name: {int(L): row for L, row in sorted(rows.items(), key=lambda kv: int(kv[0]))}
            for name, rows in models.items()}


def table(task: str, models: dict[str, dict[int, dict]]) -> str:
    lengths = sorted({L for rows in models.values() for L in rows})
    lines = [f"| {task}: model | " + " | ".join(f"{L:,}" for L in lengths) + " |",
             "| --- | " + " | ".join("---" for _ in lengths) + " |"]
    for name, rows in models.items():
        cells = [f"{100 * rows[L]['exact_match']:.0f}% ({rows[L]['wilson95'][0]}-{rows[L]['wilson95'][1]})"
                 if L in rows else "-" for L in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    first = next(iter(models.values()))
    lines.append("| majority answer | " + " | ".join(f"{100 * first[L]['majority_rate']:.0f}%" if L in first else "-"
                                                    for L in lengths) + " |")
    return "\n".join(lines)


def plot(task: str, models: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # lengths at even spacing (pairs such as 2,024 / 2,048, on and off MAC's segment grid, would overlap on a
    # length axis), each model shifted a little so that the intervals stay apart
    lengths = sorted({L for rows in models.values() for L in rows})
    where = {L: i for i, L in enumerate(lengths)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(lengths) + 2), 4))
    width = 0.5 / max(len(models), 1)
    for k, (name, rows) in enumerate(models.items()):
        Ls = sorted(rows)
        xs = [where[L] + (k - (len(models) - 1) / 2) * width for L in Ls]
        acc = [100 * rows[L]["exact_match"] for L in Ls]
        err = [[a - rows[L]["wilson95"][0] for a, L in zip(acc, Ls)],
               [rows[L]["wilson95"][1] - a for a, L in zip(acc, Ls)]]
        ax.errorbar(xs, acc, yerr=err, marker="o", capsize=3, label=name)
    first = next(iter(models.values()))
    ax.plot([where[L] for L in sorted(first)], [100 * first[L]["majority_rate"] for L in sorted(first)], "k--",
            label="majority answer")
    ax.set_xticks(range(len(lengths)), [f"{L:,}" for L in lengths], rotation=30 if len(lengths) > 5 else 0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact match (%, 95% Wilson)")
    ax.set_ylim(0, 100)
    ax.set_title(task)
    ax.legend()
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="the task name in the evaluations (e.g. babilong_qa3)")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=DIR[,DIR...]",
                    help="a model and its evaluation folders (one per seed; pooled)")
    ap.add_argument("--prior", nargs="*", default=[], metavar="JSON",
                    help="earlier records whose models of this task join the table and plot (listed first)")
    ap.add_argument("--within", type=int, default=0, metavar="TOKENS",
                    help="pool lengths at most this many tokens apart under the longest (on / off-grid pairs)")
    ap.add_argument("--note", default="", help="how the models were trained and evaluated (kept in the JSON)")
    ap.add_argument("--out", required=True, help="JSON file (the markdown table goes next to it as .md)")
    ap.add_argument("--plot", default=None, help="PNG file")
    args = ap.parse_args(argv)
    models = {}
    for path in args.prior:
        models.update(prior(Path(path), args.task))
    for spec in args.model:
        name, sep, dirs = spec.partition("=")
        if not sep or not dirs:
            raise SystemExit(f"--model {spec!r}: expected NAME=DIR[,DIR...]")
        models[name] = pooled([Path(d) for d in dirs.split(",")], args.task, args.within)
    record = {"date": date.today().isoformat(), "task": args.task, "note": args.note,
              "models": {name: {str(L): row for L, row in rows.items()} for name, rows in models.items()}}
    out = Path(args.out)
    md = table(args.task, models)
    atomic_write_text(out, json.dumps(record, indent=1))
    atomic_write_text(out.with_suffix(".md"), md + "\n")
    if args.plot:
        plot(args.task, models, Path(args.plot))
    print(md)
    return record


if __name__ == "__main__":
    main()
