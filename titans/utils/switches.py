"""The ``TITANS_*`` environment variables, declared once: what each takes, its default, what it switches.

Models, training and data are configured by the typed config (:mod:`titans.utils.config`).  These variables are
something else: switches between implementations that compute the same thing (kernel launch layouts, CUDA streams,
what the backward keeps or recomputes), kept for A/B timing on a GPU (issue 7; ``benchmarks/RESULTS.md`` section 6
says what each measured), and a test hook.  Every module reads them through :func:`switch_value` /
:func:`switch_on`, which reject a value the switch does not take with a ``ValueError`` naming the variable.  A
misspelt name would be ignored silently, so :func:`unknown_switches` lists the ``TITANS_*`` variables nothing here
declares, with the nearest declared name; the CLI and the benchmark harness warn about them
(:func:`warn_unknown_switches`).  ``titans switches`` prints the table with the values set now.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

PREFIX = "TITANS_"


@dataclass(frozen=True)
class Switch:
    """One environment variable.  ``values``: the values it takes (None: any text ``check`` accepts);
    ``default``: the value when unset or empty (None: the reader decides, as ``meaning`` says); ``expected``: what
    an error message says it expects (defaults to the values)."""

    name: str
    values: tuple[str, ...] | None
    default: str | None
    meaning: str
    expected: str = ""
    check: Callable[[str], bool] | None = None

    def accepts(self, value: str) -> bool:
        if self.values is not None:
            return value in self.values
        return self.check is None or self.check(value)

    def expectation(self) -> str:
        if self.expected:
            return self.expected
        return " or ".join(self.values) if self.values else "a value"


def _power_of_two(text: str, most: int = 32) -> bool:
    return text.isdigit() and 0 < int(text) <= most and int(text) & (int(text) - 1) == 0


ON_OFF = ("0", "1")

_DECLARED = (
    # the memory's Triton kernels (titans/core/memory/triton_kernels.py, coefficient_kernels.py)
    Switch("TITANS_TRITON_BWD", ("auto", "split", "overlap", "fused"), "auto",
           "the depth-2 memory backward: three stages launched one after another (split), in one launch (overlap), "
           "the two-pass backward (fused); auto: split where the walk runs over parts (batch 1-2), else overlap",
           "one of auto, split, overlap, fused ('auto': split where the walk runs over parts, else overlap; "
           "'split': three stages, 'overlap': the three stages in one launch, 'fused': two-pass)"),
    Switch("TITANS_TRITON_SPLIT", ON_OFF, "1",
           "two-pass memory kernels (a sequential walk, then a pass parallel over chunks); 0: single-pass"),
    Switch("TITANS_TRITON_SAVE_INNER", ("auto", "0", "1"), "auto",
           "the forward's walk stores each chunk's inner forward for the backward instead of it being recomputed "
           "(depth 2, three-stage backward); auto: only the walk alone, whose read-out runs apart (batched "
           "read-outs), so that its backward walk runs over parts"),
    Switch("TITANS_TRITON_READOUT_INNER", ON_OFF, "1",
           "the split core's read-out backward (stage 0) reads each chunk's inner forward that the forward's walk "
           "stored (TITANS_TRITON_SAVE_INNER) instead of computing it again (cross-compiled at 4 warps: 16% fewer "
           "instructions, 26% fewer local loads a thread; MAC 65536 x 1 on an H100 +0.8%); 0: it computes it"),
    Switch("TITANS_TRITON_WALK_PARTS", ("1", "2", "4", "8"), "2",
           "programs a (batch, head) for the sequential walks at depth 2 (lowered to fit the GPU)",
           "1, 2, 4 or 8 (programs a head for the walks)"),
    Switch("TITANS_TRITON_STAGE0_BLOCK", None, "0",
           "hidden units the depth-2 backward's stage 0 takes at a time (fewer live tiles, fewer spills; passes "
           "over the blocks); 0: all at once (session 44, H100: 32 slower, 64 over the shared memory at hidden 128)",
           "0 or a power of two from 16 that divides the hidden size",
           lambda v: v == "0" or _power_of_two(v, 1024)),
    Switch("TITANS_TRITON_STAGE2_BLOCK", None, "auto",
           "hidden units the depth-2 backward's stage 2 takes at a time where it reads the chunk's inner forward "
           "(fewer live tiles, no spills; two passes over the blocks); auto: 32 in the three-launch backward, whole "
           "tiles in the one launch (untimed there; a number applies to both); 0: all at once (session 44, H100: 64 "
           "over the shared memory at hidden 128)",
           "auto, 0 or a power of two from 16 that divides the hidden size",
           lambda v: v in ("auto", "0") or _power_of_two(v, 1024)),
    Switch("TITANS_TRITON_WALK_FLAGS", ("lines", "packed"), "lines",
           "where the walks' parts keep their flags: each on a 128-byte line, or side by side",
           "lines or packed"),
    Switch("TITANS_TRITON_WALK_POLL", ("loads", "atomic"), "loads",
           "how the walks' parts wait on each other's flags: spinning on plain loads, or on an atomic read",
           "loads or atomic"),
    Switch("TITANS_TRITON_WALK_CLOCK", ON_OFF, "0",
           "the walks stamp their programs' GPU clock (a benchmark diagnostic; memory grows with every launch)",
           "0 or 1 (stamp the memory walks' programs)"),
    Switch("TITANS_TRITON_AUTOTUNE", ON_OFF, "0",
           "launch the memory kernels through Triton's autotuner (long compile) instead of fixed warps"),
    Switch("TITANS_TRITON_WARPS", None, None,
           "warps for every memory kernel launch; unset: 4 or 8 by the head's size",
           "a power of two from 1 to 32", _power_of_two),
    Switch("TITANS_TRITON_PASS_WARPS", None, None,
           "warps per pass, e.g. 'stage0=16,fwd1=4' (passes: fwd0-2, bwd0-2, stage0-2, overlap)",
           "pass=warps items"),
    Switch("TITANS_TRITON_COEFFICIENTS", ON_OFF, None,
           "the chunk coefficients of Eq. 16-18 as one Triton kernel a direction; unset: on, except under "
           "TRITON_INTERPRET",
           "0 or 1 (the memory's chunk coefficients as one Triton kernel a direction)"),
    # what the backward keeps, and how weight gradients are formed (titans/utils/tensors.py, weight_grads.py)
    Switch("TITANS_RECOMPUTE_CHEAP", ON_OFF, "0",
           "recompute the memory's cheap regions (read, output norm and gate, coefficients) in the backward "
           "instead of keeping them: less memory, a little slower; read once, at import"),
    Switch("TITANS_DEFER_WEIGHT_GRADS", ON_OFF, None,
           "defer the memory blocks' weight gradients to one matmul a step (1) or not (0); unset: the config's "
           "choice (on in the wavefront)",
           "1 (defer weight gradients), 0 (do not) or unset"),
    Switch("TITANS_DEFER_PER_TOKEN", ON_OFF, "0",
           "deferred, a segment's stand-ins of its elementwise parameters broadcast over its tokens (their gradients "
           "summed over the tokens once a call, off the chain; 23% slower at MAC 65536 x 1 on an H200, session 36); "
           "0 (default): one reduction a parameter and segment"),
    Switch("TITANS_MATMUL_SM_CARVEOUT", None, None,
           "cuBLAS matmuls leave this many SMs to other streams (torch's experimental carveout); unset: none",
           "a whole number of SMs >= 0 for the matmuls to leave free", str.isdigit),
    # compilation (titans/utils/compiling.py, titans/core/models/)
    Switch("TITANS_INDUCTOR_OPTIONS", None, None,
           "a JSON object of inductor options for every compile, over the project's own; the config's "
           "training.inductor_options wins", "a JSON object of inductor options"),
    Switch("TITANS_COMPILE_MAC_SEGMENTS", ON_OFF, "1",
           "regional compilation compiles MAC's memory blocks by segment step; 0: the block whole"),
    Switch("TITANS_FUSED_GATE", ON_OFF, "1",
           "MAC's / MAG's memory gate, norm_y(y) * sigmoid(norm_m(m)), as one Triton kernel in eager code; "
           "0: PyTorch ops"),
    # the wavefront's streams (titans/training/wavefront.py)
    Switch("TITANS_WAVEFRONT_PRIORITY", ON_OFF, "1",
           "memory blocks' streams at high priority"),
    Switch("TITANS_WAVEFRONT_FFN_STREAMS", ON_OFF, "1",
           "a memory block's feed-forward on a stream of its own"),
    Switch("TITANS_WAVEFRONT_STREAM_VIEWS", ON_OFF, "1",
           "parameters several streams read (persistent tokens, tied embedding) read through one view a stream, "
           "so each stream sums its own gradients (MAC 65536 x 1 on an H100 +0.6%, session 47); 0: each block and "
           "segment's gradient accumulated into the parameter across streams"),
    Switch("TITANS_WAVEFRONT_READOUT_STREAMS", ("auto", "0", "1"), "auto",
           "MAC's segment read-outs on another stream than the segment chain; auto: where the wavefront runs on CUDA "
           "streams with 32 or more hardware queues (13-28% slower with CUDA's 8, sessions 23-33; with 32, +4.3% at "
           "MAC 65536 x 1 on an H200 in three same-machine pairs, session 42, +2.6% on an H100 in 2048-token steps and "
           "-0.7% in 4096, session 40; about 4 GB more at 65536 tokens)"),
    Switch("TITANS_WAVEFRONT_READOUT_URGENT", ON_OFF, "0",
           "with the read-outs apart, on a stream of their own at the chains' priority"),
    Switch("TITANS_WAVEFRONT_BATCHED_READOUTS", ON_OFF, "0",
           "MAC's read-outs once a wavefront call for its segments, after their chains (under CUDA graphs a different "
           "loss than eager on an H200 and an H100, sessions 37 and 40: the wavefront freed its fresh state mid-call "
           "without record_stream, fixed in session 40, verified on an H100 in session 41; the trainer compares each "
           "capture's loss with the eager step's)"),
    Switch("TITANS_WAVEFRONT_BATCHED_QUERIES", ON_OFF, "1",
           "MAC's segment inputs (the retrieval's queries and output gate, attention's queries / keys / values) once "
           "a wavefront call for its segments, before their chains"),
    Switch("TITANS_WAVEFRONT_INPUTS_LAYOUT", ON_OFF, "0",
           "with batched queries, the segments' pieces of the batched inputs hand their gradients back concatenated "
           "in the inputs' own memory order (one kernel), not contiguous and then copied by AOTAutograd into the "
           "strides the compiled inputs region traced (a second pass a tensor and call); only where that region's "
           "shapes are static (equal wavefront calls; with dynamic ones AOTAutograd wants it contiguous and copies "
           "this one instead); on an H100 no gain (-0.1% to -0.6% at MAC 65536 x 1, session 48); 0: a plain split"),
    Switch("TITANS_WAVEFRONT_INPUTS_STREAM", ON_OFF, "1",
           "with batched queries, the block's input norm and the batched inputs on a stream of their own, off the "
           "segment chain (forward and backward)"),
    # tests
    Switch("TITANS_TEST_DEVICE", ("cpu", "cuda"), "cpu",
           "tests only: the device the kernel tests run on (cuda: the GPU twin of an interpreter test)",
           "cpu or cuda"),
)

SWITCHES: dict[str, Switch] = {s.name: s for s in _DECLARED}


def switch_value(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The value of switch ``name``: the environment's (stripped), or its default when unset or empty.  A value the
    switch does not take raises ``ValueError`` ("NAME='value': expected ..."); an undeclared name, ``KeyError``."""
    switch = SWITCHES[name]
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return switch.default
    if not switch.accepts(raw):
        raise ValueError(f"{name}={raw!r}: expected {switch.expectation()}")
    return raw


def switch_on(name: str, environ: Mapping[str, str] | None = None) -> bool | None:
    """A 0 / 1 switch as a bool (None when unset and without a default: the reader's choice)."""
    if SWITCHES[name].values != ON_OFF:
        raise KeyError(f"{name} is not a 0 / 1 switch")
    value = switch_value(name, environ)
    return None if value is None else value == "1"


def unknown_switches(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The ``TITANS_*`` variables set in ``environ`` (default: this process's) that no switch declares, each with
    the nearest declared name (None when nothing is close)."""
    env = os.environ if environ is None else environ
    out = {}
    for name in sorted(env):
        if name.startswith(PREFIX) and name not in SWITCHES:
            near = difflib.get_close_matches(name, list(SWITCHES), n=1, cutoff=0.75)
            out[name] = near[0] if near else None
    return out


_WARNED: set[str] = set()


def warn_unknown_switches(environ: Mapping[str, str] | None = None,
                          report: Callable[[str], None] | None = None) -> dict[str, str | None]:
    """Tell about each variable of :func:`unknown_switches` (which nothing reads) once a name and process: through
    ``report`` (the CLI prints a line), by default a ``UserWarning``.  Returns them."""
    unknown = unknown_switches(environ)
    for name, near in unknown.items():
        if name not in _WARNED:
            _WARNED.add(name)
            if report is None:
                warnings.warn(unknown_switch_message(name, near), UserWarning, stacklevel=2)
            else:
                report(unknown_switch_message(name, near))
    return unknown


def unknown_switch_message(name: str, near: str | None) -> str:
    """What to tell a user who set ``name``, which no switch declares (``near``: the nearest declared name)."""
    hint = f"did you mean {near}?" if near else "`titans switches` lists the ones that exist"
    return f"{name} is set but no titans switch has that name, so it changes nothing; {hint}"


def switch_table(environ: Mapping[str, str] | None = None) -> list[dict]:
    """Every switch: name, the value set now (None when unset), default, values it takes, meaning; a value the
    switch would reject is reported as ``error`` instead of raised."""
    env = os.environ if environ is None else environ
    rows = []
    for s in _DECLARED:
        row = {"name": s.name, "set": env.get(s.name, "").strip() or None, "default": s.default,
               "values": list(s.values) if s.values else s.expectation(), "meaning": s.meaning}
        try:
            switch_value(s.name, env)
        except ValueError as err:
            row["error"] = str(err)
        rows.append(row)
    return rows
