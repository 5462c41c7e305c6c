"""Token data for training: corpus loading and a deterministic, sharded grain pipeline.

Three sources, chosen by `data.source`:
  - "stdlib": the Python standard library's own *.py files (ships with Python, nothing to
    download), read as bytes (vocab 256);
  - "text": a user text file or a directory of text files, read as bytes (vocab 256);
  - "tokens": pre-tokenized numpy token files (`.npy` via `np.load(mmap_mode="r")`, anything
    else via `np.memmap` with `data.token_dtype`).

Multi-file corpora are split into train/validation BY FILE, deterministically (a CRC of the
file's relative path), so no validation file is ever seen in training. A single file (or a
token array) is split by position: the last `val_fraction` of it is validation.

The pipeline cuts the token stream into non-overlapping windows of `seq_len + 1` tokens (inputs
plus the next-token targets), keeps this process's share (`jax.process_index()::process_count()`),
shuffles (reshuffled every epoch), repeats forever and batches. Its iterator state is a small
JSON-able dict (`get_state`/`set_state`) that the checkpoint stores next to the model state.

Shape legend: B batch (per process), L sequence length, N corpus tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import sysconfig
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

SOURCES = ("stdlib", "text", "tokens")

# Bytes that never occur in text files; used to reject binary files in text mode.
_BINARY_SNIFF_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A train/validation pair of 1-D token arrays (possibly memory-mapped).

    Attributes:
      train_N: training tokens.
      val_N: validation tokens.
      vocab_size: number of distinct token ids the data may hold.
      description: one line saying where the data came from (for logs and the summary).
    """

    train_N: np.ndarray
    val_N: np.ndarray
    vocab_size: int
    description: str


def _is_val_file(rel_path: str, val_percent: float) -> bool:
    # A CRC of the relative path: stable across runs, machines and Python hash seeds.
    return zlib.crc32(rel_path.encode()) % 10_000 < val_percent * 100


def _read_text_file(path: Path) -> bytes:
    data = path.read_bytes()
    head = data[:_BINARY_SNIFF_BYTES]
    if b"\x00" in head:
        raise ValueError(
            f"data.path: {str(path)!r} looks binary (contains NUL bytes); data.source='text' "
            "reads text files only (use data.source='tokens' for token arrays)"
        )
    return data


def _split_files(
    files: list[Path], root: Path, val_fraction: float, reader
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Concatenate files into train and validation byte streams, split by file."""
    train_parts, val_parts = [], []
    for f in files:
        rel = f.relative_to(root).as_posix() if f != root else f.name
        (val_parts if _is_val_file(rel, 100.0 * val_fraction) else train_parts).append(reader(f))
    if not val_parts and len(train_parts) > 1:
        # Too few files for the hash to pick one: take the last file (sorted order) so the
        # split stays by file and deterministic.
        val_parts.append(train_parts.pop())
    n_train, n_val = len(train_parts), len(val_parts)
    train_N = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
    val_N = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
    return train_N, val_N, n_train, n_val


def _split_position(tokens_N: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(round(len(tokens_N) * val_fraction))
    cut = len(tokens_N) - n_val
    return tokens_N[:cut], tokens_N[cut:]


def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts and p.is_file()
    )
    if not files:
        raise ValueError(f"data.source='stdlib': no *.py files under {str(root)!r}")
    return root, files


def load_corpus(data_cfg: Mapping[str, Any], *, seq_len: int, vocab_size: int) -> Corpus:
    """Loads the corpus a config's `data` section names and checks it is usable.

    Args:
      data_cfg: the `data` section: source, path, val_path, val_fraction, token_dtype,
        max_files.
      seq_len: training sequence length L; both splits need at least one window of L + 1.
      vocab_size: the model's vocabulary; byte sources need >= 256.

    Returns:
      A Corpus with 1-D train and validation token arrays.

    Raises:
      ValueError: naming the `data.*` field when the source, path or data is unusable.
    """
    source = data_cfg["source"]
    val_fraction = float(data_cfg.get("val_fraction", 0.05))
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r} is invalid: allowed values are {SOURCES}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    if source in ("stdlib", "text") and vocab_size < 256:
        raise ValueError(
            f"model.vocab_size={vocab_size} is invalid for byte-level data.source={source!r}: "
            "must be >= 256"
        )
    max_files = data_cfg.get("max_files")

    if source == "stdlib":
        root, files = _stdlib_files()
        if max_files:
            files = files[:max_files]
        train_N, val_N, n_tr, n_va = _split_files(files, root, val_fraction, Path.read_bytes)
        desc = f"Python stdlib sources under {root} ({n_tr} train / {n_va} val files)"
    elif source == "text":
        path = data_cfg.get("path")
        if not path:
            raise ValueError("data.path is required when data.source='text'")
        p = Path(path).expanduser()
        if not p.exists():
            raise ValueError(f"data.path={str(path)!r} does not exist")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            if max_files:
                files = files[:max_files]
            if not files:
                raise ValueError(f"data.path={str(path)!r} is an empty directory")
            if len(files) == 1:
                tokens = np.frombuffer(_read_text_file(files[0]), dtype=np.uint8)
                train_N, val_N = _split_position(tokens, val_fraction)
                desc = f"text file {files[0]} (last {val_fraction:.0%} held out)"
            else:
                train_N, val_N, n_tr, n_va = _split_files(files, p, val_fraction, _read_text_file)
                desc = f"text files under {p} ({n_tr} train / {n_va} val files)"
        else:
            tokens = np.frombuffer(_read_text_file(p), dtype=np.uint8)
            train_N, val_N = _split_position(tokens, val_fraction)
            desc = f"text file {p} (last {val_fraction:.0%} held out)"
    else:
        train_N = _load_tokens(data_cfg.get("path"), data_cfg, "data.path")
        if data_cfg.get("val_path"):
            val_N = _load_tokens(data_cfg["val_path"], data_cfg, "data.val_path")
            desc = f"token files {data_cfg['path']} / {data_cfg['val_path']}"
        else:
            train_N, val_N = _split_position(train_N, val_fraction)
            desc = f"token file {data_cfg['path']} (last {val_fraction:.0%} held out)"

    for name, arr in (("train", train_N), ("validation", val_N)):
        if len(arr) < seq_len + 1:
            raise ValueError(
                f"data: the {name} split has {len(arr)} tokens, too short for one sequence of "
                f"train.seq_len + 1 = {seq_len + 1}; use more data or a shorter train.seq_len"
            )
    return Corpus(train_N=train_N, val_N=val_N, vocab_size=vocab_size, description=desc)


def _load_tokens(path: str | None, data_cfg: Mapping[str, Any], field: str) -> np.ndarray:
    if not path:
        raise ValueError(f"{field} is required when data.source='tokens'")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{field}={str(path)!r} is not an existing file")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"{field}={str(path)!r} is not a readable .npy file: {e}") from e
    else:
        dtype = np.dtype(data_cfg.get("token_dtype", "uint16"))
        if p.stat().st_size % dtype.itemsize:
            raise ValueError(
                f"{field}={str(path)!r}: size {p.stat().st_size} bytes is not a multiple of "
                f"data.token_dtype={dtype.name!r} ({dtype.itemsize} bytes)"
            )
        arr = np.memmap(p, dtype=dtype, mode="r")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{field}={str(path)!r} must hold a 1-D integer token array, got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    return arr


class _Windows:
    """Window i of a token stream: tokens[i*L : i*L + L + 1] as int32 (inputs + targets)."""

    def __init__(self, tokens_N: np.ndarray, seq_len: int, vocab_size: int):
        self._tokens_N = tokens_N
        self._seq_len = seq_len
        self._vocab_size = vocab_size

    def __call__(self, i: int) -> np.ndarray:
        start = int(i) * self._seq_len
        w = np.asarray(self._tokens_N[start : start + self._seq_len + 1], dtype=np.int32)
        # Token files are checked lazily (a memmap may be far larger than what a run reads).
        if w.size and (w.min() < 0 or w.max() >= self._vocab_size):
            raise ValueError(
                f"data: token id {int(w.max())} (or {int(w.min())}) is outside "
                f"[0, model.vocab_size={self._vocab_size})"
            )
        return w


def num_windows(tokens_N: np.ndarray, seq_len: int) -> int:
    """Non-overlapping windows of L + 1 tokens (stride L) in a stream of N tokens."""
    return (len(tokens_N) - 1) // seq_len


def make_dataset(
    tokens_N: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    vocab_size: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The grain pipeline over one split: windows -> process shard -> shuffle -> repeat -> batch.

    Args:
      tokens_N: the split's token stream.
      seq_len: L; each example is L + 1 tokens.
      batch_size: GLOBAL batch size; each process yields batch_size // process_count rows.
      seed: shuffle seed (each epoch is reshuffled, deterministically).
      vocab_size: token ids must be in [0, vocab_size).
      shuffle / repeat: False for evaluation (one deterministic pass).
      process_index / process_count: default jax.process_index() / jax.process_count().

    Returns:
      A grain IterDataset of int32 arrays [B, L + 1].
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if batch_size % pc:
        raise ValueError(
            f"train.batch_size={batch_size} is invalid: must be divisible by the process count {pc}"
        )
    local_batch = batch_size // pc
    n = num_windows(tokens_N, seq_len)
    ds = grain.MapDataset.range(n)[pi::pc]
    if not repeat:
        # One pass (evaluation): shrink the batch for a tiny split rather than yield nothing;
        # the remainder is dropped so every batch has one shape (one compiled eval step).
        local_batch = max(1, min(local_batch, len(ds)))
    elif len(ds) < local_batch:
        logging.warning("data: %d windows per process < batch %d", len(ds), local_batch)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(_Windows(tokens_N, seq_len, vocab_size))
    ds = ds.batch(local_batch, drop_remainder=True)
    return ds.to_iter_dataset()


def train_iterator(corpus: Corpus, *, seq_len: int, batch_size: int, seed: int):
    """An infinite, shuffled iterator of training batches [B, L + 1] with get_state/set_state."""
    ds = make_dataset(
        corpus.train_N,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        vocab_size=corpus.vocab_size,
    )
    return iter(ds)


def eval_batches(
    corpus: Corpus, *, seq_len: int, batch_size: int, max_batches: int | None
) -> Iterator[np.ndarray]:
    """Fixed validation batches [B, L + 1]: the same windows, in order, every evaluation."""
    ds = make_dataset(
        corpus.val_N,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=0,
        vocab_size=corpus.vocab_size,
        shuffle=False,
        repeat=False,
    )
    for i, batch in enumerate(ds):
        if max_batches is not None and i >= max_batches:
            return
        yield batch
