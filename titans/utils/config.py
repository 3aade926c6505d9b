"""The one typed configuration schema of the project.

Every component (model, data, trainer, logging, memory sessions) reads its settings from
:class:`TitansConfig`.  YAML files in ``titans/configs`` are validated against it on load:
an unknown key, a wrong type or an impossible value raises :class:`ConfigError` naming the
key and the file.  Command-line overrides use dotted keys (``training.lr=3e-4``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VARIANTS = ("mac", "mag", "mal", "lmm", "transformer", "swa")
MEMORY_VARIANTS = ("mac", "mag", "mal", "lmm")
# what a training step recomputes in its backward instead of keeping (``training.activation_checkpointing``)
ActivationCheckpointing = Literal["none", "memory", "full"]
ACTIVATION_CHECKPOINTING = get_args(ActivationCheckpointing)


def naive_cannot_recompute(mode: str) -> str:
    """The error for activation checkpointing over the per-token reference memory (config check and model setter)."""
    return (f"training.activation_checkpointing={mode} cannot recompute model.memory_backend=naive (the per-token "
            "reference takes its inner gradients with torch.func, which checkpointing's saved-tensor hooks do not "
            "support): choose another backend, or 'none'")


class ConfigError(ValueError):
    """A configuration problem; the message names the key and, when known, the file."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Architecture of a :class:`titans.core.models.TitansLM`.

    ``window`` is the sliding-window length for MAG / MAL / SWA and the segment length C for MAC.
    ``memory_layers`` lists the (0-based) layers that carry a neural memory; ``None`` means every
    layer.  Variants ``transformer`` and ``swa`` carry no memory whatever this says.
    """

    variant: Literal["mac", "mag", "mal", "lmm", "transformer", "swa"] = "mac"
    vocab_size: int = Field(256, ge=2)
    dim: int = Field(256, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int | None = Field(None, ge=1, description="GQA key/value heads; None = heads")
    window: int = Field(128, ge=1)
    persistent_tokens: int = Field(4, ge=0)
    ffn_mult: float = Field(4.0, gt=0, description="SwiGLU hidden width = round(2/3 * ffn_mult * dim)")
    rope_theta: float = Field(10000.0, gt=0)
    qk_norm: bool = False
    norm_eps: float = Field(1e-6, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    attention_backend: Literal["auto", "reference", "sdpa", "blocked", "flex"] = "auto"

    memory_layers: list[int] | None = None
    memory_heads: int | None = Field(None, ge=1, description="None = heads")
    memory_depth: int = Field(2, ge=1)
    memory_expansion: float = Field(2.0, gt=0, description="hidden width of the memory MLP / head dim")
    memory_activation: Literal["silu", "gelu", "relu", "tanh", "identity"] = "silu"
    memory_residual: bool = True
    memory_chunk_size: int = Field(16, ge=1)
    memory_conv_kernel: int = Field(4, ge=0, description="0 disables the causal depthwise convolution")
    memory_momentum: bool = True
    memory_weight_decay: bool = True
    memory_max_lr: float | None = Field(None, gt=0)  # None: 0.125 / memory_chunk_size
    memory_gates_per_chunk: bool = False
    memory_output_gate: bool = True
    memory_normalize_values: bool = Field(False, description="l2-normalise the memory's values per head (a "
                                          "stable inner loop when value norms grow; RESULTS.md 4e)")
    memory_forget_init: float = Field(1e-3, gt=0, lt=1, description="initial forgetting rate alpha (1e-3: "
                                      "half-life ~700 tokens; recall far beyond the training length needs less)")
    memory_max_forget: float = Field(1.0, gt=0, le=1, description="bound on the forgetting rate alpha: no head "
                                     "forgets faster, whatever training does to its gate (1.0: no bound)")
    memory_backend: Literal["auto", "naive", "chunked", "compiled", "fused", "triton"] = "auto"
    mac_memory_input: Literal["attention", "residual"] = Field(
        "attention", description="what MAC writes into its memory: the attention output y (paper Eq. 24) or "
        "the block's normalised input plus y (keys then carry the token identities MAG's memory sees)")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.dim % self.heads:
            raise ValueError(f"model.heads={self.heads} must divide model.dim={self.dim}")
        kv = self.kv_heads or self.heads
        if self.heads % kv:
            raise ValueError(f"model.kv_heads={kv} must divide model.heads={self.heads}")
        if self.memory_forget_init >= self.memory_max_forget:
            raise ValueError(f"model.memory_forget_init={self.memory_forget_init} must be below "
                             f"model.memory_max_forget={self.memory_max_forget}")
        mh = self.memory_heads or self.heads
        if self.dim % mh:
            raise ValueError(f"model.memory_heads={mh} must divide model.dim={self.dim}")
        if self.memory_layers is not None:
            bad = [i for i in self.memory_layers if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"model.memory_layers={self.memory_layers}: {bad} outside 0..{self.depth - 1}")
            if len(set(self.memory_layers)) != len(self.memory_layers):
                raise ValueError(f"model.memory_layers={self.memory_layers} has duplicates")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def memory_head_dim(self) -> int:
        return self.dim // (self.memory_heads or self.heads)

    @property
    def ffn_hidden(self) -> int:
        h = int(2 * self.ffn_mult * self.dim / 3)
        return max(8, (h + 7) // 8 * 8)

    def layer_has_memory(self, layer: int) -> bool:
        if self.variant not in MEMORY_VARIANTS:
            return False
        return self.memory_layers is None or layer in self.memory_layers

    def fingerprint(self) -> str:
        """A stable hash of the architecture; states and checkpoints record it."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _check_tasks(tasks: list[str] | None) -> list[str] | None:
    """``data.tasks`` / a curriculum stage's ``tasks`` as given; raises naming an unknown task."""
    from titans.data.tasks import expand_tasks

    if tasks is not None:
        expand_tasks(tasks)
    return tasks


class DataConfig(_Strict):
    """Where training text comes from and how it is tokenized and packed."""

    source: str = Field("stdlib", description="'stdlib' (embedded default), a path, glob, .jsonl, "
                        "a local HF dataset directory, or a prepared shard directory")
    text_field: str = "text"
    tokenizer: str = Field("byte", description="'byte' or a local tokenizer.json / directory")
    seq_len: int = Field(256, ge=2)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    shards_dir: str | None = Field(None, description="prepared shards; built on first use if missing")
    max_bytes: int | None = Field(None, ge=1, description="cap on source text read (None = all)")
    seed: int = 1234
    tasks: list[str] = Field(default_factory=list, description="long-context tasks mixed into training "
                             "('niah', 'babilong', or names such as 'niah_uuid', 'babilong_qa2')")
    task_fraction: float = Field(0.5, ge=0, le=1, description="share of rows that are task examples")
    task_placement: Literal["random", "end", "segments"] = Field(
        "random", description="where a task example sits in its row: at a random position inside LM text, closing "
        "the row (the recipe of RESULTS.md 4b/4d), or 'segments': half closing the row, half with the question "
        "ending on a model.window boundary (the answer opens a fresh MAC segment)")
    haystack_source: str | None = Field(None, description="text for task haystacks (default: source)")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str] | None) -> list[str] | None:
        return _check_tasks(v)


class CurriculumStage(_Strict):
    """One stage of ``training.curriculum``: train on rows of ``seq_len`` tokens, starting from the previous
    stage's weights with a fresh optimizer, schedule and step count.  A field left unset takes the run's own
    ``training.*`` value (``max_time_s`` too: then each such stage gets that limit).

    The reach of recall follows the length of the rows a model last trained on (about twice it:
    benchmarks/RESULTS.md 4j), so short cheap rows first and a few long ones last.
    """

    seq_len: int = Field(ge=2, description="data.seq_len of this stage")
    max_steps: int = Field(ge=1)
    batch_size: int | None = Field(None, ge=1)
    max_time_s: float | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    warmup_steps: int | None = Field(None, ge=0)
    tasks: list[str] | None = Field(None, description="data.tasks of this stage (a task curriculum: an easy "
                                    "task first, then the mixture)")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str] | None) -> list[str] | None:
        return _check_tasks(v)


class TrainingConfig(_Strict):
    """Optimisation and run control."""

    out_dir: str = "runs/default"
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(16, ge=1, description="sequences per optimizer step per process (after accumulation)")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    skip_nonfinite: bool = Field(True, description="skip updates whose gradient norm is NaN / inf")
    max_consecutive_skips: int = Field(20, ge=0,
                                       description="stop with an error after this many skipped steps in a row")
    max_time_s: float | None = Field(None, gt=0, description="stop (with a checkpoint) after the step that "
                                     "passes this many seconds of training; None: run all max_steps")
    init_from: str | None = Field(None, description="start from the model weights of this run folder, checkpoint "
                                  "or export (the same parameter shapes); optimizer, schedule and step count start "
                                  "fresh: fine-tuning, or a curriculum such as longer rows after shorter ones. "
                                  "Ignored when resuming (the run's own checkpoint wins)")
    curriculum: list[CurriculumStage] = Field(
        default_factory=list, description="stages run one after another (non-final ones in OUT_DIR/stages/, the "
        "last in OUT_DIR), each from the previous one's weights; empty: one run with the settings above")
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(20, ge=1)
    ckpt_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp64"] = "auto"
    # torch.compile the model, through titans.utils.compiling.compile_fn (inductor's in-place buffers off: with them
    # the compiled gradients differed from eager, benchmarks/RESULTS.md section 6, session 13)
    compile: bool = False
    # with compile: each block on its own (regional compilation, titans.utils.compiling.compile_blocks: one graph per
    # block instead of the model unrolled over its layers and MAC segments; compiled in 135 s on an H200 for the
    # issue-7 MAC, and with cuda_graphs 307K vs 215K tokens/s eager, benchmarks/RESULTS.md section 6, session 15) or
    # the whole model as one graph (for MAC never timed to the end on a GPU)
    compile_scope: Literal["model", "blocks"] = "blocks"
    inductor_options: dict[str, bool | int | float | str] = Field(
        default_factory=dict, description="with compile: inductor options for every compile of the model (checked "
        "against inductor's configuration names; inplace_buffers stays off) over the project's defaults "
        "(titans.utils.compiling.INDUCTOR_OPTIONS: combo_kernels on, MAC on an H200 270.4K vs 261.3K tokens/s at "
        "65536 x 1, session 26), e.g. {combo_kernels: false}")
    # float32 matmuls on CUDA (the memory's inner loop and retrieval run in float32 under bf16 autocast) use
    # TF32 tensor cores: 10-bit mantissa products, float32 accumulation
    tf32: bool = True
    # capture forward + backward of a training micro-batch as CUDA graphs (single GPU): removes the
    # per-kernel launch cost that dominates the chunk loop of the memory at small widths
    cuda_graphs: bool = False
    activation_checkpointing: ActivationCheckpointing = Field(
        "none", description="recompute activations in the backward instead of keeping them from the forward: "
        "'memory' recomputes each memory layer's neural-memory work (per MAC segment: the retrieval, and the update "
        "with its read-back and MAC / MAG's gate), the part whose saved tensors make Titans' memory use; 'full' "
        "recomputes whole blocks (any variant); 'none' keeps everything.  Training steps only (the results are "
        "the same; a step costs the recomputation)")
    defer_weight_grads: bool | None = Field(
        None, description="MAC's memory blocks sum their projections' weight gradients over a call's segments "
        "instead of per segment (titans.utils.weight_grads; the same gradients up to summation order): true / false "
        "always / never; null (default) inside training.wavefront only, where the segment chain is the step's "
        "critical path (MAC 65536 x 1 on an H200: 261.3K vs 250.5K tokens/s; one pass at 4096 x 8: 365.7K vs 369.8K, "
        "session 26); with TITANS_DEFER_PER_TOKEN=1 the elementwise parameters' gradients stay per token until the "
        "call's end (~19 MB a segment and memory block at MAC's issue-7 shape and batch 1; 23% slower on an H200, "
        "session 36).  Not with distributed=fsdp.  TITANS_DEFER_WEIGHT_GRADS=1 / 0 "
        "overrides it")
    distributed: Literal["ddp", "fsdp"] = "ddp"
    wavefront: bool = Field(
        False, description="the training forward segment-major with one CUDA stream per block "
        "(titans.training.wavefront): the same loss and gradients; at batch 1 the memory layers' segment chains run "
        "side by side (MAC 65536 x 1 on an H200 with CUDA graphs: 209K vs 131K tokens/s; 231K with "
        "wavefront_step=2048; those rows ran the memory's three-launch backward, TITANS_TRITON_BWD=split, now the "
        "default where its walk runs over two programs a head: batch <= 2 at 8 heads).  Single process, and with "
        "compile only with compile_scope=blocks.  Sets CUDA_DEVICE_MAX_CONNECTIONS=32 (CUDA's hardware work queues, 8 "
        "by default) before CUDA starts unless set: the streams then wait less on each other (MAC 65536 x 1 with "
        "4096-token steps on an H100: 284.5K tokens/s against 260.5K with 8 queues, session 40); with 32 queues MAC's "
        "segment read-outs run beside the segment chains (TITANS_WAVEFRONT_READOUT_STREAMS=auto: +4.3% on an H200, "
        "session 42)")
    wavefront_step: int | None = Field(
        None, ge=1, description="with training.wavefront: tokens each block takes a step (default: the model's "
        "window, MAC's segment; any size is exact).  Longer steps mean fewer, longer kernels and a coarser overlap: "
        "MAC 65536 x 1 on an H200 (session 21, before the stream priority and feed-forward streams that now add 3%): "
        "209.0K tokens/s with 512-token steps, 218.6K with 1024, 223.1K with 2048; on an H100 with 32 hardware queues "
        "(session 40) 276.4K with 2048, 284.5K with 4096; on an H100 with today's defaults (session 48) 306K with "
        "4096, ~315K with anything from 4608 to 6144 (6144: the flat-scaling row, 0.92x of 4096 x 8), 307K with 6656, "
        "300K with 7168, 298K with 8192")

    @field_validator("inductor_options")
    @classmethod
    def _known_inductor_options(cls, value: dict) -> dict:
        if value:
            from titans.utils.compiling import check_inductor_options

            check_inductor_options(value, "training.inductor_options")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.wavefront_step is not None and not self.wavefront:
            raise ValueError("training.wavefront_step is the step of training.wavefront: set training.wavefront=true "
                             "too")
        if self.wavefront and self.compile and self.compile_scope == "model":
            raise ValueError("training.wavefront calls the blocks one segment at a time: with training.compile it "
                             "needs training.compile_scope=blocks")
        if self.defer_weight_grads and self.distributed == "fsdp":
            raise ValueError("training.defer_weight_grads=true does not work with training.distributed=fsdp (FSDP2 "
                             "reduce-scatters a block's gradients before the deferred sums are done)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"training.grad_accum={self.grad_accum} must divide "
                             f"training.batch_size={self.batch_size}")
        for i, st in enumerate(self.curriculum):
            if st.batch_size is not None and st.batch_size % self.grad_accum:
                raise ValueError(f"training.grad_accum={self.grad_accum} must divide "
                                 f"training.curriculum[{i}].batch_size={st.batch_size}")
        return self


class LoggingConfig(_Strict):
    log_every: int = Field(10, ge=1)
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True


class MemoryManagementConfig(_Strict):
    """Inference-time memory sessions (see :mod:`titans.inference.memory_management`)."""

    device_budget_mb: float = Field(512.0, gt=0)
    offload_dir: str = "runs/sessions"
    max_sessions: int = Field(10_000, ge=1)


class TitansConfig(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    logging: LoggingConfig = LoggingConfig()
    memory: MemoryManagementConfig = MemoryManagementConfig()

    @model_validator(mode="after")
    def _check(self) -> TitansConfig:
        ac = self.training.activation_checkpointing
        if ac != "none" and self.model.memory_backend == "naive" and self.model.variant in MEMORY_VARIANTS:
            raise ValueError(naive_cannot_recompute(ac))
        return self


# ----------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {key}: {msg}")
    return "; ".join(lines)


def _deep_update(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def builtin_config_path(name: str) -> Path | None:
    """Path of a config shipped with the package ('default', 'small', 'base', 'large', 'experiment')."""
    root = resources.files("titans") / "configs"
    candidates = [root / f"{name}.yaml", root / f"{name}_config.yaml",
                  root / "model_configs" / f"{name}.yaml", root / "model_configs" / f"{name}_config.yaml"]
    for c in candidates:
        if c.is_file():
            return Path(str(c))
    return None


def list_builtin_configs() -> list[str]:
    root = resources.files("titans") / "configs"
    names = [p.name for p in root.iterdir() if p.name.endswith(".yaml")]
    names += [p.name for p in (root / "model_configs").iterdir() if p.name.endswith(".yaml")]
    return sorted(n.removesuffix(".yaml").removesuffix("_config") for n in names)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'training.lr=3e-4'`` -> (['training', 'lr'], 3e-4); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. training.lr=3e-4")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for ov in overrides:
        parts, value = parse_override(ov)
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_config(name_or_path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> TitansConfig:
    """Load a config: the package default, then the named/pathed file on top, then overrides.

    ``name_or_path`` is a builtin name (``small``, ``base``, ...) or a YAML file path.
    Raises :class:`ConfigError` naming the offending key and file.
    """
    default_path = builtin_config_path("default")
    data: dict = _read_yaml(default_path) if default_path else {}
    source = str(default_path)
    if name_or_path is not None:
        p = Path(name_or_path)
        if not p.is_file():
            found = builtin_config_path(str(name_or_path))
            if found is None:
                raise ConfigError(f"config {name_or_path!r}: no such file and no builtin config of that name "
                                  f"(builtin: {', '.join(list_builtin_configs())})")
            p = found
        data = _deep_update(data, _read_yaml(p))
        source = str(p)
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides)
        source += " (with overrides " + ", ".join(overrides) + ")"
    return config_from_dict(data, source)


def config_from_dict(data: Mapping, source: str = "<dict>") -> TitansConfig:
    try:
        return TitansConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def model_config_from(obj: ModelConfig | TitansConfig | Mapping) -> ModelConfig:
    """Accept a ModelConfig, a full TitansConfig, or a dict of either shape."""
    if isinstance(obj, ModelConfig):
        return obj
    if isinstance(obj, TitansConfig):
        return obj.model
    if isinstance(obj, Mapping):
        try:
            if "model" in obj and isinstance(obj["model"], Mapping):
                return TitansConfig.model_validate(dict(obj)).model
            return ModelConfig.model_validate(dict(obj))
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, "<dict>")) from None
    raise ConfigError(f"model config: expected ModelConfig, TitansConfig or dict, got {type(obj).__name__}")


def save_config(cfg: TitansConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from titans.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
