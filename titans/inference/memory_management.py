"""Memory sessions: a model state that keeps learning at test time, saved, loaded and offloaded safely.

* :func:`save_state` / :func:`load_state`: a :class:`ModelState` (every layer's neural-memory weights
  and momentum, KV caches, MAC segment snapshots) as safetensors with metadata (format version, model
  config fingerprint, token count, SHA-256 of the tensors).  Writes are atomic (temp file, fsync,
  rename), so a crash mid-save leaves the previous file intact; a truncated or corrupted file, or one
  saved for another model config, raises :class:`MemoryStateError` naming the file and the problem.
* :class:`MemorySession`: create, feed text, generate, snapshot / restore, save / load, reset, retrieve
  (read the memory without writing, Eq. 15), stats, close; a context manager whose exit releases device
  memory and temporary files deterministically.
* :class:`SessionStore`: many sessions under a byte budget on the device; the least recently used are
  offloaded to disk and come back transparently.  If offloading fails (disk full, permission denied,
  read-only folder) the session stays in RAM and a warning is logged: nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from titans.core.models.generation import SamplingConfig, apply_repetition_penalty, sample_next
from titans.core.models.model import ModelState, TitansLM
from titans.data.preprocessing import Tokenizer
from titans.utils.io import atomic_path

log = logging.getLogger(__name__)

STATE_FORMAT = "titans-memory-state"
STATE_FORMAT_VERSION = 1
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def autocast_or_off(device: torch.device, amp_dtype: torch.dtype | None):
    """Autocast to ``amp_dtype`` on ``device``, or explicitly off (so an enclosing autocast does not apply)."""
    if amp_dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=amp_dtype)


class MemoryStateError(ValueError):
    """A saved memory state is missing, truncated, corrupted, or belongs to another model config."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_state(state: ModelState, path: str | Path, model: TitansLM, extra: dict | None = None,
               last_logits: torch.Tensor | None = None) -> Path:
    """Write ``state`` atomically as safetensors with metadata; returns the path.  ``last_logits`` (the
    model's prediction for the next token) may ride along so a session continues exactly."""
    path = Path(path)
    # clone: a state may hold one tensor under two names (weights == chunk_weights at a chunk boundary)
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.tensors().items()}
    if last_logits is not None:
        tensors["session.last_logits"] = last_logits.detach().cpu().clone().contiguous()
    meta = {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION),
            "config_fingerprint": model.config.fingerprint(), "variant": model.config.variant,
            "num_layers": str(len(state.layers)), "token_count": str(state.position),
            "checksum": _checksum(tensors), "extra": json.dumps(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_state_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MemoryStateError(f"{path}: no such memory state file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise MemoryStateError(f"{path}: truncated or corrupt memory state ({e})") from None


def load_state(path: str | Path, model: TitansLM, device: torch.device | str | None = None,
               with_logits: bool = False):
    """Read a state saved by :func:`save_state` for ``model``; every inconsistency is a MemoryStateError.
    Returns the ModelState, or ``(state, last_logits or None)`` with ``with_logits=True``."""
    path = Path(path)
    meta = read_state_metadata(path)
    if meta.get("format") != STATE_FORMAT:
        raise MemoryStateError(f"{path}: not a titans memory state (format={meta.get('format')!r})")
    version = int(meta.get("format_version", "0"))
    if version > STATE_FORMAT_VERSION:
        raise MemoryStateError(f"{path}: format version {version} is newer than this titans "
                               f"({STATE_FORMAT_VERSION}); upgrade titans")
    if meta.get("config_fingerprint") != model.config.fingerprint():
        raise MemoryStateError(f"{path}: saved for another model config (variant {meta.get('variant')}, "
                               f"fingerprint {meta.get('config_fingerprint')}; this model: "
                               f"{model.config.variant}, {model.config.fingerprint()})")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MemoryStateError(f"{path}: truncated or corrupt memory state ({e})") from None
    if _checksum(tensors) != meta.get("checksum"):
        raise MemoryStateError(f"{path}: checksum mismatch (the file was modified or corrupted)")
    try:
        state = ModelState.from_tensors(tensors, len(model.blocks))
    except (ValueError, KeyError) as e:
        raise MemoryStateError(f"{path}: inconsistent memory state ({e})") from None
    logits = tensors.get("session.last_logits")
    if device is not None:
        state = state.to(device)
        logits = None if logits is None else logits.to(device)
    return (state, logits) if with_logits else state


class MemorySession:
    """One stream of text through a model whose neural memory keeps learning (batch size 1).

    ``feed`` writes text into the memory; ``generate`` continues from it (the generated text is fed
    back, so the memory also holds what the model said); ``retrieve`` reads without writing.
    """

    def __init__(self, model: TitansLM, tokenizer: Tokenizer, session_id: str = "default",
                 amp_dtype: torch.dtype | None = None, piece: int = 2048) -> None:
        self.model, self.tokenizer, self.id = model, tokenizer, session_id
        self.amp_dtype, self.piece = amp_dtype, piece
        self.device = next(model.parameters()).device
        self.state: ModelState | None = model.init_state(1)
        self.last_logits: torch.Tensor | None = None
        self.last_surprise: float | None = None
        self._tmpdirs: list[Path] = []
        self.closed = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> MemorySession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the state (device memory) and delete this session's temporary files.  Idempotent."""
        self.state = None
        self.last_logits = None
        for d in self._tmpdirs:
            shutil.rmtree(d, ignore_errors=True)
        self._tmpdirs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.closed = True

    def tempdir(self) -> Path:
        """A temporary folder owned by the session (deleted by ``close``)."""
        d = Path(tempfile.mkdtemp(prefix=f"titans-session-{self.id}-"))
        self._tmpdirs.append(d)
        return d

    def _check_open(self) -> None:
        if self.closed or self.state is None:
            raise RuntimeError(f"session {self.id!r} is closed or offloaded")

    def _amp(self):
        return autocast_or_off(self.device, self.amp_dtype)

    # ------------------------------------------------------------------ reading and writing
    @torch.no_grad()
    def feed(self, text_or_ids: str | list[int]) -> dict:
        """Write tokens into the memory.  Returns the tokens fed and their surprise: the mean negative
        log-likelihood (nats / token) the model assigned them given everything before."""
        self._check_open()
        ids = self.tokenizer.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        if not ids:
            return {"tokens": 0, "surprise": None}
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        nll, count = 0.0, 0
        with self._amp():
            for s in range(0, x.shape[1], self.piece):
                chunk = x[:, s:s + self.piece]
                if self.last_logits is not None:
                    nll += float(torch.nn.functional.cross_entropy(self.last_logits.float(), chunk[:, 0]))
                    count += 1
                out = self.model(chunk, state=self.state)
                if chunk.shape[1] > 1:
                    lp = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), chunk[0, 1:], reduction="sum")
                    nll += float(lp)
                    count += chunk.shape[1] - 1
                self.state, self.last_logits = out.state, out.logits[:, -1]
        self.last_surprise = nll / count if count else None
        return {"tokens": len(ids), "surprise": self.last_surprise}

    @torch.no_grad()
    def generate(self, prompt: str | list[int] = "", max_new_tokens: int = 100, *, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = 0.95, repetition_penalty: float = 1.0,
                 stop_tokens: tuple[int, ...] = (), stop_text: str | None = None, min_new_tokens: int = 0,
                 seed: int | None = None, stream: Callable[[int], None] | None = None) -> str:
        """Feed ``prompt`` then sample; the reply is also written into the memory.  Returns the text.

        Stops after ``max_new_tokens``, a token in ``stop_tokens`` or when the reply ends with
        ``stop_text`` — but never before ``min_new_tokens`` tokens."""
        self._check_open()
        cfg = SamplingConfig(temperature, top_k, top_p, repetition_penalty)
        cfg.validate()
        if prompt:
            self.feed(prompt)
        if self.last_logits is None:
            raise ValueError("generate: the session is empty; give a prompt")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        logits = self.last_logits
        toks: list[int] = []
        with self._amp():
            for _ in range(max_new_tokens):
                nxt = sample_next(apply_repetition_penalty(logits.float(), seen, repetition_penalty), cfg, gen)
                t = int(nxt[0])
                toks.append(t)
                seen[0, t] = True
                if stream is not None:
                    stream(t)
                out = self.model(nxt.view(1, 1), state=self.state)
                self.state, logits = out.state, out.logits[:, -1]
                if len(toks) >= min_new_tokens and (
                        t in stop_tokens or (stop_text and self.tokenizer.decode(toks).endswith(stop_text))):
                    break
        self.last_logits = logits
        return self.tokenizer.decode(toks)

    @torch.no_grad()
    def retrieve(self, query: str | list[int]) -> dict[int, torch.Tensor]:
        """Read every memory layer with ``query`` without writing (Eq. 15): layer -> (T, dim) outputs.

        The query's hidden states come from running the model on a throw-away copy of the state; the
        memories are then read with the session's own (untouched) state."""
        self._check_open()
        ids = self.tokenizer.encode(query) if isinstance(query, str) else list(query)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        inputs: dict[int, torch.Tensor] = {}
        hooks = []
        for i, block in enumerate(self.model.blocks):
            if block.memory is not None:
                hooks.append(block.norm_mix.register_forward_hook(
                    lambda m, a, out, i=i: inputs.setdefault(i, out.detach())))
        try:
            with self._amp():
                self.model(x, state=self.state.clone())
        finally:
            for h in hooks:
                h.remove()
        res = {}
        for i, h in inputs.items():
            mem = self.model.blocks[i].memory
            y, _ = mem.retrieve(h, self.state.layers[i].memory)
            res[i] = y[0]
        return res

    # ------------------------------------------------------------------ state management
    def snapshot(self) -> ModelState:
        self._check_open()
        return self.state.clone()

    def restore(self, snapshot: ModelState) -> None:
        self.state = snapshot.clone()
        self.last_logits = None

    def reset(self) -> None:
        """Forget everything: a fresh memory."""
        self.state = self.model.init_state(1)
        self.last_logits = None
        self.last_surprise = None

    def save(self, path: str | Path) -> Path:
        """Atomically write the state (and the next-token logits, so generation continues exactly)."""
        self._check_open()
        return save_state(self.state, path, self.model, {"session_id": self.id}, self.last_logits)

    def load(self, path: str | Path) -> None:
        self.state, self.last_logits = load_state(path, self.model, self.device, with_logits=True)
        self.closed = False

    def stats(self) -> dict:
        self._check_open()
        mem_bytes = sum(s.memory.nbytes() for s in self.state.layers if s.memory is not None)
        return {"session": self.id, "tokens_seen": self.state.position, "state_bytes": self.state.nbytes(),
                "memory_bytes": mem_bytes, "last_surprise": self.last_surprise}


class SessionStore:
    """Many sessions within ``budget_bytes`` of live state; LRU sessions are offloaded to ``offload_dir``."""

    def __init__(self, model: TitansLM, tokenizer: Tokenizer, offload_dir: str | Path, budget_bytes: int,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.model, self.tokenizer, self.amp_dtype = model, tokenizer, amp_dtype
        self.offload_dir = Path(offload_dir)
        self.budget = budget_bytes
        self.sessions: OrderedDict[str, MemorySession] = OrderedDict()  # most recently used last
        self.offloaded: dict[str, Path] = {}
        self.pinned: set[str] = set()  # offloading failed: kept in RAM

    @staticmethod
    def check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id) or ".." in session_id:
            raise ValueError(f"session id {session_id!r}: use 1-128 letters, digits, '_', '-', '.' "
                             "(no path separators, no '..')")
        return session_id

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions or session_id in self.offloaded

    def ids(self) -> list[str]:
        return list(self.sessions) + [s for s in self.offloaded if s not in self.sessions]

    def live_bytes(self) -> int:
        return sum(s.state.nbytes() for s in self.sessions.values() if s.state is not None)

    def create(self, session_id: str) -> MemorySession:
        self.check_id(session_id)
        if session_id in self:
            raise ValueError(f"session {session_id!r} already exists")
        s = MemorySession(self.model, self.tokenizer, session_id, self.amp_dtype)
        self.sessions[session_id] = s
        self._enforce_budget(keep=session_id)
        return s

    def get(self, session_id: str) -> MemorySession:
        """The session, brought back from disk if it was offloaded; marks it most recently used."""
        self.check_id(session_id)
        if session_id in self.sessions:
            self.sessions.move_to_end(session_id)
            return self.sessions[session_id]
        if session_id not in self.offloaded:
            raise KeyError(f"no session {session_id!r}")
        s = MemorySession(self.model, self.tokenizer, session_id, self.amp_dtype)
        s.load(self.offloaded[session_id])
        self.sessions[session_id] = s
        self.offloaded.pop(session_id).unlink(missing_ok=True)
        self._enforce_budget(keep=session_id)
        return s

    def close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            s.close()
        path = self.offloaded.pop(session_id, None)
        if path is not None:
            path.unlink(missing_ok=True)
        self.pinned.discard(session_id)

    def close_all(self) -> None:
        for sid in list(self.ids()):
            self.close(sid)

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close_all()

    def _enforce_budget(self, keep: str) -> None:
        for sid in list(self.sessions):
            if self.live_bytes() <= self.budget:
                return
            if sid == keep or sid in self.pinned:
                continue
            self._offload(sid)

    def _offload(self, session_id: str) -> None:
        s = self.sessions[session_id]
        path = self.offload_dir / f"{session_id}.safetensors"
        try:
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            s.save(path)
        except OSError as e:
            log.warning("offloading session %r to %s failed (%s); keeping it in memory", session_id, path, e)
            self.pinned.add(session_id)
            return
        self.offloaded[session_id] = path
        del self.sessions[session_id]
        s.close()
