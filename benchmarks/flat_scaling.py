"""Issue 7's flat-scaling target from harness results: each training row's tokens/s against a reference row's.

The target: MAC's training tokens/s at 65536 x 1 at least 0.9x its rate at 4096 x 8, timed on the same machine.
Every GPU call of ``benchmarks/gpu_session.sh`` writes one ``benchmarks/harness.py`` JSON per row; this reads any
number of them and prints one markdown table - row, shape, tokens/s, peak GB, loss first -> last, the ``TITANS_*``
switches the row ran with (the harness records them), whether its CUDA-graph capture computed the eager step's loss
(the harness's ``capture_check``), and the ratio to the reference - and writes it as JSON and as a bar chart (PNG)
with the 0.9x line.  A row whose capture computed another loss timed another computation, and a row whose memory
kernels fell back to the PyTorch loop (the harness's ``memory_fallbacks``) timed other code than its switches
asked for: neither meets the target, nor serves as a reference.

    python benchmarks/flat_scaling.py /tmp/call72/gpu_results/h_*.json --out benchmarks/results/flat_part72

A row's reference is the row at ``--reference-shape`` (default 4096x8) of the same model run with the same
switches, else the default one: ``--reference FILE``'s row, or the first run with no switches.  A row that failed
(the harness's ``error``) is listed with its error and no ratio.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from titans.utils.io import atomic_write_text, atomic_write_with

TARGET = 0.9


def load_rows(paths: list[str]) -> list[dict]:
    """The training rows of harness JSONs: file stem, model, shape, tokens/s, peak GB, losses, switches, error, and
    whether the row's capture agreed with the eager step (None: not checked)."""
    rows = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"{path}: not a harness result ({err})") from None
        if "train" not in data:
            raise SystemExit(f"{path}: no 'train' rows (not a benchmarks/harness.py result)")
        switches = {k: v for k, v in data.get("env", {}).items() if k != "TITANS_TRITON_AUTOTUNE" or v != "0"}
        for r in data["train"]:
            rows.append({"name": Path(path).stem, "path": str(path), "model": r["model"],
                         "shape": f"{r['seq_len']}x{r['batch']}", "tokens_per_s": r.get("train_tokens_per_s"),
                         "peak_gb": r.get("train_peak_gb"), "loss_first": r.get("train_loss_first"),
                         "loss_last": r.get("train_loss_last"), "switches": switches, "error": r.get("error"),
                         "device": data.get("device"), "date": data.get("date"),
                         # the layout the wavefront's default resolved to (recorded since session 42; None:
                         # not a wavefront row, or older): shown, not matched on (the 4096 x 8 row has none)
                         "readouts_apart": (data.get("defaults") or {}).get("wavefront_readouts_apart"),
                         # memory shapes whose Triton kernels failed and ran the PyTorch loop (since session 44)
                         "fallbacks": data.get("memory_fallbacks") or [],
                         "capture_agrees": (r.get("capture_check") or {}).get("agrees"),
                         "capture_rel_diff": (r.get("capture_check") or {}).get("rel_diff")})
    return rows


def _timed_what_it_says(row: dict) -> bool:
    """Whether the row timed the computation it names: its capture (if checked) computed the eager loss, and no
    memory shape fell back to the PyTorch loop."""
    return row["capture_agrees"] is not False and not row["fallbacks"]


def with_ratios(rows: list[dict], reference_shape: str = "4096x8", reference: str | None = None) -> dict:
    """``rows`` with ``ratio`` = tokens/s over their reference row's, and the references used.  A row's reference:
    the row at ``reference_shape`` of the same model run with the same switches (a switch that changes both shapes,
    such as what the backward keeps, is compared like with like), else the model's default reference - the
    ``reference`` file's row if given, else the first row at that shape run with no switches, else the first."""
    candidates = [r for r in rows if r["shape"] == reference_shape and not r["error"] and r["tokens_per_s"]
                  and _timed_what_it_says(r)]
    defaults: dict[str, dict] = {}
    for r in candidates:
        if reference is not None and Path(r["path"]) != Path(reference) and r["name"] != reference:
            continue
        if reference is None and r["switches"] and any(not c["switches"] for c in candidates
                                                       if c["model"] == r["model"]):
            continue
        defaults.setdefault(r["model"], r)
    out = []
    for r in rows:
        ref = next((c for c in candidates if c["model"] == r["model"] and c["switches"] == r["switches"]), None)
        ref = ref or defaults.get(r["model"])
        ok = ref is not None and not r["error"] and r["tokens_per_s"]
        out.append(dict(r, reference=ref["name"] if ref is not None else None,
                        ratio=r["tokens_per_s"] / ref["tokens_per_s"] if ok else None,
                        meets=(r["tokens_per_s"] / ref["tokens_per_s"] >= TARGET and _timed_what_it_says(r))
                        if ok else None))
    return {"target": TARGET, "reference_shape": reference_shape,
            "references": {m: r["name"] for m, r in defaults.items()}, "rows": out}


def markdown(result: dict) -> str:
    lines = ["| row | model | shape | tokens/s | peak GB | loss first -> last | switches | capture == eager | ratio to "
             f"{result['reference_shape']} |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if r["error"]:
            lines.append(f"| {r['name']} | {r['model']} | {r['shape']} | failed: {r['error'][:80]} | | | | | |")
            continue
        capture = ("" if r["capture_agrees"] is None else "yes" if r["capture_agrees"] else
                   f"NO ({r['capture_rel_diff']:.1e} relative)")
        loss = (f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}"
                if r["loss_first"] is not None and r["loss_last"] is not None else "")
        switches = " ".join(f"{k}={v}" for k, v in sorted(r["switches"].items())) or "defaults"
        if r.get("readouts_apart") is not None and "TITANS_WAVEFRONT_READOUT_STREAMS" not in r["switches"]:
            switches += f" (read-outs {'apart' if r['readouts_apart'] else 'on the chain'} by default)"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}x" + (" (met)" if r["meets"] else "")
        if r["fallbacks"]:
            ratio += " (memory fell back to PyTorch: " + ", ".join("x".join(map(str, s)) for s in r["fallbacks"]) + ")"
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        lines.append(f"| {r['name']} | {r['model']} | {r['shape']} | {r['tokens_per_s']:,.0f} | {peak} | {loss} | "
                     f"{switches} | {capture} | {ratio} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bars of tokens/s by row, the reference's 0.9x as a line (per model: the first model's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r["error"] and r["tokens_per_s"]]
    common = os.path.commonprefix([r["name"] for r in rows]) if len(rows) > 1 else ""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows)), 4.5))
    is_ref = [r["shape"] == result["reference_shape"] for r in rows]
    bars = ax.bar(range(len(rows)), [r["tokens_per_s"] for r in rows],
                  color=["tab:gray" if ref else "tab:green" if r["meets"] else "tab:blue"
                         for r, ref in zip(rows, is_ref)])
    for bar, r, ref in zip(bars, rows, is_ref):
        if r["ratio"] is not None and not ref:
            ax.annotate(f"{r['ratio']:.3f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r['name'][len(common):] or r['name']}\n{r['shape']}" for r in rows],
                  rotation=20, ha="right", fontsize=7)
    for model, name in result["references"].items():
        ref = next(r for r in rows if r["name"] == name and r["model"] == model)
        ax.axhline(TARGET * ref["tokens_per_s"], color="tab:red", ls="--",
                   label=f"{TARGET}x {model} at {result['reference_shape']}")
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"issue 7: flat scaling ({common.rstrip('_') or 'harness rows'})", fontsize=9)
    if result["references"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="benchmarks/harness.py JSON files")
    ap.add_argument("--reference-shape", default="4096x8", help="SEQxBATCH of the reference rows")
    ap.add_argument("--reference", default=None, help="the file (path or stem) whose row is the reference")
    ap.add_argument("--out", default=None, help="path prefix: writes PREFIX.json, PREFIX.md and PREFIX.png")
    args = ap.parse_args(argv)
    result = with_ratios(load_rows(args.results), args.reference_shape, args.reference)
    table = markdown(result)
    print(table)
    if args.out:
        prefix = Path(args.out)
        atomic_write_text(prefix.with_suffix(".json"), json.dumps(result, indent=1))
        atomic_write_text(prefix.with_suffix(".md"), table + "\n")
        plot(result, prefix.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
