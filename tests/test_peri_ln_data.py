"""Tests for peri_ln/data.py: the pydocs byte corpus, token files, windows, batches, process shards."""

import itertools
import math
import os

import jax
import numpy as np
import pytest

from peri_ln import data

needs_pydocs = pytest.mark.skipif(
    not os.path.isdir(data.DEFAULT_PYDOCS_DIR), reason="python3.11-doc is not installed"
)
SEQ_LEN = 4


def tokens_config(directory, num_train=203, num_validation=71, vocab_size=2**16):
    """A tokens: source whose streams are 0, 1, 2, ...: a window's first input is its offset."""
    data.write_token_file(directory, "train", np.arange(num_train), vocab_size)
    data.write_token_file(directory, "validation", np.arange(num_validation), vocab_size)
    cfg = data.default_data_config()
    cfg.source = f"tokens:{directory}"
    return cfg


def fake_processes(monkeypatch, index, count):
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def take(iterator, n):
    return [dict(b) for b in itertools.islice(iterator, n)]


# --- Corpora --------------------------------------------------------------------------------------


@needs_pydocs
def test_pydocs_corpus_splits_by_file():
    cfg = data.default_data_config()
    splits = data.split_files(cfg.path, cfg.glob, cfg.validation_fraction)
    assert splits == data.split_files(cfg.path, cfg.glob, cfg.validation_fraction)
    assert splits["validation"] and not set(splits["train"]) & set(splits["validation"])
    for split, files in splits.items():
        stream = data.load_stream(cfg, split)
        sizes = sum(os.path.getsize(os.path.join(cfg.path, f)) for f in files)
        assert stream.dtype == np.uint8 and len(stream) == sizes + len(files)
        assert (stream == data.EOD).sum() == len(files)  # one separator per document, none inside
    batch = next(data.train_iterator(cfg, 2, SEQ_LEN, seed=0))
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        k: (np.int32, (2, SEQ_LEN)) for k in ("inputs", "targets")
    }


@needs_pydocs
def test_pydocs_validation_entropy_is_below_uniform():
    cfg = data.default_data_config()
    assert 0 < data.unigram_entropy(data.load_stream(cfg, "validation"), data.vocab_size(cfg)) < math.log(256)


def test_split_is_stable_when_files_are_added(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.rst.txt").write_text(f"document {i}\n")
    before = data.split_files(str(tmp_path), "**/*.rst.txt", 0.3)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "new.rst.txt").write_text("new\n")
    after = data.split_files(str(tmp_path), "**/*.rst.txt", 0.3)
    for split in data.SPLITS:
        assert set(before[split]) <= set(after[split])
    assert before["train"] and before["validation"]


def test_missing_directory_names_the_fix(tmp_path):
    cfg = data.default_data_config()
    cfg.path = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        data.load_stream(cfg, "train")
    assert "apt-get install python3.11-doc" in str(error.value) and "config.data.path" in str(error.value)


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (100_000, np.uint32)])
def test_token_files_round_trip(tmp_path, vocab_size, dtype):
    tokens = np.random.default_rng(0).integers(0, vocab_size, 50)
    data.write_token_file(tmp_path, "validation", tokens, vocab_size)
    cfg = data.default_data_config()
    cfg.source = f"tokens:{tmp_path}"
    stream = data.load_stream(cfg, "validation")
    assert isinstance(stream, np.memmap) and stream.dtype == dtype
    np.testing.assert_array_equal(stream, tokens)
    assert data.vocab_size(cfg) == vocab_size
    with pytest.raises(ValueError, match="meta.json"):
        data.write_token_file(tmp_path, "train", tokens % 10, 10)  # another vocabulary, same directory


def test_unigram_entropy_matches_numpy():
    stream = np.random.default_rng(0).integers(0, 7, 1000).astype(np.uint8)
    _, counts = np.unique(stream, return_counts=True)
    p = counts / counts.sum()
    assert data.unigram_entropy(stream, 256) == pytest.approx(-(p * np.log(p)).sum())


# --- Windows and batches --------------------------------------------------------------------------


def test_targets_are_inputs_shifted_by_one():
    windows = data.read_windows(np.arange(100, dtype=np.uint16), np.array([0, 3]), SEQ_LEN)
    np.testing.assert_array_equal(windows["inputs"], [[0, 1, 2, 3], [12, 13, 14, 15]])
    np.testing.assert_array_equal(windows["targets"], windows["inputs"] + 1)
    assert windows["inputs"].dtype == np.int32


def test_train_iterator_is_deterministic_and_resumes(tmp_path):
    cfg = tokens_config(tmp_path)
    first = take(data.train_iterator(cfg, 8, SEQ_LEN, seed=3), 12)  # crosses an epoch (50 windows)
    np.testing.assert_equal(first, take(data.train_iterator(cfg, 8, SEQ_LEN, seed=3), 12))
    other_seed = next(data.train_iterator(cfg, 8, SEQ_LEN, seed=4))
    assert not np.array_equal(first[0]["inputs"], other_seed["inputs"])
    iterator = data.train_iterator(cfg, 8, SEQ_LEN, seed=3)
    take(iterator, 5)
    restored = data.train_iterator(cfg, 8, SEQ_LEN, seed=3)
    restored.set_state(iterator.get_state())
    np.testing.assert_equal(take(restored, 7), first[5:])


def test_processes_read_disjoint_windows(monkeypatch, tmp_path):
    cfg = tokens_config(tmp_path)  # 50 train windows: 25 per process, 6 local batches of 4 in an epoch
    seen = []
    for index in range(2):
        fake_processes(monkeypatch, index, 2)
        batches = take(data.train_iterator(cfg, 8, SEQ_LEN, seed=0), 6)
        assert batches[0]["inputs"].shape == (4, SEQ_LEN)
        offsets = np.concatenate([b["inputs"][:, 0] for b in batches])
        assert len(set(offsets)) == len(offsets)
        seen.append(set(offsets))
    assert not seen[0] & seen[1]


def test_eval_batches_agree_across_processes(monkeypatch, tmp_path):
    cfg = tokens_config(tmp_path)  # 17 validation windows: two full global batches of 8
    per_process = []
    for index in range(2):
        fake_processes(monkeypatch, index, 2)
        per_process.append(list(data.eval_batches(cfg, 8, SEQ_LEN, max_batches=None)))
        assert len(list(data.eval_batches(cfg, 8, SEQ_LEN, max_batches=1))) == 1
    assert [len(b) for b in per_process] == [2, 2]
    offsets = np.concatenate([b["inputs"][:, 0] for batches in zip(*per_process) for b in batches])
    np.testing.assert_array_equal(offsets, np.arange(16) * SEQ_LEN)  # in order, each window once
