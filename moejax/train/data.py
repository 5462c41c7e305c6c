"""Token data for training: corpus loading and a deterministic, sharded grain pipeline.

Four sources, chosen by `data.source`:
  - "stdlib": the Python standard library's own *.py files (ships with Python, nothing to
    download), read as bytes (vocab 256);
  - "text": a user text file or a directory of text files, read as bytes (vocab 256);
  - "tokens": pre-tokenized numpy token files (`.npy` via `np.load(mmap_mode="r")`, anything
    else via `np.memmap` with `data.token_dtype`);
  - "jsonl": documents, one JSON object per line of a file (or of every *.jsonl / *.json file
    under a directory), each with a "text" field or "prompt" and "completion" fields (the loss
    counts the completion only). Byte-level (UTF-8) by default, or the Hugging Face tokenizer
    saved in the local directory `data.tokenizer` (offline; its BOS/EOS tokens added around
    each document). Documents are packed into rows of L + 1 tokens in file order: a row holds
    whole documents with segment ids 1, 2, ... (a document longer than a row is cut into
    row-sized pieces), the rest is padding (segment 0, token 0); see `PackedRows`.

Multi-file corpora are split into train/validation BY FILE, deterministically (a CRC of the
file's relative path), so no validation file is ever seen in training. A single file (or a
token array) is split by position: the last `val_fraction` of it is validation.

The pipeline cuts the token stream into non-overlapping windows of `seq_len + 1` tokens (inputs
plus the next-token targets), shuffles ALL windows with the seed (reshuffled every epoch),
repeats forever and batches into GLOBAL batches; each process then loads only its rows of each
global batch (`process_rows`: the rows its devices hold under the batch sharding, in the order
`jax.make_array_from_process_local_data` expects). So the global batch at step s is the same
for any process count, and the iterator state (`get_state`/`set_state`, a small JSON-able dict
the checkpoint stores: the index of the next global batch) is global: a run resumes on another
process count with the same batches. Evaluation splits its fixed batches the same way.

Shape legend: B global batch, R rows this process loads, L sequence length, N corpus tokens.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sysconfig
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

SOURCES = ("stdlib", "text", "tokens", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".json")

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
    train_rows: PackedRows | None = None
    val_rows: PackedRows | None = None


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """Documents packed into rows of L + 1 tokens (data.source="jsonl"): int32 [N, L + 1] each.

    Attributes:
      tokens: token ids; 0 at padding.
      segment_ids: 0 = padding, 1, 2, ... the documents of the row, in order.
      loss_mask: 1 where a token is a target the loss counts (text, completions), 0 for
        prompts and padding.
    """

    tokens: np.ndarray
    segment_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def row(self, i: int) -> dict[str, np.ndarray]:
        return {
            "tokens": self.tokens[i],
            "segment_ids": self.segment_ids[i],
            "loss_mask": self.loss_mask[i],
        }


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
    byte_level = source in ("stdlib", "text") or (
        source == "jsonl" and not data_cfg.get("tokenizer")
    )
    if byte_level and vocab_size < 256:
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
    elif source == "jsonl":
        return _load_jsonl(data_cfg, seq_len=seq_len, vocab_size=vocab_size)
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


def load_tokenizer(path: str):
    """The Hugging Face tokenizer saved in the local directory `path` (data.tokenizer), offline."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"data.tokenizer={str(path)!r} is not an existing directory")
    from transformers import AutoTokenizer  # noqa: PLC0415 (optional: the hf/test extras)

    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"data.tokenizer={str(path)!r}: no tokenizer could be loaded: {e}") from e


class _Encoder:
    """Text -> token ids: UTF-8 bytes, or a tokenizer with its BOS/EOS around each document."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def ids(self, text: str) -> list[int]:
        if self._tok is None:
            return list(text.encode("utf-8"))
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def bos(self) -> list[int]:
        tok = self._tok
        return [] if tok is None or tok.bos_token_id is None else [tok.bos_token_id]

    def eos(self) -> list[int]:
        tok = self._tok
        return [] if tok is None or tok.eos_token_id is None else [tok.eos_token_id]


def _jsonl_documents(path: Path, encoder: _Encoder) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, loss mask) of every document of one JSON-lines file."""
    docs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"data.path: {str(path)!r} line {line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if isinstance(record.get("text"), str):
                ids = encoder.bos() + encoder.ids(record["text"]) + encoder.eos()
                mask = [1] * len(ids)
            elif isinstance(record.get("prompt"), str) and isinstance(
                record.get("completion"), str
            ):
                prompt = encoder.bos() + encoder.ids(record["prompt"])
                completion = encoder.ids(record["completion"]) + encoder.eos()
                ids = prompt + completion
                mask = [0] * len(prompt) + [1] * len(completion)
            else:
                raise ValueError(
                    f"{where}: needs a string field 'text', or string fields 'prompt' and "
                    f"'completion'; got keys {sorted(record)}"
                )
            if len(ids) >= 2:  # one token has no next-token target
                docs.append((np.asarray(ids, np.int64), np.asarray(mask, np.int32)))
    return docs


def pack_documents(docs: list[tuple[np.ndarray, np.ndarray]], row_len: int) -> PackedRows:
    """Packs (tokens, loss mask) documents, in order, into rows of `row_len` tokens.

    Greedy: a document goes into the current row when it fits, else it starts a new row; a
    document longer than a row is cut into row-sized pieces, each starting a row. Rows end in
    padding (segment 0, token 0, loss mask 0).
    """
    tokens, segments, masks = [], [], []
    cur_t, cur_s, cur_m = [], [], []

    def close():
        if cur_t:
            pad = row_len - sum(len(t) for t in cur_t)
            tokens.append(np.concatenate([*cur_t, np.zeros(pad, np.int64)]))
            segments.append(np.concatenate([*cur_s, np.zeros(pad, np.int32)]))
            masks.append(np.concatenate([*cur_m, np.zeros(pad, np.int32)]))
            cur_t.clear(), cur_s.clear(), cur_m.clear()

    for ids, mask in docs:
        for start in range(0, len(ids), row_len):
            piece, piece_mask = ids[start : start + row_len], mask[start : start + row_len]
            if len(piece) < 2:
                continue
            if sum(len(t) for t in cur_t) + len(piece) > row_len:
                close()
            cur_t.append(piece)
            cur_s.append(np.full(len(piece), len(cur_s) + 1, np.int32))
            cur_m.append(piece_mask)
    close()
    if not tokens:
        shape = (0, row_len)
        return PackedRows(*(np.zeros(shape, np.int32) for _ in range(3)))
    return PackedRows(
        np.stack(tokens).astype(np.int32), np.stack(segments), np.stack(masks).astype(np.int32)
    )


def _load_jsonl(data_cfg: Mapping[str, Any], *, seq_len: int, vocab_size: int) -> Corpus:
    path = data_cfg.get("path")
    if not path:
        raise ValueError("data.path is required when data.source='jsonl'")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"data.path={str(path)!r} does not exist")
    files = [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in JSONL_SUFFIXES)
        if data_cfg.get("max_files"):
            files = files[: data_cfg["max_files"]]
        if not files:
            raise ValueError(
                f"data.path={str(path)!r} holds no {' or '.join(JSONL_SUFFIXES)} files"
            )
    tokenizer_dir = data_cfg.get("tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    encoder = _Encoder(tokenizer)
    val_fraction = float(data_cfg.get("val_fraction", 0.05))
    train_docs, val_docs = [], []
    for f in files:
        docs = _jsonl_documents(f, encoder)
        rel = f.relative_to(p).as_posix() if f != p else f.name
        if len(files) > 1:  # by file, as the text sources
            (val_docs if _is_val_file(rel, 100.0 * val_fraction) else train_docs).extend(docs)
            continue
        for i, doc in enumerate(docs):  # one file: by document
            held_out = _is_val_file(f"{rel}:{i}", 100.0 * val_fraction)
            (val_docs if held_out else train_docs).append(doc)
    if not val_docs and len(train_docs) > 1:
        val_docs.append(train_docs.pop())  # deterministic, as for files
    for name, docs in (("train", train_docs), ("validation", val_docs)):
        if not docs:
            raise ValueError(
                f"data.path={str(path)!r}: the {name} split has no document of >= 2 tokens"
            )
        top = max(int(d[0].max()) for d in docs)
        if top >= vocab_size:
            raise ValueError(
                f"data: token id {top} is outside [0, model.vocab_size={vocab_size}) "
                f"(data.tokenizer={tokenizer_dir!r})"
            )
    train_rows = pack_documents(train_docs, seq_len + 1)
    val_rows = pack_documents(val_docs, seq_len + 1)
    kind = f"tokenizer {tokenizer_dir}" if tokenizer_dir else "bytes"
    desc = (
        f"jsonl {p} ({len(train_docs)} train / {len(val_docs)} val documents in "
        f"{len(train_rows)} / {len(val_rows)} packed rows, {kind})"
    )
    return Corpus(
        train_N=np.concatenate([d[0] for d in train_docs]).astype(np.int32),
        val_N=np.concatenate([d[0] for d in val_docs]).astype(np.int32),
        vocab_size=vocab_size,
        description=desc,
        train_rows=train_rows,
        val_rows=val_rows,
    )


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


def _row_blocks(sharding: jax.sharding.Sharding) -> tuple[int, list[int]]:
    """A batch cut by `sharding` into equal row blocks: (number of blocks, this process's blocks).

    Rows replicated over some mesh axes (e.g. `tensor`) give fewer blocks than devices; a block
    held by several of this process's devices is listed once, ascending, as
    `make_array_from_process_local_data` concatenates them.
    """
    n = len(sharding.device_set)  # every block count of a mesh sharding divides it
    starts = {d: idx[0].indices(n)[0] for d, idx in sharding.devices_indices_map((n, 1)).items()}
    size = n // len(set(starts.values()))
    mine = sorted({starts[d] // size for d in sharding.addressable_devices})
    return n // size, mine


def process_rows(sharding: jax.sharding.Sharding | None, batch_size: int) -> np.ndarray:
    """Rows of a global [B, ...] batch this process loads under a batch sharding.

    Args:
      sharding: the batch's sharding (rows over the batch mesh axes); None = all rows.
      batch_size: B.

    Returns:
      int array [R] of row indices, ascending.

    Raises:
      ValueError: B is not divisible by the number of row blocks.
    """
    if sharding is None:
        return np.arange(batch_size)
    blocks, mine = _row_blocks(sharding)
    if batch_size % blocks:
        raise ValueError(
            f"train.batch_size={batch_size} is invalid: must be divisible by the {blocks} "
            "batch shards of the mesh (data x fsdp x expert)"
        )
    per = batch_size // blocks
    return np.concatenate([np.arange(b * per, (b + 1) * per) for b in mine])


def batch_tokens(batch):
    """The token windows [.., L + 1] of a batch: the array itself, or a packed batch's
    "tokens" (its segment ids and loss mask dropped)."""
    return batch["tokens"] if isinstance(batch, Mapping) else batch


def global_batch(local_RxL, sharding: jax.sharding.Sharding):
    """The global [B, ...] array from this process's rows (see `process_rows`); a dict of
    such rows (packed data) gives a dict of global arrays."""
    if isinstance(local_RxL, Mapping):
        return {k: global_batch(v, sharding) for k, v in local_RxL.items()}
    blocks, mine = _row_blocks(sharding)
    batch_size = local_RxL.shape[0] // len(mine) * blocks
    return jax.make_array_from_process_local_data(
        sharding, local_RxL, (batch_size, *local_RxL.shape[1:])
    )


class _LoadRows:
    """Window ids of one global batch [B] -> this process's windows [R, L + 1] (a dict of them
    for packed rows)."""

    def __init__(self, windows, rows_R: np.ndarray):
        self._windows = windows
        self._rows_R = rows_R

    def __call__(self, ids_B: np.ndarray):
        items = [self._windows(i) for i in np.asarray(ids_B)[self._rows_R]]
        if isinstance(items[0], dict):
            return {k: np.stack([it[k] for it in items]) for k in items[0]}
        return np.stack(items)


def make_dataset(
    tokens_N: np.ndarray | PackedRows,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    vocab_size: int,
    shuffle: bool = True,
    repeat: bool = True,
    rows: np.ndarray | None = None,
) -> grain.IterDataset:
    """The grain pipeline over one split: windows -> shuffle -> repeat -> global batch -> rows.

    Args:
      tokens_N: the split's token stream, or its packed rows (each row one example).
      seq_len: L; each example is L + 1 tokens.
      batch_size: GLOBAL batch size B.
      seed: shuffle seed (each epoch is reshuffled, deterministically).
      vocab_size: token ids must be in [0, vocab_size).
      shuffle / repeat: False for evaluation (one deterministic pass).
      rows: the rows of each global batch to load (`process_rows`); None = all B.

    Returns:
      A grain IterDataset of int32 arrays [R, L + 1] (for packed rows, dicts of them: tokens,
      segment_ids, loss_mask); its state counts global batches.
    """
    rows_R = np.arange(batch_size) if rows is None else np.asarray(rows)
    if isinstance(tokens_N, PackedRows):
        examples, load = len(tokens_N), tokens_N.row
    else:
        examples = num_windows(tokens_N, seq_len)
        load = _Windows(tokens_N, seq_len, vocab_size)
    ds = grain.MapDataset.range(examples)
    if repeat and len(ds) < batch_size:
        logging.warning("data: %d windows < global batch %d", len(ds), batch_size)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds.map(_LoadRows(load, rows_R))
    return ds.to_iter_dataset()


def train_iterator(
    corpus: Corpus,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    sharding: jax.sharding.Sharding | None = None,
):
    """An infinite, shuffled iterator of this process's rows [R, L + 1] of each global batch.

    Args:
      corpus: the data.
      seq_len: L.
      batch_size: global batch size B.
      seed: shuffle seed.
      sharding: the batch sharding that picks this process's rows; None = all rows.

    Returns:
      A grain iterator with get_state/set_state (global: independent of the process count).
    """
    ds = make_dataset(
        corpus.train_N if corpus.train_rows is None else corpus.train_rows,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        vocab_size=corpus.vocab_size,
        rows=process_rows(sharding, batch_size),
    )
    return iter(ds)


def eval_batches(
    corpus: Corpus,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    sharding: jax.sharding.Sharding | None = None,
) -> Iterator[np.ndarray]:
    """Fixed validation batches: the same windows, in order, every evaluation.

    A split smaller than B shrinks the global batch (to a multiple of the batch shards) rather
    than yield nothing; the remainder is dropped so every batch has one shape (one compiled
    eval step). Each process yields its rows [R, L + 1] of every global batch.
    """
    val = corpus.val_N if corpus.val_rows is None else corpus.val_rows
    n = len(val) if corpus.val_rows is not None else num_windows(corpus.val_N, seq_len)
    blocks = 1 if sharding is None else _row_blocks(sharding)[0]
    size = min(batch_size, n) // blocks * blocks
    if not size:
        raise ValueError(
            f"data: the validation split has {n} examples (windows or packed rows of "
            f"train.seq_len + 1 tokens), fewer than the {blocks} batch shards of the mesh; use "
            "more validation data"
        )
    ds = make_dataset(
        val,
        seq_len=seq_len,
        batch_size=size,
        seed=0,
        vocab_size=corpus.vocab_size,
        shuffle=False,
        repeat=False,
        rows=process_rows(sharding, size),
    )
    for i, batch in enumerate(ds):
        if max_batches is not None and i >= max_batches:
            return
        yield batch
