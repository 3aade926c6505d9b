"""Text sources and memory-mapped token shards.

Sources (``iter_documents``): ``"stdlib"`` (the embedded default: the running interpreter's standard
library ``.py`` files, read in place, split train/val deterministically by file), a text file, a folder
(recursive), a glob, a ``.jsonl`` file with a text field, a gzip file (``.gz`` / ``.dz``, e.g. the gcide
dictionary), or a local Hugging Face dataset saved with ``save_to_disk``.

Shards (``prepare_shards``): tokenized once into ``{train,val}_NNN.bin`` files (uint8 / uint16 / uint32
by vocabulary size) with a ``manifest.json`` (source, tokenizer, counts, sha256 per shard).  Training
reads them through ``numpy.memmap`` and never loads them into RAM.
"""

from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import json
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from titans.data.preprocessing import Tokenizer
from titans.utils.io import atomic_write_text, atomic_write_with

MANIFEST_VERSION = 1
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".csv", ".json"}


def _stable_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / 16**12


def _in_split(key: str, split: str | None, val_fraction: float) -> bool:
    if split is None:
        return True
    is_val = _stable_fraction(key) < val_fraction
    return is_val if split == "val" else not is_val


def stdlib_source_files() -> list[Path]:
    """The standard library's own .py files of the running interpreter, sorted (no site-packages)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files)


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def iter_documents(source: str, *, text_field: str = "text", split: Literal["train", "val"] | None = None,
                   val_fraction: float = 0.05, max_bytes: int | None = None) -> Iterator[str]:
    """Yield documents (strings) of a source; see the module docstring for the kinds of source.

    ``split`` picks the train or val part (stable hash of the file path, or of the document index for
    single-file sources).  ``max_bytes`` stops after about that many UTF-8 bytes.
    """
    budget = [max_bytes]

    def take(doc: str) -> str | None:
        if budget[0] is None:
            return doc
        if budget[0] <= 0:
            return None
        budget[0] -= len(doc.encode("utf-8", errors="replace"))
        return doc

    def files_from(paths: list[Path], root: Path | None):
        for p in paths:
            key = str(p.relative_to(root)) if root else str(p)
            if _in_split(key, split, val_fraction):
                doc = take(_read_text(p))
                if doc is None:
                    return
                yield doc

    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        yield from files_from(stdlib_source_files(), root)
        return
    path = Path(source)
    if any(ch in source for ch in "*?[") and not path.exists():
        matches = sorted(Path(m) for m in _glob.glob(source, recursive=True) if Path(m).is_file())
        if not matches:
            raise FileNotFoundError(f"data source {source!r}: the glob matches no file")
        yield from files_from(matches, None)
        return
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r}: no such file or folder")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _iter_hf_dataset(path, text_field, split, val_fraction, take)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"data source {source!r}: no text files ({sorted(TEXT_SUFFIXES)}) inside")
        yield from files_from(files, path)
        return
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    text = obj[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with a {text_field!r} string "
                                     f"({type(e).__name__})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{n}: field {text_field!r} is not a string")
                if _in_split(f"{path.name}:{n}", split, val_fraction):
                    doc = take(text)
                    if doc is None:
                        return
                    yield doc
        return
    if path.suffix in (".gz", ".dz"):
        yield from _iter_blocks(gzip.open(path, "rt", encoding="utf-8", errors="replace"), path, split,
                                val_fraction, take)
        return
    yield from _iter_blocks(path.open(encoding="utf-8", errors="replace"), path, split, val_fraction, take)


def _iter_blocks(handle, path: Path, split, val_fraction, take, block_chars: int = 1 << 16):
    """A single large file becomes documents of ~64K characters cut at line ends."""
    with handle as f:
        buf: list[str] = []
        size = 0
        idx = 0
        for line in f:
            buf.append(line)
            size += len(line)
            if size >= block_chars:
                if _in_split(f"{path.name}:{idx}", split, val_fraction):
                    if take("".join(buf)) is None:
                        return
                    yield "".join(buf)
                buf, size, idx = [], 0, idx + 1
        if buf and _in_split(f"{path.name}:{idx}", split, val_fraction) and take("".join(buf)) is not None:
            yield "".join(buf)


def _iter_hf_dataset(path: Path, text_field, split, val_fraction, take):
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise ImportError("data source: reading a Hugging Face dataset folder needs 'datasets' "
                          "(pip install 'titans[hf]')") from None
    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if text_field not in ds.column_names:
        raise ValueError(f"{path}: dataset has no column {text_field!r} (columns: {ds.column_names})")
    for i, row in enumerate(ds):
        if _in_split(f"row:{i}", split, val_fraction):
            if take(row[text_field]) is None:
                return
            yield row[text_field]


def read_corpus_text(source: str, max_bytes: int | None = None, text_field: str = "text") -> str:
    """All (or the first ``max_bytes`` of) a source's text as one string, e.g. for haystacks."""
    return "\n".join(iter_documents(source, text_field=text_field, max_bytes=max_bytes))


# ----------------------------------------------------------------------------- shards


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare_shards(source: str, out_dir: str | Path, tokenizer: Tokenizer, *, text_field: str = "text",
                   val_fraction: float = 0.05, max_bytes: int | None = None, shard_tokens: int = 2**24,
                   progress: bool = True) -> dict:
    """Tokenize ``source`` once into memory-mapped shards under ``out_dir``; returns the manifest."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    manifest = {"format_version": MANIFEST_VERSION, "source": source, "text_field": text_field,
                "tokenizer": tokenizer.to_spec(), "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
                "val_fraction": val_fraction, "max_bytes": max_bytes, "created": time.time(), "splits": {}}
    for split in ("train", "val"):
        shards, total = [], 0
        buf: list[np.ndarray] = []
        buffered = 0
        bar = tqdm(desc=f"tokenizing {split}", unit="tok", unit_scale=True, disable=not progress)

        def flush():
            nonlocal buf, buffered
            if not buffered:
                return
            name = f"{split}_{len(shards):03d}.bin"  # noqa: B023 - flush runs inside its own iteration
            arr = np.concatenate(buf)
            # a temp file of its own (two runs that share a data cache may tokenize it at once), fsync, rename
            atomic_write_with(out / name, arr.tofile)
            shards.append({"file": name, "tokens": int(arr.shape[0]), "sha256": _sha256(out / name)})  # noqa: B023
            buf, buffered = [], 0

        split_budget = None if max_bytes is None else max(1, int(max_bytes * (val_fraction if split == "val"
                                                                               else 1 - val_fraction)))
        for doc in iter_documents(source, text_field=text_field, split=split, val_fraction=val_fraction,
                                  max_bytes=split_budget):
            ids = tokenizer.encode(doc)
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
            arr = np.asarray(ids, dtype=dtype)
            buf.append(arr)
            buffered += arr.shape[0]
            total += arr.shape[0]
            bar.update(arr.shape[0])
            if buffered >= shard_tokens:
                flush()
        flush()
        bar.close()
        if total == 0:
            raise ValueError(f"data source {source!r}: the {split} split is empty (val_fraction={val_fraction}, "
                             f"max_bytes={max_bytes}); documents (files, records, rows) go to one split or the other "
                             "whole, by a stable hash of their name or index: with few documents give more, or change "
                             "val_fraction (data.val_fraction, prepare-data --val-fraction)")
        manifest["splits"][split] = {"tokens": total, "shards": shards}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


class ShardDataset:
    """Tokens of one split of a prepared shard folder, memory-mapped; ``get(start, n)`` crosses shards."""

    def __init__(self, out_dir: str | Path, split: Literal["train", "val"]) -> None:
        self.dir = Path(out_dir)
        mpath = self.dir / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath}: missing; run `titans prepare-data` first")
        try:
            self.manifest = json.loads(mpath.read_text())
            info = self.manifest["splits"][split]
            self.dtype = np.dtype(self.manifest["dtype"])
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{mpath}: corrupt manifest ({type(e).__name__}: {e})") from None
        self.split = split
        self.shards = []
        self.offsets = [0]
        for s in info["shards"]:
            p = self.dir / s["file"]
            if not p.is_file():
                raise FileNotFoundError(f"{p}: shard listed in the manifest is missing")
            size = p.stat().st_size
            if size != s["tokens"] * self.dtype.itemsize:
                raise ValueError(f"{p}: {size} bytes, the manifest says {s['tokens']} tokens of {self.dtype}")
            self.shards.append(np.memmap(p, dtype=self.dtype, mode="r"))
            self.offsets.append(self.offsets[-1] + s["tokens"])
        self.vocab_size = int(self.manifest["vocab_size"])

    def __len__(self) -> int:
        return self.offsets[-1]

    def verify(self) -> None:
        """Recompute every shard's sha256 and compare with the manifest."""
        for s in self.manifest["splits"][self.split]["shards"]:
            p = self.dir / s["file"]
            if _sha256(p) != s["sha256"]:
                raise ValueError(f"{p}: checksum mismatch (file changed or corrupt)")

    def get(self, start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {len(self)})")
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pos = start
        while length > 0:
            local = pos - self.offsets[i]
            n = min(length, self.offsets[i + 1] - pos)
            out.append(np.asarray(self.shards[i][local:local + n]))
            pos += n
            length -= n
            i += 1
        return np.concatenate(out) if len(out) > 1 else out[0]
