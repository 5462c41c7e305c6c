"""Data pipeline: corpus splits, bad data errors, determinism, resumable and sharded iteration."""

import jax
import numpy as np
import pytest

from moejax.train import data

SEQ = 16


def _text_dir(tmp_path, n_files=30, size=400):
    rng = np.random.default_rng(0)
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(n_files):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "\n"], size=size // 5)
        (d / f"f{i:02d}.txt").write_text(" ".join(words))
    return d


def test_stdlib_split_is_by_file_deterministic_and_disjoint():
    cfg = {"source": "stdlib", "val_fraction": 0.1, "max_files": 60}
    a = data.load_corpus(cfg, seq_len=SEQ, vocab_size=256)
    b = data.load_corpus(cfg, seq_len=SEQ, vocab_size=256)
    np.testing.assert_array_equal(a.train_N, b.train_N)
    np.testing.assert_array_equal(a.val_N, b.val_N)
    # Reference split: the same rule applied file by file.
    root, files = data._stdlib_files()
    files = files[:60]
    val = [f for f in files if data._is_val_file(f.relative_to(root).as_posix(), 10.0)]
    train = [f for f in files if f not in val]
    assert val and train
    assert a.val_N.tobytes() == b"".join(f.read_bytes() for f in val)
    assert a.train_N.tobytes() == b"".join(f.read_bytes() for f in train)
    assert a.vocab_size == 256 and a.train_N.dtype == np.uint8


def test_text_directory_and_single_file(tmp_path):
    d = _text_dir(tmp_path)
    c = data.load_corpus(
        {"source": "text", "path": str(d), "val_fraction": 0.2}, seq_len=SEQ, vocab_size=256
    )
    total = sum(f.stat().st_size for f in d.iterdir())
    assert len(c.train_N) + len(c.val_N) == total and len(c.val_N) > 0
    one = d / "f00.txt"
    c1 = data.load_corpus(
        {"source": "text", "path": str(one), "val_fraction": 0.25}, seq_len=SEQ, vocab_size=256
    )
    raw = one.read_bytes()
    cut = len(raw) - round(len(raw) * 0.25)
    assert c1.train_N.tobytes() == raw[:cut] and c1.val_N.tobytes() == raw[cut:]


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files(tmp_path, suffix):
    tokens = np.random.default_rng(1).integers(0, 1000, size=5000).astype(np.uint16)
    path = tmp_path / f"tok{suffix}"
    if suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    c = data.load_corpus(
        {"source": "tokens", "path": str(path), "val_fraction": 0.1, "token_dtype": "uint16"},
        seq_len=SEQ,
        vocab_size=1000,
    )
    assert isinstance(c.train_N, np.memmap)
    np.testing.assert_array_equal(np.concatenate([c.train_N, c.val_N]), tokens)
    batch = next(data.train_iterator(c, seq_len=SEQ, batch_size=4, seed=0))
    assert batch.shape == (4, SEQ + 1) and batch.dtype == np.int32
    # Out-of-vocabulary ids are reported when read.
    small = data.load_corpus(
        {"source": "tokens", "path": str(path), "val_fraction": 0.1, "token_dtype": "uint16"},
        seq_len=SEQ,
        vocab_size=10,
    )
    with pytest.raises(ValueError, match="vocab_size=10"):
        next(data.train_iterator(small, seq_len=SEQ, batch_size=4, seed=0))


def test_bad_data_errors(tmp_path):
    def load(**cfg):
        return data.load_corpus({"val_fraction": 0.1, **cfg}, seq_len=SEQ, vocab_size=256)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty directory"):
        load(source="text", path=str(empty))
    with pytest.raises(ValueError, match="does not exist"):
        load(source="text", path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="data.path is required"):
        load(source="text", path=None)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="looks binary"):
        load(source="text", path=str(binary))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="too short"):
        load(source="text", path=str(short))
    with pytest.raises(ValueError, match="data.source"):
        load(source="parquet")
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_corpus({"source": "stdlib", "val_fraction": 1.5}, seq_len=SEQ, vocab_size=256)
    with pytest.raises(ValueError, match="vocab_size"):
        data.load_corpus({"source": "stdlib", "val_fraction": 0.1}, seq_len=SEQ, vocab_size=100)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="not a multiple"):
        load(source="tokens", path=str(bad), token_dtype="uint16")
    with pytest.raises(ValueError, match="data.path"):
        load(source="tokens", path=str(tmp_path / "nope.npy"))


def test_iterator_deterministic_shuffled_and_resumable(tmp_path):
    c = data.load_corpus(
        {"source": "text", "path": str(_text_dir(tmp_path)), "val_fraction": 0.2},
        seq_len=SEQ,
        vocab_size=256,
    )
    n = data.num_windows(c.train_N, SEQ)
    it = data.train_iterator(c, seq_len=SEQ, batch_size=4, seed=3)
    batches = [next(it) for _ in range(5)]
    state = it.get_state()
    rest = [next(it) for _ in range(5)]
    again = data.train_iterator(c, seq_len=SEQ, batch_size=4, seed=3)
    for a, b in zip(batches, [next(again) for _ in range(5)], strict=True):
        np.testing.assert_array_equal(a, b)
    resumed = data.train_iterator(c, seq_len=SEQ, batch_size=4, seed=3)
    resumed.set_state(state)
    for a, b in zip(rest, [next(resumed) for _ in range(5)], strict=True):
        np.testing.assert_array_equal(a, b)
    # Windows are exact slices of the stream (targets are inputs shifted by one).
    starts = {c.train_N[i * SEQ : i * SEQ + SEQ + 1].tobytes(): i for i in range(n)}
    rows = [r.astype(np.uint8).tobytes() for b in batches for r in b]
    assert all(r in starts for r in rows)
    order = [starts[r] for r in rows]
    assert order != sorted(order)  # shuffled
    other = next(data.train_iterator(c, seq_len=SEQ, batch_size=4, seed=4))
    assert not np.array_equal(other, batches[0])


def test_process_rows_partition_each_global_batch():
    # Token i has id i, so a window is identified by its first token. Two "processes" loading
    # rows [0, 2) and [2, 4) of every global batch of 4 together load exactly the global batch
    # one process loads, step by step: the batches do not depend on the process count.
    tokens_N = np.arange(40 * SEQ + 1)
    kw = dict(seq_len=SEQ, batch_size=4, seed=0, vocab_size=10**6)
    whole = iter(data.make_dataset(tokens_N, **kw))
    halves = [
        iter(data.make_dataset(tokens_N, rows=np.arange(2 * p, 2 * p + 2), **kw)) for p in (0, 1)
    ]
    for _ in range(12):  # more than one epoch (10 batches)
        np.testing.assert_array_equal(next(whole), np.concatenate([next(h) for h in halves]))
    # The state counts global batches: a process resumes where any other process count stopped.
    state = whole.get_state()
    resumed = iter(data.make_dataset(tokens_N, rows=np.arange(2), **kw))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed), next(whole)[:2])
    with pytest.raises(ValueError, match="batch_size"):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
        rows = data.process_rows(jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), 3)
        assert list(rows) == [0, 1, 2]
        data.process_rows(_FakeBlocks(), 3)


class _FakeBlocks:
    """A stand-in sharding whose batch has 2 row blocks (process_rows only reads indices)."""

    device_set = frozenset(("d0", "d1"))
    addressable_devices = frozenset(("d0", "d1"))

    def devices_indices_map(self, shape):
        half = shape[0] // 2
        return {"d0": (slice(0, half), slice(None)), "d1": (slice(half, shape[0]), slice(None))}


def test_eval_batches_fixed(tmp_path):
    c = data.load_corpus(
        {"source": "text", "path": str(_text_dir(tmp_path)), "val_fraction": 0.2},
        seq_len=SEQ,
        vocab_size=256,
    )
    a = list(data.eval_batches(c, seq_len=SEQ, batch_size=4, max_batches=3))
    b = list(data.eval_batches(c, seq_len=SEQ, batch_size=4, max_batches=3))
    assert 1 <= len(a) <= 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a[0][0], c.val_N[: SEQ + 1])  # in order, unshuffled
