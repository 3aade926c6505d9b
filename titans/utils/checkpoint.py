"""Checkpoints and inference exports.

Training checkpoint ``run_dir/checkpoints/step_0000100/``: ``model.safetensors`` (weights, tied weights
stored once), ``optimizer.pt`` (optimizer + scheduler state; loaded with ``weights_only=True``),
``trainer_state.json`` (step, tokens, RNG states as plain data) and ``config.yaml``.  A checkpoint
folder is assembled under a temporary name and published by one rename; ``checkpoints/latest`` names
the newest.  Inference export: ``model.safetensors`` + ``config.yaml`` + ``export.json``.
Loading never executes code.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from titans.utils.config import ConfigError, TitansConfig, config_from_dict
from titans.utils.io import atomic_path, atomic_write_text

EXPORT_FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint or export is missing, corrupt, or belongs to another architecture."""


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor stored once (tied embeddings)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel():
            continue
        seen[ptr] = k
        out[k] = v.detach().cpu().contiguous()
    return out


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    tensors = _unique_state_dict(model)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or corrupt safetensors file ({e})") from None
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    # tied weights are stored once; they come back through the tie
    missing = [k for k in missing if not _is_tied_alias(model, k, tensors)]
    unexpected = [k for k in tensors if k not in own]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit this architecture (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]})")
    for k, v in tensors.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=False)


def _is_tied_alias(model: torch.nn.Module, key: str, tensors: dict) -> bool:
    sd = model.state_dict()
    return any(k in tensors and sd[k].data_ptr() == sd[key].data_ptr() for k in sd if k != key)


def _read_config(path: Path) -> TitansConfig:
    if not path.is_file():
        raise CheckpointError(f"{path}: config missing")
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))
    except (yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from None


def _rng_state() -> dict:
    import random

    import numpy as np

    st = {"torch": torch.get_rng_state().tolist(), "python": _py_random_state(random.getstate()),
          "numpy": _np_state(np.random.get_state())}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def _py_random_state(s):
    return [s[0], list(s[1]), s[2]]


def _np_state(s):
    return [s[0], s[1].tolist(), int(s[2]), int(s[3]), float(s[4])]


def restore_rng_state(st: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer, scheduler,
                    trainer_state: dict, cfg: TitansConfig, keep: int = 2) -> Path:
    """Write ``run_dir/checkpoints/step_XXXXXXX`` atomically and point ``latest`` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        save_weights(model, tmp / "model.safetensors", {"config_fingerprint": cfg.model.fingerprint()})
        with atomic_path(tmp / "optimizer.pt") as p:
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, p)
        state = dict(trainer_state, step=step, rng=_rng_state())
        atomic_write_text(tmp / "trainer_state.json", json.dumps(state))
        atomic_write_text(tmp / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    ckpts = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """The folder holding the weights of ``path``: a checkpoint or export folder itself, a run folder (its
    ``checkpoints/latest``), a run's ``checkpoints`` folder (its ``latest``; the folder a training run prints), or
    that ``latest`` file itself.  Raises :class:`CheckpointError` naming the path and, where
    ``latest`` names a checkpoint that is gone or has no weights, that checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint, run or export folder")
    if p.is_dir() and (p / "model.safetensors").is_file():
        return p
    if p.is_file():
        if p.name != "latest":
            raise CheckpointError(f"{p}: a file; expected a checkpoint, run or export folder (or a checkpoints/latest "
                                  "pointer)")
        latest = p
    else:
        latest = next((c for c in (p / "checkpoints" / "latest", p / "latest") if c.is_file()), None)
        if latest is None:
            raise CheckpointError(f"{p}: holds no model.safetensors and no checkpoints/latest")
    name = latest.read_text().strip()
    cand = latest.parent / name
    if not name or not (cand / "model.safetensors").is_file():
        raise CheckpointError(f"{latest}: names checkpoint {name!r}, which holds no model.safetensors ({cand})")
    return cand


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None) -> dict:
    """Load weights (and optimizer / scheduler when given) into existing objects; returns trainer state."""
    ck = resolve_checkpoint(path)
    load_weights(model, ck / "model.safetensors")
    state: dict = {}
    if (ck / "trainer_state.json").is_file():
        try:
            state = json.loads((ck / "trainer_state.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{ck / 'trainer_state.json'}: corrupt ({e})") from None
    if optimizer is not None:
        f = ck / "optimizer.pt"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (an export cannot be resumed)")
        try:
            blob = torch.load(f, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file
            raise CheckpointError(f"{f}: unreadable ({type(e).__name__})") from None
        optimizer.load_state_dict(blob["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(blob["scheduler"])
    return state


def load_model(path: str | Path, device: str | torch.device | None = None, expect: TitansConfig | None = None):
    """Build the model a checkpoint / export describes and load its weights -> (TitansLM, TitansConfig)."""
    from titans.core.models import build_model

    ck = resolve_checkpoint(path)
    cfg = _read_config(ck / "config.yaml")
    if expect is not None and expect.model.fingerprint() != cfg.model.fingerprint():
        raise CheckpointError(f"{ck}: checkpoint is a different architecture than the requested config "
                              f"({cfg.model.variant} dim {cfg.model.dim} vs "
                              f"{expect.model.variant} dim {expect.model.dim})")
    model = build_model(cfg.model)
    load_weights(model, ck / "model.safetensors")
    if device is not None:
        model = model.to(device)
    return model.eval(), cfg


def export_model(model: torch.nn.Module, cfg: TitansConfig, out_dir: str | Path) -> Path:
    """Write an inference export: weights (safetensors, with metadata), config, export.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": str(EXPORT_FORMAT_VERSION), "config_fingerprint": cfg.model.fingerprint()}
    save_weights(model, out / "model.safetensors", meta)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    atomic_write_text(out / "export.json", json.dumps({"format_version": EXPORT_FORMAT_VERSION,
                                                       "config_fingerprint": cfg.model.fingerprint()}))
    return out
