"""The training loop (nanoGPT-style, plain and readable).

AdamW with weight-decay groups, linear warm-up + cosine decay, gradient clipping and accumulation,
bf16 autocast on CUDA / float32 on CPU, optional ``torch.compile``, periodic evaluation (loss,
perplexity, bits per byte), atomic checkpoints with exact resume, SIGTERM / Ctrl-C saving a checkpoint,
a progress bar with tokens/s and ETA, TensorBoard scalars and a JSONL metrics file.  Under ``torchrun``
the same loop runs with torch DDP (or FSDP2) and a rank-sliced deterministic batcher.
"""

from __future__ import annotations

import gc
import json
import math
import signal
import time
import warnings
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import torch

from titans.core.models import build_model
from titans.data.dataloader import TokenBatcher, build_data, eval_batches
from titans.training.distributed import DistInfo, init_distributed, wrap_model
from titans.training.optimizer import build_optimizer, build_scheduler
from titans.training.wavefront import wavefront_loss
from titans.utils.checkpoint import (
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from titans.utils.compiling import compile_blocks, compile_fn
from titans.utils.config import TitansConfig, config_from_dict, save_config
from titans.utils.switches import warn_unknown_switches
from titans.utils.tensors import gc_paused, side_stream, widen_hardware_queues


def pick_device(name: str, dist: DistInfo, what: str = "training.device") -> torch.device:
    """``auto`` (this rank's GPU where CUDA is available, else the CPU) or a device name; a name that is not a
    device, or CUDA on a machine without it, raises ``ValueError`` naming ``what`` (the setting it came from)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank)
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what}: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what}: {name!r} asks for CUDA, and this machine has no CUDA device")
    return device


def pick_dtypes(precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(parameter dtype, autocast dtype or None)."""
    if precision == "fp64":
        return torch.float64, None
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.float32, torch.bfloat16
    return torch.float32, None


@torch.no_grad()
def evaluate_loss(model, dataset, seq_len: int, batch_size: int, max_batches: int, device, amp_dtype,
                  bytes_per_token: float = 1.0) -> dict:
    """Mean next-token loss over deterministic validation windows; perplexity and bits per byte."""
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(dataset, seq_len, batch_size, max_batches):
        batch = batch.to(device)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        with ctx:
            loss = model(batch, labels=batch, use_cache=False).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    model.train()
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)), "val_bpb": loss / math.log(2) / bytes_per_token}


class LossFn(torch.nn.Module):
    """``(ids, labels) (B, T) -> mean next-token loss`` of ``model``, under autocast when ``amp_dtype`` is set.

    The unit captured by :func:`graphed_loss` (autocast's weight cache is off, as CUDA graphs require).
    ``wavefront``: the forward segment-major with a CUDA stream per block (:mod:`titans.training.wavefront`, the same
    loss and gradients), ``wavefront_step`` tokens a block step (default: the model's window).
    """

    def __init__(self, model: torch.nn.Module, amp_dtype: torch.dtype | None = None, wavefront: bool = False,
                 wavefront_step: int | None = None) -> None:
        super().__init__()
        self.model, self.amp_dtype, self.wavefront, self.wavefront_step = model, amp_dtype, wavefront, wavefront_step

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ctx = (torch.autocast(ids.device.type, dtype=self.amp_dtype, cache_enabled=False)
               if self.amp_dtype else nullcontext())
        with ctx:
            if self.wavefront:
                return wavefront_loss(self.model, ids, labels, segment=self.wavefront_step)
            return self.model(ids, labels=labels, use_cache=False).loss


# how far (relative) a captured step's loss may lie from the eager warm-up's on the same batch: the replay runs the
# same kernels on the same inputs, so the two agree to rounding (the 6 layouts of tests/test_wavefront.py's graphed
# test that pass agree within 1e-5); session 37's capture of MAC's batched read-outs was off by 4.2e-5
CAPTURE_LOSS_RTOL = 1e-5


def capture_agreement(eager: list[float], replayed: float, rtol: float = CAPTURE_LOSS_RTOL) -> dict:
    """Whether a captured step computes what the eager step computes, judged by the loss on one batch: ``eager``,
    the warm-up passes' losses (on that batch, in order); ``replayed``, the captured forward's.  Returns
    ``{"eager", "replayed", "rel_diff", "eager_spread", "tolerance", "agrees"}``: the last eager loss, the
    replayed one, their relative difference, the eager losses' own relative spread (non-deterministic kernels, if
    any), and whether the difference is within ``max(rtol, 4 x spread)``.  A loss that is not finite on either side
    does not agree."""
    if not eager:
        raise ValueError("capture_agreement: no eager losses to compare with (warmup_iters=0)")
    ref = eager[-1]
    scale = max(abs(ref), 1e-30)
    spread = (max(eager) - min(eager)) / scale
    diff = abs(replayed - ref) / scale
    tolerance = max(rtol, 4 * spread)
    finite = math.isfinite(ref) and math.isfinite(replayed) and math.isfinite(spread)
    return {"eager": ref, "replayed": replayed, "rel_diff": diff, "eager_spread": spread, "tolerance": tolerance,
            "agrees": bool(finite and diff <= tolerance)}


def graphed_loss(model: torch.nn.Module, sample: torch.Tensor, amp_dtype: torch.dtype | None,
                 warmup_iters: int = 3, wavefront: bool = False, wavefront_step: int | None = None,
                 check: bool = True):
    """Forward + backward of :class:`LossFn` captured as CUDA graphs for (ids, labels) shaped like ``sample``.

    Calling the result copies the batch into the graph's static input and replays the forward graph;
    ``.backward()`` replays the backward graph, accumulating into ``.grad`` like eager autograd.
    ``warmup_iters`` eager forward + backward passes run first (they leave ``.grad`` untouched).

    ``check``: the captured forward is replayed once on ``sample`` and its loss compared with the warm-up's
    (:func:`capture_agreement`; needs ``warmup_iters >= 1``); the result is the returned module's
    ``capture_check`` (None unchecked), and a disagreement warns.  A capture can compute something else than the
    eager step without failing: MAC's batched read-outs (``TITANS_WAVEFRONT_BATCHED_READOUTS=1``) did on an H200
    (session 37: the wavefront freed its fresh state mid-call without ``record_stream``, fixed in session 40), and
    the trainer then trains eagerly (:func:`train`).  The check sees the forward only: a capture
    whose backward alone went wrong passes it (the backward's non-deterministic kernels - attention's, the
    embedding's - would make a gradient comparison a matter of tolerances; the GPU tests compare gradients).

    PyTorch warns once that "The AccumulateGrad node's stream does not match the stream of the node that produced
    the incoming gradient": ``make_graphed_callables`` keeps the captured forward's outputs, and with them the
    parameters' AccumulateGrad nodes its capture made on the capture's stream; every later step accumulates through
    those from the caller's stream, one event wait a parameter, outside the graphs.  Harmless here.  Making the
    nodes on the caller's stream beforehand would silence it, but would also route the capture's own gradients
    into the caller's stream mid-capture, which the warning itself says breaks a capture on the default stream.
    """
    if sample.device.type != "cuda":
        raise ValueError("training.cuda_graphs=true needs a CUDA device")
    fn, args = LossFn(model, amp_dtype, wavefront, wavefront_step), (sample, sample.clone())
    # Warm up here (lazy initialisation, kernel compilation and autotuning must not happen inside a capture),
    # then give the warm-up's cached blocks back to the driver: the capture allocates from a private pool, so
    # otherwise a step's activation memory is reserved twice (MAC 65536 x 1: 43 GB reserved with the warm-up's
    # cache kept, on an 80 GB GPU that also holds anything else the process reserved).
    params = tuple(p for p in fn.parameters() if p.requires_grad)
    torch.cuda.synchronize()
    eager = []
    with torch.cuda.stream(side_stream(sample.device, "graph-warmup")):  # a stream per call leaks a cuBLAS workspace
        for _ in range(warmup_iters):
            loss = fn(*args)
            torch.autograd.grad(loss, params, allow_unused=True)  # leaves .grad untouched
            eager.append(loss.detach().float())
            del loss
    torch.cuda.synchronize()
    with gc_paused():  # earlier captures' graphs are destroyed on entry, before their memory goes back, not inside
        torch.cuda.empty_cache()
        graphed = torch.cuda.make_graphed_callables(fn, args, num_warmup_iters=0, allow_unused_input=True)
    graphed.capture_check = None
    if check and eager:
        with torch.no_grad():  # the forward graph's replay alone (no autograd node: .grad untouched)
            replayed = float(graphed(*args))
        graphed.capture_check = report = capture_agreement([float(x) for x in eager], replayed)
        if not report["agrees"]:
            warnings.warn(f"CUDA graphs: the captured step's loss {replayed:.7g} differs from the eager step's "
                          f"{report['eager']:.7g} on the same batch (relative {report['rel_diff']:.2e}, tolerance "
                          f"{report['tolerance']:.1e}): the graphs compute something else than the eager step",
                          RuntimeWarning, stacklevel=2)
    return graphed


class _LMBatches:
    """Plain language modelling: labels are the inputs."""

    def __init__(self, batcher: TokenBatcher) -> None:
        self.batcher = batcher

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.batcher.batch(step)
        return ids, ids


def make_batcher(cfg: TitansConfig, train_ds, tokenizer, dist: DistInfo):
    """``batch(step) -> (ids, labels)``: language modelling, or the LM + long-context task mixture."""
    d = cfg.data
    if not d.tasks or d.task_fraction == 0:
        return _LMBatches(TokenBatcher(train_ds, d.seq_len, cfg.training.batch_size, d.seed, dist.rank,
                                       dist.world_size))
    from titans.data.tasks import Haystack
    from titans.data.tasks.mixture import TaskMixtureBatcher

    hay = Haystack(d.haystack_source or d.source, tokenizer, split="train", text_field=d.text_field)
    return TaskMixtureBatcher(train_ds, tokenizer, hay, d.tasks, d.seq_len, cfg.training.batch_size, d.seed,
                              dist.rank, dist.world_size, d.task_fraction, placement=d.task_placement,
                              segment=cfg.model.window)


class _StopFlag:
    """Set by SIGTERM / SIGINT; the loop finishes the current step, saves and exits."""

    def __init__(self) -> None:
        self.stop = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _agree(flag: bool, dist: DistInfo, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (single process: ``flag``)."""
    if dist.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def clipped_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                 skip_nonfinite: bool = True) -> tuple[float, bool]:
    """Clip the gradients (``grad_clip`` > 0) and step, unless their norm is NaN / inf and ``skip_nonfinite``:
    then drop them, so one bad batch cannot poison the weights and the optimiser's moments.  Under DDP the
    gradients are already all-reduced, so every rank takes the same decision.  Returns (norm, stepped)."""
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf")))
    stepped = math.isfinite(norm) or not skip_nonfinite
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, stepped


def train(cfg: TitansConfig, resume: bool = False, progress: bool | None = None) -> dict:
    """Train with ``cfg``; returns a summary (final losses, paths).  See the module docstring.

    With ``training.curriculum`` set, runs its stages one after another (:func:`train_curriculum`).
    """
    warn_unknown_switches()  # a misspelt TITANS_* switch would otherwise change nothing without a word
    if cfg.training.wavefront:  # (a curriculum's stages share it)
        widen_hardware_queues()  # before CUDA starts: the wavefront's streams, each on a hardware queue of its own
    if cfg.training.curriculum:
        return train_curriculum(cfg, resume, progress)
    return _train_run(cfg, resume, progress)


def curriculum_stage_configs(cfg: TitansConfig) -> list[TitansConfig]:
    """The plain (curriculum-free) run config of every stage of ``cfg.training.curriculum``.

    Stage i trains in ``OUT_DIR/stages/<i>_seq<seq_len>``, the last one in ``OUT_DIR`` itself, so the run
    folder holds the final model like any other run.  ``init_from`` of the stages is set by
    :func:`train_curriculum` (the first keeps ``training.init_from``).
    """
    out = Path(cfg.training.out_dir)
    stages = cfg.training.curriculum
    configs = []
    for i, st in enumerate(stages):
        data = cfg.model_dump(mode="json")
        tr = data["training"]
        tr["curriculum"] = []
        tr["out_dir"] = str(out if i == len(stages) - 1 else out / "stages" / f"{i}_seq{st.seq_len}")
        for key in ("batch_size", "max_steps", "max_time_s", "lr", "warmup_steps"):
            if getattr(st, key) is not None:
                tr[key] = getattr(st, key)
        data["data"]["seq_len"] = st.seq_len
        if st.tasks is not None:
            data["data"]["tasks"] = st.tasks
        elif i > 0 and stages[i - 1].tasks is not None and stages[i - 1].tasks != cfg.data.tasks:
            # the documented rule, but easy to miss: a BABILong run on the niah config trained S-NIAH from its second
            # stage this way (benchmarks/RESULTS.md 4u)
            warnings.warn(f"training.curriculum[{i}] sets no tasks: it trains on data.tasks={cfg.data.tasks}, not on "
                          f"the previous stage's {stages[i - 1].tasks}", UserWarning, stacklevel=2)
        configs.append(config_from_dict(data, f"training.curriculum[{i}]"))
    return configs


def train_curriculum(cfg: TitansConfig, resume: bool = False, progress: bool | None = None) -> dict:
    """Run the stages of ``cfg.training.curriculum`` in order, each from the previous stage's final weights
    (``training.init_from``) with a fresh optimizer, schedule and step count.

    ``OUT_DIR/curriculum.json`` records every finished stage (written atomically after each), so with
    ``resume`` finished stages are skipped and a stage stopped part-way continues from its own checkpoint.
    A stage stopped by SIGTERM ends the whole run (not marked finished).  Returns the last stage's summary
    with ``step``, ``tokens_seen`` and ``skipped_steps`` summed over the stages, ``time_limited`` if any
    stage hit its time limit, and ``stages``: the summary of each.
    """
    from titans.utils.io import atomic_write_text

    dist = init_distributed(cfg.training)  # the stages' own calls find the process group already set up
    out = Path(cfg.training.out_dir)
    record_path = out / "curriculum.json"
    configs = curriculum_stage_configs(cfg)
    record = {"config": cfg.model_dump(mode="json"), "stages": []}
    if resume and record_path.is_file():
        try:
            done = json.loads(record_path.read_text())["stages"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{record_path}: not a curriculum record ({e}); remove it to start over") from None
        for st, scfg in zip(done, configs):
            if st.get("seq_len") != scfg.data.seq_len or st.get("out_dir") != scfg.training.out_dir:
                raise ValueError(f"{record_path}: finished stage {st.get('stage')} (rows of {st.get('seq_len')} "
                                 f"tokens in {st.get('out_dir')}) is not stage {st.get('stage')} of "
                                 "training.curriculum now; resume with the curriculum it was started with")
        if len(done) > len(configs):
            raise ValueError(f"{record_path}: records {len(done)} finished stages, training.curriculum has "
                             f"{len(configs)}")
        record["stages"] = done
    prev = cfg.training.init_from
    summaries = []
    for i, scfg in enumerate(configs):
        sdir = Path(scfg.training.out_dir)
        if i < len(record["stages"]):  # finished before a resume
            summaries.append(record["stages"][i]["summary"])
            prev = str(sdir)
            continue
        scfg = scfg.model_copy(update={"training": scfg.training.model_copy(update={"init_from": prev})})
        partial = resume and (sdir / "checkpoints" / "latest").is_file()
        s = _train_run(scfg, resume=partial, progress=progress, data_cache=out.parent / "data_cache")
        # the stage's tasks in its record: a stage without its own takes the run's data.tasks, not the previous
        # stage's (a BABILong curriculum on the niah config once trained S-NIAH from its second stage unnoticed)
        s = {**s, "stage": i, "seq_len": scfg.data.seq_len, "tasks": list(scfg.data.tasks)}
        summaries.append(s)
        if s["interrupted"]:
            break
        record["stages"].append({"stage": i, "seq_len": scfg.data.seq_len, "out_dir": str(sdir), "summary": s})
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record_path, json.dumps(record, indent=2))
        prev = str(sdir)
    last = summaries[-1]
    return {**last, "step": sum(s["step"] for s in summaries),
            "tokens_seen": sum(s["tokens_seen"] for s in summaries),
            "skipped_steps": sum(s.get("skipped_steps") or 0 for s in summaries),
            "time_limited": any(s.get("time_limited") for s in summaries),
            "interrupted": bool(last.get("interrupted")), "stages": summaries}


def _train_run(cfg: TitansConfig, resume: bool = False, progress: bool | None = None,
               data_cache: Path | None = None) -> dict:
    """One run with the settings of ``cfg`` (its curriculum, if any, is not looked at)."""
    dist = init_distributed(cfg.training)
    device = pick_device(cfg.training.device, dist)
    param_dtype, amp_dtype = pick_dtypes(cfg.training.precision, device)
    out_dir = Path(cfg.training.out_dir)
    tc = cfg.training
    torch.manual_seed(tc.seed)

    # rank 0 prepares (and caches) the shards while the other ranks wait, so they never race on them
    if dist.world_size > 1 and not dist.is_main:
        torch.distributed.barrier()
    train_ds, val_ds, tokenizer = build_data(cfg.data, data_cache or out_dir.parent / "data_cache",
                                             progress=dist.is_main and cfg.logging.progress)
    if dist.world_size > 1 and dist.is_main:
        torch.distributed.barrier()
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    model = build_model(cfg.model).set_activation_checkpointing(tc.activation_checkpointing)
    model.set_weight_grad_deferral(tc.defer_weight_grads)
    model = model.to(device=device, dtype=param_dtype)
    optimizer = build_optimizer(model, tc, device)
    scheduler = build_scheduler(optimizer, tc)
    start_step, tokens_seen = 0, 0
    if resume:
        state = load_checkpoint(resolve_checkpoint(out_dir), model, optimizer, scheduler)
        start_step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        restore_rng_state(state["rng"])
    elif tc.init_from:
        # weights only; shapes are checked key by key (a different window or gate start is allowed: the
        # architecture's parameters are the same)
        load_weights(model, resolve_checkpoint(tc.init_from) / "model.safetensors")
    if tc.compile and tc.compile_scope == "blocks":
        compile_blocks(model, **_options(tc))  # in place, before any wrapping (names unchanged for checkpoints, FSDP)
    run_model = wrap_model(model, cfg.training, dist, device)
    if tc.compile and tc.compile_scope == "model":
        run_model = compile_fn(run_model, **_options(tc))
    micro = tc.batch_size // tc.grad_accum
    batcher = make_batcher(cfg, train_ds, tokenizer, dist)
    if tc.wavefront and dist.world_size > 1:
        # DDP / FSDP hook into the wrapper's forward, which the segment-major loop does not call
        raise ValueError("training.wavefront: single-process runs only")
    loss_fn = LossFn(run_model, amp_dtype, tc.wavefront, tc.wavefront_step)
    graphs = None  # with training.cuda_graphs, the summary's account of them: used or not, why not, the check
    if tc.cuda_graphs:
        # with regional compilation the blocks compile during graphed_loss's eager warm-up, before the capture
        # (benchmarks/RESULTS.md section 6, session 15: MAC 4096 x 8 on an H200, 215K -> 307K tokens/s); the whole
        # model compiled under a capture was never measured
        if dist.world_size > 1 or (tc.compile and tc.compile_scope != "blocks"):
            raise ValueError("training.cuda_graphs: single-process runs only, and with training.compile only "
                             "together with training.compile_scope=blocks")
        try:
            graphed = graphed_loss(run_model, batcher.batch(start_step)[0][:micro].to(device), amp_dtype,
                                   wavefront=tc.wavefront, wavefront_step=tc.wavefront_step)
        except RuntimeError as e:
            # a capture can fail where the eager step works (seen once for a MAL stage of 16K-token rows among
            # eight processes under MPS, benchmarks/RESULTS.md 4o): keep training, without graphs, rather than
            # lose the run; a CUDA error that is sticky fails the next eager step anyway
            warnings.warn(f"training.cuda_graphs: the CUDA graph capture failed ({str(e).splitlines()[0]}); this "
                          "run continues eagerly", RuntimeWarning, stacklevel=2)  # loss_fn: still the eager one
            graphs = {"used": False, "why_not": f"the capture failed: {str(e).splitlines()[0]}", "capture_check": None}
        else:
            check = graphed.capture_check
            graphs = {"used": True, "why_not": None, "capture_check": check}
            if check is not None and not check["agrees"]:
                # a capture that computes another loss than the eager step would train another model: the eager
                # step is the reference, so the run goes on with it (loss_fn: still the eager one)
                warnings.warn(f"training.cuda_graphs: the captured step's loss differs from the eager step's "
                              f"(relative {check['rel_diff']:.2e}); this run continues eagerly", RuntimeWarning,
                              stacklevel=2)
                graphs.update(used=False, why_not="the captured step's loss differs from the eager step's")
                graphed = None  # its graphs and their memory pool go (they sit in reference cycles)
                gc.collect()
                torch.cuda.empty_cache()
            else:
                loss_fn = graphed
    bpt = _bytes_per_token(val_ds, tokenizer)

    writer = None
    metrics_file = None
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        if cfg.logging.jsonl:
            metrics_file = (out_dir / "metrics.jsonl").open("a")
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                writer = None

    def log(record: dict) -> None:
        if not dist.is_main:
            return
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, record["step"])

    show = cfg.logging.progress if progress is None else progress
    from tqdm.auto import tqdm

    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not (show and dist.is_main), unit="step",
               dynamic_ncols=True)
    tokens_per_step = tc.batch_size * cfg.data.seq_len * dist.world_size
    last_eval: dict = {}
    step = start_step
    t_last = time.perf_counter()
    skipped_steps = consecutive_skips = 0
    run_model.train()
    interrupted = time_up = False
    t_start = time.perf_counter()
    recent_losses: deque[float] = deque(maxlen=50)  # the summary's train_loss: mean of the last 50 steps
    with _StopFlag() as flag:
        while step < tc.max_steps:
            batch, labels = (t.to(device) for t in batcher.batch(step))
            loss_sum = 0.0
            for i in range(tc.grad_accum):
                mb, mlab = batch[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro]
                sync = nullcontext()
                if dist.world_size > 1 and i < tc.grad_accum - 1 and hasattr(run_model, "no_sync"):
                    sync = run_model.no_sync()
                with sync:
                    loss = loss_fn(mb, mlab) / tc.grad_accum
                loss.backward()
                loss_sum += float(loss.detach())
            grad_norm, stepped = clipped_step(model, optimizer, tc.grad_clip, tc.skip_nonfinite)
            if stepped:
                consecutive_skips = 0
            else:
                skipped_steps += 1
                consecutive_skips += 1
                warnings.warn(f"step {step + 1}: non-finite gradients (norm {grad_norm}), update skipped "
                              f"({skipped_steps} so far)", RuntimeWarning, stacklevel=1)
                if consecutive_skips > tc.max_consecutive_skips:
                    raise RuntimeError(f"training diverged: {consecutive_skips} consecutive steps with non-finite "
                                       f"gradients up to step {step + 1} (training.max_consecutive_skips="
                                       f"{tc.max_consecutive_skips}); lower training.lr or model.memory_max_lr")
            scheduler.step()
            step += 1
            tokens_seen += tokens_per_step
            if dist.world_size > 1:
                t = torch.tensor([loss_sum], device=device)
                torch.distributed.all_reduce(t)
                loss_sum = float(t) / dist.world_size
            now = time.perf_counter()
            tok_s = tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            recent_losses.append(loss_sum)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            record = {"step": step, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "tokens": tokens_seen,
                      "tokens_per_s": tok_s, "grad_norm": grad_norm}
            if skipped_steps:
                record["skipped_steps"] = skipped_steps
            # every rank must agree to stop together, so the rank-0 clock decides
            time_up = tc.max_time_s is not None and _agree(now - t_start > tc.max_time_s, dist, device)
            last = step == tc.max_steps or time_up
            if step % cfg.logging.log_every == 0 or last:
                log(record)
            if step % tc.eval_every == 0 or last:
                last_eval = evaluate_loss(model, val_ds, cfg.data.seq_len, micro, tc.eval_batches, device,
                                          amp_dtype, bpt)
                log({"step": step, **last_eval})
                if dist.is_main:
                    bar.write(f"step {step}: val_loss {last_eval['val_loss']:.4f}  ppl {last_eval['val_ppl']:.2f}  "
                              f"bpb {last_eval['val_bpb']:.4f}")
            if dist.is_main and (step % tc.ckpt_every == 0 or last or flag.stop):
                save_checkpoint(out_dir, step, model, optimizer, scheduler, {"tokens_seen": tokens_seen}, cfg,
                                keep=tc.keep_checkpoints)
            if flag.stop:
                interrupted = True
                break
            if time_up:
                if dist.is_main:
                    bar.write(f"training.max_time_s={tc.max_time_s:g} reached at step {step}: checkpoint saved, "
                              "stopping")
                break
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    if writer is not None:
        writer.close()
    if dist.world_size > 1:
        torch.distributed.barrier()
    if tc.cuda_graphs:  # this run's graphs sit in reference cycles: free them (and their memory pools) here
        loss = loss_fn = None  # noqa: F841 - the last step's loss holds the backward graph's nodes too
        gc.collect()
    summary = {"step": step, "tokens_seen": tokens_seen, "interrupted": interrupted, "time_limited": time_up,
               "out_dir": str(out_dir),
               "skipped_steps": skipped_steps,
               "checkpoint": str(out_dir / "checkpoints"), "metrics": str(out_dir / "metrics.jsonl"),
               "tensorboard": str(out_dir / "tensorboard"),
               "train_loss": sum(recent_losses) / len(recent_losses) if recent_losses else None, **last_eval}
    if graphs is not None:
        summary["cuda_graphs"] = graphs
    return summary


def _options(tc) -> dict:
    """compile_fn / compile_blocks keyword arguments for ``training.inductor_options`` (none when empty)."""
    return {"options": dict(tc.inductor_options)} if tc.inductor_options else {}


def _bytes_per_token(val_ds, tokenizer, sample_tokens: int = 100_000) -> float:
    """UTF-8 bytes per token on validation text (1 for the byte tokenizer) for bits-per-byte."""
    if tokenizer.to_spec().get("kind") == "byte":
        return 1.0
    n = min(len(val_ds), sample_tokens)
    ids = val_ds.get(0, n).tolist()
    return max(len(tokenizer.decode(ids).encode("utf-8")), 1) / max(n, 1)
