"""Tokenizers: byte-level (the default, nothing to download) and local Hugging Face tokenizers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_spec(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256).  Decoding replaces invalid byte sequences."""

    vocab_size = 256
    eos_id: int | None = None
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")

    def to_spec(self) -> dict:
        return {"kind": "byte", "vocab_size": 256}


class HFTokenizer:
    """A local Hugging Face ``tokenizers`` tokenizer: a ``tokenizer.json`` file or a folder holding one."""

    def __init__(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer: {p} not found (expected a tokenizer.json or a folder with one)")
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:
            raise ImportError("tokenizer: the 'tokenizers' package is needed for Hugging Face tokenizers "
                              "(pip install 'titans[hf]')") from None
        self.path = p
        self._tok = _HF.from_file(str(p))
        self.vocab_size = self._tok.get_vocab_size()
        self.name = f"hf:{p}"
        self.eos_id = None
        for cand in ("</s>", "<|endoftext|>", "<eos>", "[SEP]"):
            tid = self._tok.token_to_id(cand)
            if tid is not None:
                self.eos_id = tid
                break

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_spec(self) -> dict:
        return {"kind": "hf", "path": str(self.path), "vocab_size": self.vocab_size}


def load_tokenizer(spec: str | dict) -> Tokenizer:
    """``"byte"``, a path to a tokenizer.json / folder, or a spec dict from ``to_spec()``."""
    if isinstance(spec, dict):
        if spec.get("kind") == "byte":
            return ByteTokenizer()
        if spec.get("kind") == "hf":
            return HFTokenizer(spec["path"])
        raise ValueError(f"tokenizer spec {spec!r}: unknown kind")
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
